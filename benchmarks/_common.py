"""Shared helpers of the benchmark scripts: worker subprocesses, medians, peak memory, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

OUT_DIR = Path(__file__).resolve().parent / "out"


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Wall time of one call of ``fn`` (after ``sync`` on accelerators)."""
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def lm_train_step(model: Any, ids: Any, params: Any, lr: float = 1e-5) -> Callable[[], None]:
    """One causal-LM training step of ``model`` on ``ids`` (labels = inputs: forward, backward, AdamW on
    ``params``, gradients cleared), as a closure; the model is put in training mode."""
    import torch

    model.train()
    opt = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(names: Sequence[str], step: Callable[[str], Any], rounds: int,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of ``step(name)`` for each of ``names``, measured side by side: ``warmup`` untimed rounds, then
    ``rounds`` rounds in which every name runs once, in an order rotated each round, so that load on the
    machine falls on every one alike."""
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(-warmup, rounds):
        for i in range(len(names)):
            n = names[(i + rnd) % len(names)]
            t = timed(lambda: step(n))
            if rnd >= 0:
                times[n].append(t)
    return times


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("peft", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def run_worker(script: str, cfg: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``script --worker <cfg json>`` in a fresh interpreter; its last stdout line is a JSON result."""
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {cfg} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_json(name: str, obj: Any, path: str | None = None) -> Path:
    p = Path(path) if path else OUT_DIR / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2))
    return p


def have(*mods: str) -> list[str]:
    """The modules among ``mods`` that cannot be imported."""
    missing = []
    for m in mods:
        try:
            __import__(m)
        except ImportError:
            missing.append(m)
    return missing
