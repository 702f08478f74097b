#!/usr/bin/env bash
# Runs HERE (it needs the network): the wheels bench/gpu_run.sh installs on the lent GPU machine, which
# has none. The packages kold needs that the machine's image lacks (bench/gpu_wheels.py works them out
# from this checkout's .venv, at the versions tested here) for CPython 3.12 on manylinux x86-64, and
# kold's own wheel, into the git-ignored .whl/ that the `device` tool carries (64 MiB at most).
#
#   bash bench/gpu_prepare.sh                  # .whl/: the device's set (cp312)
#   GPU_DRYRUN=1 bash bench/gpu_prepare.sh     # the dry run's: a cp311 set and a Python here with only
#                                              # the image's packages, under /tmp/kold-gpu-dryrun
#
# Never install kold[gpu] there: its cupy-cuda12x would shadow the image's cupy-cuda13x.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MAX_MIB=60  # the tool carries 64 MiB with the working tree; keep room for it

if [[ "${GPU_DRYRUN:-0}" == 1 ]]; then
  root=/tmp/kold-gpu-dryrun
  version=3.11
  dest=$root/whl
else
  version=3.12
  dest=.whl
fi
[[ -x $PY ]] || { echo "no $PY: run scripts/setup.sh first" >&2; exit 1; }
if [[ "$(uname -m)" != x86_64 ]]; then
  echo "note: this machine is $(uname -m); the wheels are x86-64 (the device's), the dry run needs x86-64" >&2
fi

rm -rf "$dest"
mkdir -p "$dest"
mapfile -t pins < <($PY bench/gpu_wheels.py pins "$version")
echo "downloading ${#pins[@]} wheels for CPython $version, manylinux x86-64: ${pins[*]}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
  manylinux_2_5_x86_64 any; do
  platforms+=(--platform "$p")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d "$dest" "${pins[@]}"

# kold itself: pure Python, one wheel for every version; built from a clean copy of the tracked and
# untracked-not-ignored files, so no build/ or egg-info lands in the working tree
src=$(mktemp -d /tmp/kold-wheel-src.XXXXXX)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src" 2>/dev/null || true
$PY -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$src"
# what the wheel was built from, for gpu_run.sh to check against the tree it runs in
(cd "$src" && bash bench/gpu_sources.sh) >"$dest/SOURCES"

# one version of each, and the set within the carry limit
dupes=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
[[ -z "$dupes" ]] || { echo "two versions of: $dupes" >&2; exit 1; }
size_mib=$(( $(du -cb "$dest"/*.whl | tail -1 | cut -f1) / 1048576 ))
ls -1 "$dest"
echo "$(ls "$dest"/*.whl | wc -l) wheels, ${size_mib} MiB in $dest"
(( size_mib <= MAX_MIB )) || { echo "over ${MAX_MIB} MiB: the device tool would refuse the working tree" >&2; exit 1; }

if [[ "${GPU_DRYRUN:-0}" == 1 ]]; then
  python=$($PY bench/gpu_wheels.py image-python "$root/python")
  echo "dry-run Python with the image's packages only: $python"
  echo "next: GPU_DRYRUN=1 bash bench/gpu_run.sh"
else
  echo "next: one device call: command 'bash bench/gpu_run.sh', carry ['.whl'], timeout_s 480"
fi
