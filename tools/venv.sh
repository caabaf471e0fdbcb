# shellcheck shell=bash
# Sourced by tools/demo.sh and tools/test.sh: use the active virtual environment, or create and activate the
# project's own (.venv, or $UNDO_VENV), so `pip install` also works where the system Python refuses it (PEP 668).
if [ -z "${VIRTUAL_ENV:-}" ] && ! python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
  venv="${UNDO_VENV:-.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating the project virtual environment $venv" >&2
    python3 -m venv "$venv" || { echo "error: 'python3 -m venv $venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
