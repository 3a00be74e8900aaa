#!/usr/bin/env bash
# The GPU check: what the CPU-only test suite cannot prove, run on one GPU (an H100 or H200) in about
# 8 minutes, on that machine's own PyTorch (2.11+ with CUDA), with no network. The first session lent
# a device runs it and records its results in docs/benchmarks.md.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--wheels DIR]
#
#   --dry-run  run nothing that needs a GPU: list every step with its command (exit 0); the results
#              file says "dry run" for each. What CI runs (tests/test_gpu_check.py).
#   --out DIR  where results go (default: gpu-check-results): gpu_check.md (one row a step: status,
#              seconds, what it printed last) and a log per step.
#   --wheels   wheels for what the machine lacks (default: .whl; see scripts/gpu_wheels.txt), installed
#              into /tmp/site with --no-index and put on PYTHONPATH. torch is never installed: the
#              machine's own is the one under test.
#
# Steps (each with its own time limit):
#   env        python, torch, CUDA device, nvcc
#   gpu-tests  every gpu-marked test: the engine exact against transformers on CUDA in bf16 (both
#              families), the cuBLAS FP8 GEMM against the dequantized model, the NCCL dispatcher
#   sync       decode steps of both families under torch.cuda.set_sync_debug_mode("error"): no host
#              sync but the sampled tokens' copy (scripts/gpu_sync_check.py)
#   up         a tiny `moeserve up` on the GPU serving one chat request; needs Mooncake's CUDA wheel
#              (98 MB: over the 64 MiB a device call may carry) to hand GPU-resident KV over: the
#              step says "skipped" and why when the machine lacks it
#   bench      bench/engine.py --device cuda: tokens/s and step time at batch 1, 16 and 64
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=gpu-check-results
WHEELS=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.md"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "$DRY" = 1 ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1
FAILED=0

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "| step | status | seconds | last line |"
  echo "|---|---|---|---|"
} > "$RESULTS"

# step NAME LIMIT_S COMMAND...: run it (or, dry, list it) and add its row to the results.
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  if [ "$DRY" = 1 ]; then
    echo "| $name | dry run | 0 | \`$*\` |" >> "$RESULTS"
    return 0
  fi
  local start=$SECONDS status
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  local last; last=$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | tr '|' '/' | cut -c1-160)
  case $status in
    0) echo "| $name | passed | $((SECONDS - start)) | $last |" >> "$RESULTS" ;;
    77) echo "| $name | skipped | $((SECONDS - start)) | $last |" >> "$RESULTS" ;;
    124) echo "| $name | TIMED OUT | $limit | $last |" >> "$RESULTS"; FAILED=1 ;;
    *) echo "| $name | FAILED ($status) | $((SECONDS - start)) | $last |" >> "$RESULTS"; FAILED=1 ;;
  esac
  tail -n 5 "$OUT/$name.log"
}

if [ "$DRY" = 0 ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ "$DRY" = 1 ]; then  # what a dry run can check here: the step scripts compile
  $PY -m py_compile scripts/gpu_env.py scripts/gpu_sync_check.py scripts/gpu_up_check.py bench/engine.py || exit 1
fi
GPU_TESTS=$(grep -rl "pytest.mark.gpu" tests --include='test_*.py' | sort | tr '\n' ' ')
step env 60 $PY scripts/gpu_env.py
step gpu-tests 240 $PY -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS
step sync-deepseek 90 $PY scripts/gpu_sync_check.py --arch deepseek_v3
step sync-qwen3 90 $PY scripts/gpu_sync_check.py --arch qwen3_moe
step up 150 $PY scripts/gpu_up_check.py
step bench 150 $PY bench/engine.py --device cuda --batches 1,16,64 --repeats 3

echo
cat "$RESULTS"
[ "$DRY" = 1 ] && echo && echo "dry run: nothing above ran; on a GPU machine: scripts/gpu_check.sh"
exit $FAILED
