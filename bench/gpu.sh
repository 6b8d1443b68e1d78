#!/usr/bin/env bash
# The one-call GPU check for a lent CUDA machine (one H100/H200), run from the repo root there:
#     run(command="bash bench/gpu.sh", carry=[".gpu-carry"], timeout_s=540)
# after `make gpu-carry` here. Installs the carried wheels (Liger-Kernel, a peer) into /tmp/site, then runs
# bench/gpu_check.py within its own budget (default 480 s, GPU_CHECK_BUDGET_S); every result lands in $OUT as it
# is measured (gpu_check.jsonl, gpu_check.log, kernel_tests.log), the whole set at the end (gpu-<time>.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
shopt -s nullglob
wheels=(.gpu-carry/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu.sh: no wheels in .gpu-carry/ (make gpu-carry): Liger will be reported missing"
fi
python3 bench/gpu_check.py --budget-s "${GPU_CHECK_BUDGET_S:-480}" "$@"
