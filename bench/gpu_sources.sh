#!/usr/bin/env bash
# A short hash of kold's Python sources in the current directory (a checkout, or a copy of one):
# bench/gpu_prepare.sh stores it beside kold's wheel and bench/gpu_run.sh compares it with the tree it
# runs in, so tests from one tree never run against a kold built from another.
set -euo pipefail
find kold snapshot runtime gateway controller loadgen -name '*.py' -type f 2>/dev/null | LC_ALL=C sort \
  | xargs sha256sum | sha256sum | cut -c1-16
