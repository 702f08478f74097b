#!/usr/bin/env bash
# ruff + mypy. mypy cannot follow setuptools' folder mapping (kold.snapshot -> snapshot/), so it
# checks a throwaway tree of symlinks laid out as the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --check .; exit 1; }
rm -rf .typecheck && mkdir -p .typecheck/kold
for f in kold/*; do ln -s "../../$f" ".typecheck/kold/$(basename "$f")"; done
for d in snapshot runtime gateway controller loadgen knative; do ln -s "../../$d" ".typecheck/kold/$d"; done
.venv/bin/mypy --no-error-summary .typecheck/kold && echo "lint: ruff and mypy clean"
