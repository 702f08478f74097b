#!/usr/bin/env bash
# The test command: set up, lint and type-check, then run the test suite (benchmarks are not part of it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/python -m pytest -q "$@"
