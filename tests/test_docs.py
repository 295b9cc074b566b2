"""The documentation cannot rot: its Python examples run and its relative links resolve.

Every ```python block of README.md and docs/*.md runs, except one preceded by a ``<!-- not-run -->``
line. The blocks of one file run in order in one namespace (a later example may use what an earlier one
defined), in a fresh temporary working directory, so files the examples write go nowhere else.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

# Pages linked before they exist (none now): a missing page fails the link check.
PENDING_PAGES: set[str] = set()

NOT_RUN = "<!-- not-run -->"
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def code_blocks(text: str) -> list[tuple[int, str, bool, str]]:
    """``(line, language, runnable, code)`` for every fenced block; ``runnable`` is False when the last
    non-blank line before the fence is the not-run marker."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise AssertionError(f"unclosed code block at line {start + 1}")
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        runnable = not (k >= 0 and lines[k].strip() == NOT_RUN)
        out.append((start + 1, lang, runnable, "\n".join(lines[start + 1 : j]) + "\n"))
        i = j + 1
    return out


def test_code_blocks_parser() -> None:
    text = "x\n```python\na = 1\n```\n\n<!-- not-run -->\n\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert code_blocks(text) == [(2, "python", True, "a = 1\n"), (8, "python", False, "b = 2\n"),
                                 (11, "bash", True, "ls\n")]
    with pytest.raises(AssertionError, match="unclosed"):
        code_blocks("```python\na = 1\n")


def _python_pages() -> list[Path]:
    return [p for p in DOCS if any(lang == "python" and run for _, lang, run, _ in code_blocks(p.read_text("utf-8")))]


_RUNNER = """
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
pages, workdir = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for k, (page, blocks) in enumerate(pages):
    cwd = os.path.join(workdir, str(k))
    os.makedirs(cwd)
    os.chdir(cwd)  # files an example writes land here
    ns = {"__name__": "__main__"}
    try:
        for line, code in blocks:
            exec(compile(code, f"{page}:{line}", "exec"), ns)
        results[page] = None
    except BaseException:  # noqa: BLE001 - report the page's failure, then run the next page
        results[page] = traceback.format_exc()
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def example_results(tmp_path_factory) -> dict[str, str | None]:
    """Every page's runnable blocks, run once in one fresh interpreter (one thread): page -> None or the
    traceback of its first failing block. Each page has its own namespace and working directory."""
    pages = [(_rel(p), [(line, code) for line, lang, run, code in code_blocks(p.read_text("utf-8"))
                        if lang == "python" and run]) for p in _python_pages()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    work = tmp_path_factory.mktemp("doc-examples")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(pages), str(work)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"the example runner failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("page", _python_pages(), ids=_rel)
def test_python_examples_run(page: Path, example_results: dict[str, str | None]) -> None:
    assert _rel(page) in example_results
    failure = example_results[_rel(page)]
    assert failure is None, f"{_rel(page)}: an example failed\n{failure}"


def test_readme_quickstart_is_runnable_and_early() -> None:
    text = (ROOT / "README.md").read_text("utf-8")
    blocks = [b for b in code_blocks(text) if b[1] == "python"]
    assert blocks and blocks[0][2], "the README's first python block (the quickstart) must run"
    line, _, _, code = blocks[0]
    end = line + code.count("\n")
    assert end <= 40, f"the quickstart ends at line {end}; it must fit in the README's first 40 lines"
    assert "randlora.inject(" in code and "lr=" in code


def test_readme_size_and_setup_commands() -> None:
    text = (ROOT / "README.md").read_text("utf-8")
    assert len(text.encode("utf-8")) <= 12 * 1024
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        assert text.count(marker) == 1, marker
        after = text.split(marker, 1)[1].lstrip("\n")
        assert after.startswith("```bash\n"), f"{marker} must be followed by a ```bash block"
        cmd = after[len("```bash\n"):].split("```", 1)[0].strip()
        assert cmd.startswith("python3 -m venv .venv && "), cmd


def test_ci_extracts_the_test_command() -> None:
    """``.ci/run`` pulls the test command out of README.md with awk: it must find it."""
    awk = "/<!-- test-command -->/{f=1;next} f&&/^```bash/{g=1;next} g&&/^```/{exit} g{print}"
    out = subprocess.run(["awk", awk, str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("python -m pytest -q tests"), out
    assert awk in (ROOT / ".ci" / "run").read_text("utf-8"), ".ci/run extracts the command differently now"


def _links() -> list[tuple[Path, str]]:
    out = []
    for page in DOCS:
        text = page.read_text("utf-8")
        # links inside code blocks are code, not links
        text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        out += [(page, target) for target in LINK.findall(text)]
    return out


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text("utf-8"), flags=re.S | re.M)
    heads = re.findall(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_anchor_slugs() -> None:
    page = ROOT / "docs" / "performance.md"
    assert "caches-and-memory" in _anchors(page) and "eval-forward" in _anchors(page)


def test_relative_links_resolve() -> None:
    links = _links()
    assert any(page.name == "README.md" for page, _ in links)
    bad = []
    for page, target in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # external (https:, mailto:) or an anchor on the same page
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve()
        if dest.exists():
            if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_rel(page)}: {target} (no such heading)")
            continue
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if rel not in PENDING_PAGES:
            bad.append(f"{_rel(page)}: {target}")
    assert not bad, f"links to files that do not exist: {bad}"


def test_every_doc_page_is_in_the_index() -> None:
    index = (ROOT / "docs" / "index.md").read_text("utf-8")
    targets = {t.split("#", 1)[0] for t in LINK.findall(index)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"} | {
        Path(p).name for p in PENDING_PAGES}
    assert pages <= targets, f"docs/index.md does not link {sorted(pages - targets)}"


def test_no_private_references() -> None:
    """The docs speak to users: no pointers to material they do not have."""
    for page in DOCS:
        text = page.read_text("utf-8")
        for word in ("REFERENCE", "the peer", "this session"):
            assert word not in text, f"{_rel(page)} mentions {word!r}"


# ------------------------------------------------------------------------------------------------
# declared versions: what pyproject.toml and the README say is what `import randlora` enforces
# ------------------------------------------------------------------------------------------------
def test_declared_versions_agree() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text("utf-8")
    assert '"torch>=2.13"' in pyproject and 'requires-python = ">=3.10"' in pyproject
    assert "torch >= 2.13, Python >= 3.10" in (ROOT / "README.md").read_text("utf-8")
    assert sys.version_info >= (3, 10)


def test_import_refuses_an_old_torch() -> None:
    """``import randlora`` on an older torch fails at once with the fix; 2.13 and later import."""
    script = textwrap.dedent("""
        import json, sys
        import torch
        real = torch.__version__
        out = {}
        for v in ["2.12.1+cpu", "2.3.0", "1.13.1", "2.13.0", "2.13.0a0+git1234", "2.14.0.dev20260101", "3.0.0"]:
            torch.__version__ = v
            for name in [m for m in sys.modules if m == "randlora" or m.startswith("randlora.")]:
                del sys.modules[name]
            try:
                import randlora
                out[v] = "ok"
            except ImportError as e:
                out[v] = str(e)
        torch.__version__ = real
        print(json.dumps(out))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for v in ["2.12.1+cpu", "2.3.0", "1.13.1"]:
        assert out[v] == f"randlora needs torch >= 2.13 (found {v}); pip install 'torch>=2.13'", out[v]
    for v in ["2.13.0", "2.13.0a0+git1234", "2.14.0.dev20260101", "3.0.0"]:
        assert out[v] == "ok", (v, out[v])
