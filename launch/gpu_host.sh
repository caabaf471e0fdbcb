#!/usr/bin/env bash
# Run undo_jax on one machine with any number of NVIDIA GPUs: one process drives all of them.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_host.sh COMMAND [options]

Commands:
  setup   make a venv with jax[cuda12] and this checkout (editable, with the gemini extra, pinned by
          constraints.txt)
  run     run undo_jax.main with the flag file; output goes to the terminal and the log file
  all     setup, then run

Options (environment variable in brackets):
  --flagfile=FILE    absl flag file, e.g. configs/svamp.cfg [FLAGFILE]
  --python=PYTHON    interpreter for the venv, Python >= 3.11 (default python3) [PYTHON]
  --venv=DIR         venv folder (default .venv in the repository) [VENV]
  --gpus=LIST        GPUs to use, e.g. 0,1 (default: all) [CUDA_VISIBLE_DEVICES]
  --log=FILE         log file, appended to (default runs/undo_jax-DATE.log) [LOG_FILE]
  --env-file=FILE    KEY=VALUE lines (e.g. GEMINI_API_KEY) loaded before the run [ENV_FILE]
  --dry-run          print the commands, one per line, and run nothing
EOF
}

FLAGFILE=${FLAGFILE:-}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$REPO_ROOT/.venv}
GPUS=${CUDA_VISIBLE_DEVICES:-}
LOG_FILE=${LOG_FILE:-}
ENV_FILE=${ENV_FILE:-}

COMMAND=${1:-}
[[ -n $COMMAND ]] || die "missing command (setup|run|all); see --help"
shift
for arg in "$@"; do
  case $arg in
    --flagfile=*) FLAGFILE=${arg#*=} ;;
    --python=*) PYTHON=${arg#*=} ;;
    --venv=*) VENV=${arg#*=} ;;
    --gpus=*) GPUS=${arg#*=} ;;
    --log=*) LOG_FILE=${arg#*=} ;;
    --env-file=*) ENV_FILE=${arg#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$arg'; see --help" ;;
  esac
done
case $COMMAND in
  setup | run | all) ;;
  -h | --help) usage; exit 0 ;;
  *) die "unknown command '$COMMAND' (setup|run|all)" ;;
esac

# --- every check happens here, before the first command runs -----------------------------------
require VENV "venv folder (pass --venv=DIR or set VENV)"
if [[ $COMMAND != run ]]; then
  require PYTHON "Python interpreter (pass --python=PYTHON or set PYTHON)"
  command -v "$PYTHON" >/dev/null || die "Python interpreter '$PYTHON' not found (pass --python=PYTHON)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "'$PYTHON' is older than Python 3.11, which JAX needs (pass --python=python3.11)"
fi
if [[ $COMMAND != setup ]]; then
  require FLAGFILE "flag file (pass --flagfile=FILE or set FLAGFILE)"
  [[ -f $FLAGFILE ]] || die "flag file '$FLAGFILE' does not exist"
  if [[ $COMMAND == run && ! -x $VENV/bin/python ]]; then
    die "no venv at '$VENV' (run '$0 setup' first or pass --venv=DIR)"
  fi
  if [[ -n $ENV_FILE && ! -f $ENV_FILE ]]; then
    die "env file '$ENV_FILE' does not exist"
  fi
  LOG_FILE=${LOG_FILE:-runs/undo_jax-$(date +%Y%m%d-%H%M%S).log}
fi

do_setup() {
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # The gemini extra (google-genai) is what the configs' teacher needs; the pins keep the tested versions.
  run "$VENV/bin/python" -m pip install --quiet -e "${REPO_ROOT}[gemini]" "jax[cuda12]" -c "${REPO_ROOT}/constraints.txt"
}

do_run() {
  # Defaults only where the caller set nothing: JAX may take 90% of each GPU's memory (the KV
  # cache and optimizer state are large), XLA overlaps collectives with compute across GPUs, and
  # NCCL reports only problems.
  local xla_flags=${XLA_FLAGS:-}
  if [[ $xla_flags != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
    xla_flags="${xla_flags:+$xla_flags }--xla_gpu_enable_latency_hiding_scheduler=true"
  fi
  local env_vars=(
    "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
    "XLA_FLAGS=$xla_flags"
    "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
  )
  [[ -z $GPUS ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$GPUS")
  local cmd=(env "${env_vars[@]}" "$VENV/bin/python" -m undo_jax.main "--flagfile=$FLAGFILE")

  run mkdir -p "$(dirname "$LOG_FILE")"
  # Secrets come from the env file into this shell's environment, never onto a command line.
  if [[ -n $ENV_FILE ]]; then
    if ((DRY_RUN)); then
      echo "set -a; . $(quote_arg "$ENV_FILE"); set +a"
    else
      set -a
      # shellcheck disable=SC1090
      . "$ENV_FILE"
      set +a
    fi
  fi
  if ((DRY_RUN)); then
    echo "$(show_cmd "${cmd[@]}") 2>&1 | tee -a $(quote_arg "$LOG_FILE")"
  else
    echo "+ $(show_cmd "${cmd[@]}") 2>&1 | tee -a $(quote_arg "$LOG_FILE")" >&2
    "${cmd[@]}" 2>&1 | tee -a "$LOG_FILE"
  fi
}

case $COMMAND in
  setup) do_setup ;;
  run) do_run ;;
  all)
    do_setup
    do_run
    ;;
esac
