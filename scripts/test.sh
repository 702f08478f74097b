#!/usr/bin/env bash
# The test command: set up, lint and type-check, then run the test suite (benchmarks are not part of it).
# The suite starts what it needs itself: a private redis-server (kold up's code; KOLD_TEST_REDIS_URL
# points it at another one instead) and an S3 server on loopback. Nothing needs to run beforehand, and a
# skipped test fails the run unless it is marked `gpu` (tests/skip_policy.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/python -m pytest -q "$@"
