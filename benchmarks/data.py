"""The docstring data set: real text every Python installation carries.

Docstrings of the standard library's functions and classes (read with :mod:`ast`, nothing is
imported or executed), labelled by the top-level package they live in. Whitespace is collapsed,
docstrings shorter than ``min_chars`` are dropped, duplicates are removed (a text that occurs under
two packages is dropped from both), and a fixed-seed stratified split gives train/validation/test.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import sys
import sysconfig
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Packages present in every CPython 3.10-3.13 source tree (no optional tkinter/idlelib, no
# distutils/lib2to3 which later versions removed), all with 100+ documented functions and classes.
DEFAULT_PACKAGES = ("asyncio", "email", "importlib", "logging", "xml", "multiprocessing", "unittest", "http")
SKIP_DIRS = {"test", "tests", "__pycache__", "idle_test"}


@dataclass
class Split:
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Docstrings:
    classes: list[str]
    train: Split
    val: Split
    test: Split
    stdlib: str
    dropped_duplicates: int
    label_name: str = "package"

    def counts(self) -> list[tuple[str, int, int, int]]:
        """``(label, train, val, test)`` per class."""
        out = []
        for c, name in enumerate(self.classes):
            out.append((name, self.train.labels.count(c), self.val.labels.count(c), self.test.labels.count(c)))
        return out

    def counts_table(self) -> str:
        rows = self.counts()
        lines = [f"{self.label_name:<16} {'train':>6} {'val':>5} {'test':>5}"]
        lines += [f"{n:<16} {a:>6} {b:>5} {c:>5}" for n, a, b, c in rows]
        lines.append(f"{'total':<16} {len(self.train):>6} {len(self.val):>5} {len(self.test):>5}")
        return "\n".join(lines)


def _stratified_split(classes: list[list[str]], seed: int, fractions: tuple[float, float],
                      max_per_class: int | None) -> tuple[Split, Split, Split]:
    """Train/val/test splits of each class's sorted items (label = position in ``classes``): each class is
    shuffled with one seeded RNG, cut to ``max_per_class``, split by ``fractions``; then each split's order is
    shuffled (same RNG) so batches mix the classes."""
    rng = random.Random(seed)
    train, val, test = Split(), Split(), Split()
    for label, items in enumerate(classes):
        items = list(items)
        rng.shuffle(items)
        if max_per_class is not None:
            items = items[:max_per_class]
        n_tr = round(fractions[0] * len(items))
        n_va = round(fractions[1] * len(items))
        for split, chunk in ((train, items[:n_tr]), (val, items[n_tr:n_tr + n_va]), (test, items[n_tr + n_va:])):
            split.texts += chunk
            split.labels += [label] * len(chunk)
    for split in (train, val, test):
        order = list(range(len(split)))
        rng.shuffle(order)
        split.texts = [split.texts[i] for i in order]
        split.labels = [split.labels[i] for i in order]
    return train, val, test


def _parsed_modules(root: Path, skip: set[str]):
    """The parsed syntax tree of every ``.py`` file under ``root`` (sorted walk, ``skip`` folders left out;
    files that do not parse are skipped). Nothing is imported or executed."""
    return _parsed(_py_files(root, skip))


def _parsed(files: list[Path]):
    """The parsed syntax tree of each of ``files`` (those that do not parse are skipped)."""
    for f in files:
        try:
            yield ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue


def _package_docstrings(pkg_dir: Path, min_chars: int) -> set[str]:
    docs: set[str] = set()
    for tree in _parsed_modules(pkg_dir, SKIP_DIRS):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc:
                    text = " ".join(doc.split())
                    if len(text) >= min_chars:
                        docs.add(text)
    return docs


def load_docstrings(
    packages: tuple[str, ...] = DEFAULT_PACKAGES,
    *,
    seed: int = 0,
    min_chars: int = 20,
    fractions: tuple[float, float] = (0.7, 0.15),
    max_per_class: int | None = None,
) -> Docstrings:
    """Docstrings of ``packages`` (labels in that order), split ``fractions`` train/val, rest test."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    per: dict[str, set[str]] = {}
    for p in packages:
        d = stdlib / p
        if not (d / "__init__.py").is_file():
            raise FileNotFoundError(f"standard-library package {p!r} not found under {stdlib}")
        per[p] = _package_docstrings(d, min_chars)
    owners: dict[str, list[str]] = defaultdict(list)
    for p, docs in per.items():
        for t in docs:
            owners[t].append(p)
    shared = {t for t, o in owners.items() if len(o) > 1}
    train, val, test = _stratified_split([sorted(per[p] - shared) for p in packages], seed, fractions, max_per_class)
    return Docstrings(classes=list(packages), train=train, val=val, test=test, stdlib=str(stdlib),
                      dropped_duplicates=sum(len(owners[t]) for t in shared))


# ------------------------------------------------------------------------------------------------
# method names from code: which verb starts a function's name, given its body
# ------------------------------------------------------------------------------------------------
# Left out: generated or test code, GUI toolkits, removed packages, and ``encodings`` (≈ 100 codec
# modules with the same ``getregentry`` body except for a name).
CODE_SKIP_DIRS = SKIP_DIRS | {"idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip", "site-packages",
                              "encodings", "pydoc_data"}


def _function_bodies(stdlib: Path, skip: set[str]) -> list[tuple[str, str]]:
    """``(body source, verb)`` for every function of the standard library (its docstring removed).

    Parsing the whole standard library takes 10-25 s, so the result is kept in a JSON file in the temporary
    folder, named by a hash of everything it depends on (this file's source, the interpreter's version, the
    standard library's path, ``skip``, and the size and mtime of every file read); a file that fails to read
    is recomputed."""
    files = _py_files(stdlib, skip)
    key = hashlib.sha256(repr((Path(__file__).read_bytes(), sys.version, str(stdlib), sorted(skip),
                               [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])).encode())
    path = Path(tempfile.gettempdir()) / f"randlora-bench-bodies-{key.hexdigest()[:20]}.json"
    try:
        return [tuple(pair) for pair in json.loads(path.read_text())]
    except (OSError, ValueError):
        pass
    out = _parse_bodies(files)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    return out


def _py_files(root: Path, skip: set[str]) -> list[Path]:
    """Every ``.py`` file under ``root`` in a sorted walk, ``skip`` folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        found += [Path(dirpath, fn) for fn in sorted(filenames) if fn.endswith(".py")]
    return found


def _parse_bodies(files: list[Path]) -> list[tuple[str, str]]:
    out = []
    for tree in _parsed(files):
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            name = node.name.strip("_")
            verb = name.split("_")[0].lower()
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            if not verb or not body:
                continue
            code = " ".join(ast.unparse(ast.Module(body=body, type_ignores=[])).split())
            out.append((code, verb))
    return out


def load_code_names(
    *,
    n_classes: int = 16,
    seed: int = 0,
    min_chars: int = 40,
    fractions: tuple[float, float] = (0.7, 0.15),
    max_per_class: int = 300,
    tests: bool = False,
) -> Docstrings:
    """Method-name prediction: the first word of a function's name from its body's source code.

    Every function of the standard library is read with :mod:`ast` (nothing is imported or executed);
    its body without the docstring is unparsed to one line of code (whitespace collapsed), and its label
    is the first ``_``-separated word of its name, leading/trailing underscores removed (``get_value`` →
    ``get``, ``__repr__`` → ``repr``). ``init`` (every ``__init__``) is left out. Bodies shorter than
    ``min_chars`` are dropped, identical bodies are kept once (and dropped if their names disagree), the
    ``n_classes`` most frequent verbs are the classes (at most ``max_per_class`` bodies each, a fixed-seed
    sample) and a fixed-seed stratified split gives train/validation/test.

    Returns:
        A :class:`Docstrings` (its ``texts`` are code, its ``classes`` verbs).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    owners: dict[str, set[str]] = defaultdict(set)
    if tests and not (stdlib / "test" / "__init__.py").is_file():
        raise FileNotFoundError(f"the standard library's test package is not under {stdlib} (some Linux "
                                "distributions ship it separately, e.g. Debian's libpython3-testsuite); install "
                                "it or use the task without tests ('code')")
    skip = CODE_SKIP_DIRS - {"test", "tests", "idle_test"} if tests else CODE_SKIP_DIRS
    for code, verb in _function_bodies(stdlib, skip):
        if len(code) >= min_chars:
            owners[code].add(verb)
    conflicting = sum(1 for v in owners.values() if len(v) > 1)
    per: dict[str, list[str]] = defaultdict(list)
    for code, verbs in owners.items():
        if len(verbs) == 1:
            per[next(iter(verbs))].append(code)
    per.pop("init", None)
    per.pop("test", None)
    classes = sorted(per, key=lambda v: (-len(per[v]), v))[:n_classes]
    train, val, test = _stratified_split([sorted(per[v]) for v in classes], seed, fractions, max_per_class)
    return Docstrings(classes=classes, train=train, val=val, test=test, stdlib=str(stdlib),
                      dropped_duplicates=conflicting, label_name="verb")


# The two variants of the code task used by the benchmarks: "code" reads the library code only (16 verbs,
# at most 300 bodies each, split 70/15/15: 303 test bodies); "code-tests" adds the standard library's test
# code (16 verbs, at most 500 bodies each, split 50/15/35: 1,344 test bodies, so that a 2-point difference
# between two methods is larger than the test split's sampling error).
CODE_TASKS = {
    "code": {},
    "code-tests": {"tests": True, "max_per_class": 500, "fractions": (0.5, 0.15)},
}


def load_code_task(name: str, seed: int = 0) -> Docstrings:
    """The code task variant ``name`` of :data:`CODE_TASKS` (split with ``seed``)."""
    return load_code_names(seed=seed, **CODE_TASKS[name])


if __name__ == "__main__":
    ds = load_docstrings()
    print(f"stdlib: {ds.stdlib}; dropped {ds.dropped_duplicates} docstrings shared by two packages")
    print(ds.counts_table())


# ------------------------------------------------------------------------------------------------
# retrieval pairs: a docstring's summary line and the rest of the same docstring
# ------------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Query/document pairs split train/val/test; in a split, query ``i`` belongs with document ``i``."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    stdlib: str
    dropped: int


def load_doc_pairs(*, seed: int = 0, sizes: tuple[int, int] = (300, 800), min_query: int = 20,
                   min_doc: int = 60) -> Pairs:
    """Summary ↔ details: prose ↔ prose pairs from the standard library's own docstrings.

    Every docstring of a module, class or function of the standard library (read with :mod:`ast`, nothing
    imported; test code, GUI toolkits and generated code left out as in the code task) that has a summary
    paragraph and more text after a blank line gives one pair: the query is the summary (the first
    paragraph, at least ``min_query`` characters), the document the rest (at least ``min_doc``), whitespace
    collapsed. A summary that occurs with two different documents is dropped (it could not be answered), and
    so is a document that occurs with two summaries. The pairs are sorted, shuffled with ``seed`` and cut into
    validation (``sizes[0]``), test (``sizes[1]``) and train (the rest: 994 pairs with the defaults on
    CPython 3.11.7; the count depends on the Python version's standard library).
    """
    kept, dropped = _doc_pairs(min_query, min_doc)
    kept = list(kept)
    random.Random(seed).shuffle(kept)
    n_val, n_test = sizes
    if n_val + n_test >= len(kept):
        raise ValueError(f"only {len(kept)} pairs; validation {n_val} + test {n_test} leaves none to train on")
    return Pairs(train=kept[n_val + n_test:], val=kept[:n_val], test=kept[n_val:n_val + n_test],
                 stdlib=str(Path(sysconfig.get_paths()["stdlib"])), dropped=dropped)


@functools.lru_cache(maxsize=4)
def _doc_pairs(min_query: int, min_doc: int) -> tuple[tuple[tuple[str, str], ...], int]:
    """The sorted unique pairs of :func:`load_doc_pairs` and how many were dropped (read once per process)."""
    import re

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    by_query: dict[str, set[str]] = defaultdict(set)
    for tree in _parsed_modules(stdlib, CODE_SKIP_DIRS):
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            parts = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
            if len(parts) < 2:
                continue
            q, d = " ".join(parts[0].split()), " ".join(parts[1].split())
            if len(q) >= min_query and len(d) >= min_doc:
                by_query[q].add(d)
    pairs = [(q, next(iter(ds))) for q, ds in by_query.items() if len(ds) == 1]
    doc_count: dict[str, int] = defaultdict(int)
    for _, d in pairs:
        doc_count[d] += 1
    kept = sorted(p for p in pairs if doc_count[p[1]] == 1)
    return tuple(kept), len(by_query) - len(kept)
