#!/usr/bin/env bash
# The GPU checks in one run (about 10 minutes on one H100/H200): the CUDA tests, then the one-layer and
# training-step benchmarks in bf16. Run from the repository root in an environment set up with the
# README's test command; results go to $OUT (default benchmarks/out/gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
python benchmarks/op.py --device cuda --dtype bf16 --reps 5 --out "$OUT/op.json" 2>&1 | tee "$OUT/op.txt"
python benchmarks/step.py --device cuda --dtype bf16 --grid all:4096 all:8192 --reps 3 --steps 5 \
    --out "$OUT/step.json" 2>&1 | tee "$OUT/step.txt"
