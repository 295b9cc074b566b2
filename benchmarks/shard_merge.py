"""Peak memory of the command-line merge on a sharded checkpoint against the checkpoint's size.

A Llama with random fp32 weights is saved with ``save_pretrained(max_shard_size=...)`` (several
``model-0000N-of-0000M.safetensors`` and the index), RandLora on all seven linear layers of every block (r = 32),
and the adapter saved with its bases. Each figure is the peak resident set size of a fresh process
(``VmHWM``): one that only imports what ``python -m randlora`` imports (the floor), one that runs
``python -m randlora merge`` on the folder, one that merges the same weights saved as one file, and for scale
one that holds every tensor of the checkpoint in memory. The merged folder is checked against ``randlora.merge`` on
the model (bit for bit).

    python benchmarks/shard_merge.py            # hidden 1024, 8 layers (~0.5 GB), 64 MB shards: about 2 min
    python benchmarks/shard_merge.py --quick    # a small model in 200 KB shards: a smoke run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_json  # noqa: E402

SIZE = {"hidden": 1024, "mlp": 2816, "layers": 8, "heads": 16, "vocab": 8192, "shard": "64MB"}
QUICK = {"hidden": 64, "mlp": 96, "layers": 3, "heads": 4, "vocab": 128, "shard": "200KB"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# VmHWM, the peak RSS of this process's own memory map: ru_maxrss would report at least the parent's RSS at the
# fork (Linux keeps the larger of the two across exec)
_PEAK = ("print('PEAK', [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
_FLOOR = "import torch, safetensors, randlora.__main__; " + _PEAK
_MERGE = "import sys; from randlora.__main__ import main; assert main(sys.argv[1:]) == 0; " + _PEAK
_LOAD = ("import sys, pathlib; from safetensors.torch import load_file; "
         "kept = [t.clone() for f in sorted(pathlib.Path(sys.argv[1]).glob('*.safetensors')) "
         "for t in load_file(str(f)).values()]; " + _PEAK)


def peak_mb(code: str, *args: str) -> float:
    """The peak RSS (MB) of a fresh Python process running ``code`` with ``args``."""
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return float(out.split("PEAK")[-1])


def build(size: dict, d: Path):
    """Save the base (sharded and as one file) and the adapter; returns the merged model's state dict."""
    import torch
    import transformers
    from safetensors.torch import save_file

    import randlora

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"],
                                   intermediate_size=size["mlp"], num_hidden_layers=size["layers"],
                                   num_attention_heads=size["heads"], tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d / "base", max_shard_size=size["shard"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "single.safetensors"))
    randlora.inject(model, TARGETS, r=32, alpha=64)
    with torch.no_grad():
        for p in randlora.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.01)
    randlora.save(model, d / "ad.safetensors")
    randlora.merge(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def check(out: Path, merged: dict) -> None:
    from safetensors.torch import load_file

    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(got) == set(merged) and all(got[k].equal(v) for k, v in merged.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="JSON file for the results (default benchmarks/out/shard_merge.json)")
    args = ap.parse_args()
    size = QUICK if args.quick else SIZE
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        merged = build(size, d)
        shards = sorted((d / "base").glob("*.safetensors"))
        mb = [f.stat().st_size / 2**20 for f in shards]
        ad = (d / "ad.safetensors").stat().st_size / 2**20
        rows = [("imports only (floor)", peak_mb(_FLOOR)),
                ("merge, sharded folder", peak_mb(_MERGE, "merge", "--base", str(d / "base"), "--adapter",
                                                  str(d / "ad.safetensors"), "--out", str(d / "m"))),
                ("merge, one file", peak_mb(_MERGE, "merge", "--base", str(d / "single.safetensors"), "--adapter",
                                            str(d / "ad.safetensors"), "--out", str(d / "m.safetensors"))),
                ("every tensor held in memory (for scale)", peak_mb(_LOAD, str(d / "base")))]
        check(d / "m", merged)
        del merged
    print(f"checkpoint: {sum(mb):.1f} MB in {len(mb)} shards (largest {max(mb):.1f} MB); adapter {ad:.1f} MB")
    print(markdown_table(["process", "peak RSS (MB)"], [(n, f"{v:.0f}") for n, v in rows]))
    write_json("shard_merge.json", {"machine": machine(), "size": size, "shards_mb": mb, "adapter_mb": ad,
                                    "peak_rss_mb": dict(rows)}, args.out)


if __name__ == "__main__":
    main()
