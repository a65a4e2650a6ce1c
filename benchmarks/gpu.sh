#!/usr/bin/env bash
# Every GPU check and benchmark in one call (for a machine with a CUDA GPU and torch, triton, transformers
# and peft installed). Results go to $OUT (the device tool's output folder) or benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest tests/test_triton.py tests/test_autograd.py tests/test_compile.py -q 2>&1 | tail -5 | tee "$out/gpu-tests.txt"
python benchmarks/bench_lora_layer.py --device cuda --dtype bfloat16 --m 8192 --k 4096 --n 4096 --ranks 16 64 \
    --dropouts 0 0.1 --decode 1 16 --rounds 30 --warmup 5 --inner 3 --out "$out/layer-cuda.json" | tee "$out/layer-cuda.txt"
python benchmarks/bench_model.py --device cuda --dtype bfloat16 --hidden 2048 --layers 8 --heads 16 --vocab 32000 \
    --batch 4 --seq 1024 --rounds 20 --out "$out/model-cuda.json" | tee "$out/model-cuda.txt"
