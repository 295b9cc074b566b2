#!/usr/bin/env bash
# The GPU checks in one run (about 10 minutes on one H100/H200): the CUDA tests, then the one-layer and
# training-step benchmarks in bf16. Run from the repository root in an environment set up with the
# README's test command; results go to $OUT (default benchmarks/out/gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
# a model accelerate splits across the GPU, the CPU and disk (device_map): outputs and gradients equal the model in
# memory, lambda/gamma on each layer's device, one copy of the bases for the device the bank is not on
python -m pytest -q -rs tests/test_offload.py 2>&1 | tee "$OUT/test_offload.txt"
python benchmarks/op.py --device cuda --dtype bf16 --reps 5 --out "$OUT/op.json" 2>&1 | tee "$OUT/op.txt"
python benchmarks/step.py --device cuda --dtype bf16 --grid all:4096 all:8192 --reps 3 --steps 5 \
    --out "$OUT/step.json" 2>&1 | tee "$OUT/step.txt"
# RandLoraTrainer under FSDP2 through accelerate as it is: on a GPU accelerate turns FSDP on by itself (on the
# CPU test machine tests/test_trainer_engines.py has to switch accelerate's state to FSDP; docs/trainer.md)
python -m pytest -q -rs tests/test_trainer_engines.py -k cuda 2>&1 | tee "$OUT/test_trainer_engines_cuda.txt"

# --- the CUDA row of randlora.costs.DEVICE_COSTS (set from arithmetic counts until this runs) ---
# spmm_weight / sampled_weight / layout_weight: time per multiply-add of the sparse route's embedding_bag
# products and of its sampled ∂S (gather + bmm), and per element of its token-block copies, against a dense
# GEMM's, on the GPU; gemm_tokens: the token count under which a frozen layer's matmul is bound by reading W.
# Copy the medians into DEVICE_COSTS["cuda"] with these commands as their `measured_by`. Then the routes that
# follow from them, one layer and one step:
python benchmarks/sparse_op.py --kernels --device cuda --reps 5 --tokens 1024 4096 8192 2>&1 | tee "$OUT/sparse_kernels.txt"
python benchmarks/serving.py --gemm-tokens --device cuda 2>&1 | tee "$OUT/gemm_tokens.txt"
python -c "from randlora.planner import plan_call as p
for T in (1024, 4096, 8192):
    for O, I in ((1024, 1024), (2816, 1024), (1024, 2816)):
        print(T, O, I, p(T=T, O=O, I=I, nr=1024, r=32, device='cuda', density=1 / 32))" 2>&1 | tee "$OUT/cuda_routes.txt"
python benchmarks/step.py --device cuda --dtype bf16 --sparse --no-eval --grid all:4096 \
    --kinds randlora randlora-vs peft-lora --reps 3 --steps 5 --out "$OUT/step_sparse.json" 2>&1 | tee "$OUT/step_sparse.txt"
