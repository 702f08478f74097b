#!/usr/bin/env bash
# The main job: set up, then run the demo (publish SmolLM2-135M-Instruct, restore it several ways, print
# the timings, deploy it, and ask it a question cold and warm with the cold-start breakdown).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/kold demo "$@"
