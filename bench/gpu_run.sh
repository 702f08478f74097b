#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests, the machine's primitives, the restore
# benchmark to CUDA and the cold-start benchmark on CUDA. Needs kold installed with its `gpu` extra
# (CuPy) and the bench peers (tensorizer, runai-model-streamer) in the Python that runs it.
#
#   bash bench/gpu_run.sh [tests] [probe] [restore] [coldstart]     (default: all four)
#
# Logs and JSON go to $KOLD_GPU_OUT (default bench/out/gpu); the tables are printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${KOLD_GPU_OUT:-bench/out/gpu}"
RUNS="${KOLD_GPU_RUNS:-3}"
mkdir -p "$OUT_DIR"
parts="${*:-tests probe restore coldstart}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader 2>&1 | tee "$OUT_DIR/gpu.txt"
status=0
for part in $parts; do
  echo "=== $part ==="
  case "$part" in
    tests)
      $PY -m pytest -q -p no:cacheprovider tests/snapshot/test_gpu.py tests/runtime/test_runtime_gpu.py 2>&1 \
        | tee "$OUT_DIR/tests.log" | tail -25 || status=1 ;;
    probe)
      $PY bench/restore.py --size 1b --methods readinto-hot --runs 1 --out bench/out 2>&1 | tail -3  # makes the model
      $PY bench/gpu_probe.py --file "$(ls bench/out/1b/model/*.safetensors | head -1)" 2>&1 | tee "$OUT_DIR/probe.txt" ;;
    restore)
      $PY bench/restore.py --device cuda --size 1b --runs "$RUNS" \
        --methods "${KOLD_GPU_METHODS:-limit,hot,cold}" 2>&1 | tee "$OUT_DIR/restore.log" | tail -40
      cp bench/out/restore-1b-cuda.json bench/out/restore-1b-cuda.png "$OUT_DIR/" 2>/dev/null ;;
    coldstart)
      $PY bench/coldstart.py --device cuda --sizes "${KOLD_GPU_SIZES:-tiny,1b}" --runs "$RUNS" \
        --methods "${KOLD_GPU_COLD:-kold-local,kold-fork,kold-shm,naive}" 2>&1 | tee "$OUT_DIR/coldstart.log" | tail -30
      cp bench/out/coldstart/coldstart-cuda.json "$OUT_DIR/" 2>/dev/null ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
exit $status
