#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent CUDA machine (one H100/H200): the kernel tests compiled
# for real, then each benchmark's CUDA mode. Tables go to stdout; JSON to bench/results/ (and $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
CANCERLLM_TEST_DEVICE=cuda TRITON_INTERPRET=0 python3 -m pytest -q tests/test_kernel_attention.py \
    tests/test_kernel_rms_norm.py tests/test_kernel_cross_entropy.py
python3 bench/kernels.py
python3 bench/train.py --preset 1b
python3 bench/generate.py --device cuda --dtype bfloat16
if [ -n "${OUT:-}" ]; then cp bench/results/*.json "$OUT"/ 2>/dev/null; fi
