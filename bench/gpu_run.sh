#!/usr/bin/env bash
# Runs THERE, on the lent GPU machine, in one `device` call: everything that needs a GPU, in at most
# 7 minutes (KOLD_GPU_BUDGET_S), so that a rerun still fits the session's 15 minutes of device time.
#
#   here:   bash bench/gpu_prepare.sh            (the wheels the machine lacks, into .whl/)
#   device: command "bash bench/gpu_run.sh", carry [".whl"], timeout_s 480
#   here:   GPU_DRYRUN=1 bash bench/gpu_prepare.sh && GPU_DRYRUN=1 bash bench/gpu_run.sh
#
# The machine has Python 3.12 with torch (CUDA 13), cupy-cuda13x, transformers, pytest..., and no
# network. Steps, each under its own `timeout` and cut to what is left of the budget:
#   install   the carried wheels, --no-index --no-deps --target $SITE, PYTHONPATH=$SITE; every step
#             runs from a scratch directory, so the repo's folders (kold/, snapshot/ ...) never shadow
#             the installed kold, and the run checks that they do not
#   facts     nvidia-smi, versions, cudaDevAttrHostRegisterReadOnlySupported, THP, /dev/shm, memlock
#   probe     bench/gpu_pin_probe.py: read-only pins of MAP_PRIVATE vs MAP_SHARED+O_RDONLY, threads
#   tests     tests/snapshot/test_gpu.py, its CPU twin test_gpu_twin.py, then
#             tests/runtime/test_runtime_gpu.py (a pytest each, so one failing conftest cannot hide the rest)
#   restore   bench/restore.py --device cuda with explicit methods (peers not installed there are
#             left out: tensorizer, runai); its inputs are made in the background during the tests
#   tokens    bench/gpu_tokens.py: prefill and decode tokens/s of kold's model on the GPU
#   coldstart bench/coldstart.py --device cuda, if at least a minute is left
# Logs and JSON go to $OUT, 8 files at most (the tool brings back no more): run.log, probe.log,
# tests-snapshot.log, tests-runtime.log, restore.log, restore.json, tokens.log, coldstart.log.
#
# GPU_DRYRUN=1 runs the same steps here with a 3.11 build of the wheels and a Python that holds only
# the image's packages (GPU_DRYRUN=1 bench/gpu_prepare.sh makes both), on the tiny model: each step
# works up to its first CUDA call (the GPU tests skip, the restore's workers stop before CUDA), and
# the steps that cannot reach CUDA at all (tokens, cold start) run on the CPU.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUDGET_S=${KOLD_GPU_BUDGET_S:-420}
START=$SECONDS

if [[ "${GPU_DRYRUN:-0}" == 1 ]]; then
  DRY=1
  ROOT=/tmp/kold-gpu-dryrun
  PY=${PYTHON:-$ROOT/python/bin/python}
  WHEELS=$ROOT/whl
  SITE=$ROOT/site
  rm -rf "$ROOT/out"  # the device empties $OUT before each command; here the last dry run's logs would add up
  OUT=${OUT:-$ROOT/out}
  SIZE=${KOLD_GPU_SIZE:-tiny}
  RUNS=1
  LATER_DEVICE=cpu  # tokens and cold start: no step of theirs stops short of CUDA, so they run on the CPU
else
  DRY=0
  if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
  elif [[ -x /opt/torch/.venv/bin/python3 ]]; then PY=/opt/torch/.venv/bin/python3
  else PY=python3; fi
  WHEELS=$REPO/.whl
  SITE=/tmp/site
  OUT=${OUT:-$REPO/bench/out/gpu}
  SIZE=${KOLD_GPU_SIZE:-1b}
  RUNS=${KOLD_GPU_RUNS:-2}
  LATER_DEVICE=cuda
fi
METHODS=${KOLD_GPU_METHODS:-h2d-pinned,h2d-pageable,safetensors,torch-mmap,kold,kold-cold,kold-shm,kold-shm-huge}
COLD_METHODS=${KOLD_GPU_COLD:-kold-local,kold-shm,floor}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/kold-gpu-work.XXXXXX)  # every step's working directory: outside the repo
SUMMARY=()
STATUS=0

left() { echo $((BUDGET_S - (SECONDS - START))); }

# step NAME CAP_S LOGFILE CMD...: run CMD in $WORK under timeout min(CAP_S, what is left - 5), output to
# $OUT/LOGFILE (appended) and its tail to the run's log; LOGFILE "-": all of it to the run's log
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local limit t0 rc
  limit=$(( $(left) - 5 ))
  (( cap < limit )) && limit=$cap
  if (( limit < 10 )); then
    echo "=== $name: skipped, $(left) s of the budget left"
    SUMMARY+=("$name: skipped (no time left)")
    return 0
  fi
  echo "=== $name (at most ${limit} s; $(left) s of the budget left)"
  t0=$SECONDS
  if [[ $log == - ]]; then
    (cd "$WORK" && timeout -k 5 "$limit" "$@")
    rc=$?
  else
    (cd "$WORK" && timeout -k 5 "$limit" "$@") >>"$OUT/$log" 2>&1
    rc=$?
    tail -n "${TAIL:-12}" "$OUT/$log"
  fi
  (( rc == 124 || rc == 137 )) && echo "--- $name: TIMED OUT after ${limit} s"
  echo "--- $name: rc $rc in $((SECONDS - t0)) s"
  SUMMARY+=("$name: rc $rc, $((SECONDS - t0)) s")
  (( rc == 0 || rc == ${ALSO_OK:-0} )) || STATUS=1
  return 0
}

facts() {
  echo "date: $(date -u '+%F %T UTC'); dry run: $DRY; python: $PY; budget ${BUDGET_S} s"
  uname -a
  echo "cpus: $(nproc); memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}'); locked-memory limit: $(ulimit -l)"
  for f in enabled defrag shmem_enabled; do
    echo "THP $f: $(cat /sys/kernel/mm/transparent_hugepage/$f 2>/dev/null || echo n/a)"
  done
  echo "/dev/shm: $(grep ' /dev/shm ' /proc/mounts || echo 'not a mount'); $(df -h /dev/shm | tail -1)"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
      --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  (cd "$WORK" && timeout 60 "$PY" - "$DRY" <<'EOF'
import importlib.metadata as md
import sys

import torch

for name in ("torch", "cupy-cuda13x", "cupy-cuda12x", "numpy", "safetensors", "transformers", "pytest", "kold"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
print(f"python {sys.version.split()[0]}, torch's CUDA {torch.version.cuda}")
if sys.argv[1] == "1":
    print("dry run: no CUDA call (device attributes not read)")
else:
    import cupy

    rt = cupy.cuda.runtime
    print(f"GPU {torch.cuda.get_device_name(0)}, driver {rt.driverGetVersion()}, runtime {rt.runtimeGetVersion()}")
    print(f"cudaDevAttrHostRegisterSupported {rt.deviceGetAttribute(99, 0)}, "
          f"cudaDevAttrHostRegisterReadOnlySupported {rt.deviceGetAttribute(113, 0)}")
EOF
  )
}

main() {
  echo "=== kold GPU run: repo $REPO, out $OUT, scratch $WORK"
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || {
    echo "no wheels in $WHEELS: run $([[ $DRY == 1 ]] && echo 'GPU_DRYRUN=1 ')bash bench/gpu_prepare.sh here first (and carry .whl)"
    return 1
  }
  [[ -x "$(command -v "$PY")" ]] || { echo "no Python at $PY"; return 1; }
  export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE
  rm -rf "$SITE"
  step install 90 - "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
  step compile 60 - "$PY" -m compileall -q "$SITE"  # fresh processes are timed: no compiling in them
  # the installed kold, and nothing of the repo's, is what every step imports
  step kold-import 60 - "$PY" -c "
import kold, kold.snapshot.restorer, kold.runtime.server, sys
where = kold.__file__
print('kold from', where)
sys.exit(0 if where.startswith('$SITE/') else 'kold is imported from ' + where + ', not from $SITE')"
  if [[ "$(cat "$WHEELS/SOURCES" 2>/dev/null)" != "$(cd "$REPO" && bash bench/gpu_sources.sh)" ]]; then
    echo "WARNING: kold's wheel was not built from this tree's sources: rerun bench/gpu_prepare.sh"
    SUMMARY+=("kold's wheel: NOT built from this tree (rerun bench/gpu_prepare.sh)")
    STATUS=1
  fi
  echo "=== facts"
  facts
  PROBE_ARGS=()
  [[ $DRY == 1 ]] && PROBE_ARGS=(--dry-run --gib 0.25)
  step probe 90 probe.log "$PY" "$REPO/bench/gpu_pin_probe.py" "${PROBE_ARGS[@]}"

  # the restore's and the cold start's inputs (models, snapshots), made on the CPU while the tests run
  RESTORE_ARGS=(--device cuda --size "$SIZE" --runs "$RUNS" --methods "$METHODS")
  [[ $DRY == 1 ]] && RESTORE_ARGS+=(--dry-run)
  (cd "$WORK" && timeout 240 nice "$PY" "$REPO/bench/restore.py" "${RESTORE_ARGS[@]}" --prepare-only \
    >>"$OUT/restore.log" 2>&1; echo "inputs of the restore: rc $?" >>"$OUT/restore.log") &
  local prep_restore=$!
  (cd "$WORK" && timeout 240 nice "$PY" "$REPO/bench/coldstart.py" --sizes "$SIZE" --prepare-only \
    >>"$OUT/coldstart.log" 2>&1; echo "inputs of the cold start: rc $?" >>"$OUT/coldstart.log") &
  local prep_cold=$!

  # pytest's 5 ("no tests ran"): the module skipped for want of CUDA, right in a dry run, wrong there
  ALSO_OK=$([[ $DRY == 1 ]] && echo 5 || echo 0) step tests-snapshot 100 tests-snapshot.log "$PY" -m pytest -q \
    -p no:cacheprovider "$REPO/tests/snapshot/test_gpu.py"
  # the CUDA path's host-side logic on the CPU twin, from the installed kold on this machine's kernel
  step tests-twin 40 tests-snapshot.log "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/snapshot/test_gpu_twin.py"
  step tests-runtime 120 tests-runtime.log "$PY" -m pytest -q -p no:cacheprovider \
    "$REPO/tests/runtime/test_runtime_gpu.py"
  echo "=== waiting for the benchmark inputs ($(left) s of the budget left)"
  wait "$prep_restore"
  step restore 200 restore.log "$PY" "$REPO/bench/restore.py" "${RESTORE_ARGS[@]}"
  cp "$REPO/bench/out/restore-$SIZE-cuda.json" "$OUT/restore.json" 2>/dev/null
  local device_flag=(--device "$LATER_DEVICE")
  step tokens 60 tokens.log "$PY" "$REPO/bench/gpu_tokens.py" --model "$REPO/bench/out/$SIZE/model" \
    "${device_flag[@]}" $([[ $DRY == 1 ]] && echo --steps 8)
  wait "$prep_cold"
  if (( $(left) >= 60 )); then
    TAIL=20 step coldstart 150 coldstart.log "$PY" "$REPO/bench/coldstart.py" "${device_flag[@]}" --sizes "$SIZE" \
      --runs "$RUNS" --methods "$COLD_METHODS"
    local suffix=$([[ $LATER_DEVICE == cpu ]] && echo "" || echo "-$LATER_DEVICE")
    cat "$REPO/bench/out/coldstart/coldstart$suffix.json" >>"$OUT/coldstart.log" 2>/dev/null
  else
    echo "=== coldstart: skipped, $(left) s left (needs 60)"
    SUMMARY+=("coldstart: skipped (under 60 s left)")
  fi

  echo
  echo "=== summary ($((SECONDS - START)) s of ${BUDGET_S}; dry run: $DRY)"
  printf '  %s\n' "${SUMMARY[@]}"
  grep -hE '^(PASS|FAIL|SKIP) ' "$OUT/restore.log" "$OUT/coldstart.log" 2>/dev/null | sed 's/^/  /'
  grep -hE '^(prefill|decode) ' "$OUT/tokens.log" 2>/dev/null | sed 's/^/  /'
  [[ $DRY == 1 ]] && echo "  (dry run: CPU figures of the tiny model, which only show that each step runs)"
  local files
  files=$(find "$OUT" -type f | wc -l)
  echo "  $files files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  (( files <= 8 )) || { echo "  more than 8 files: the device tool brings back only 8"; STATUS=1; }
  rm -rf "$WORK"
  return $STATUS
}

main 2>&1 | tee -a "$OUT/run.log"
exit "${PIPESTATUS[0]}"
