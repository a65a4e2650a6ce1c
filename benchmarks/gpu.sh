#!/usr/bin/env bash
# Every GPU check and benchmark in one call (for a machine with a CUDA GPU and torch, triton, transformers
# and peft installed). Results go to $OUT (the device tool's output folder) or benchmarks/results.
# Each step has its own time limit and a failing step does not stop the others: $out/steps.txt lists
# every step with its exit status, so one call brings back everything that worked.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
: > "$out/steps.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, record its exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc ${SECONDS}s-total $((SECONDS - start))s" | tee -a "$out/steps.txt"
    tail -3 "$out/$name.txt"
}

step gpu 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step gpu-tests-torch 80 python -m pytest tests/test_autograd.py tests/test_compile.py tests/test_kinds.py -q \
    "tests/test_training_stacks.py::test_autocast_matches_fp32_with_fp32_master_adapters_and_saves_no_fp32_activations"
step gpu-tests-triton 110 python -m pytest tests/test_triton.py -q  # first GPU compiles of every specialization
layer="python benchmarks/bench_lora_layer.py --device cuda --dtype bfloat16 --rounds 30 --warmup 5 --inner 3"
# The reference shape (issue targets), then two more shapes: where do the Triton kernels beat cuBLAS?
step layer-cuda 120 $layer --m 8192 --k 4096 --n 4096 --ranks 16 64 --dropouts 0 0.1 --decode 1 16 \
    --out "$out/layer-cuda.json"
step layer-cuda-m1024 60 $layer --m 1024 --k 4096 --n 4096 --ranks 16 --dropouts 0 0.1 --decode 4 \
    --out "$out/layer-cuda-m1024.json"
step layer-cuda-k2048 60 $layer --m 8192 --k 2048 --n 5632 --ranks 16 --dropouts 0 0.1 --decode \
    --out "$out/layer-cuda-k2048.json"
step dropout-cuda 20 python benchmarks/bench_dropout.py --device cuda --dtype bfloat16 --shapes 8192x4096 1024x4096 \
    --out "$out/dropout-cuda.json"  # the torch path's draw vs a dense Philox mask
step model-cuda 115 python benchmarks/bench_model.py --device cuda --dtype bfloat16 --hidden 2048 --layers 8 \
    --heads 16 --vocab 32000 --batch 4 --seq 1024 --rounds 20 --out "$out/model-cuda.json"
