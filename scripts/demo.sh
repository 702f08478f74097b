#!/usr/bin/env bash
# The main job: set up, then run the demo (make a model, publish it, restore it, print the timings).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/kold demo "$@"
