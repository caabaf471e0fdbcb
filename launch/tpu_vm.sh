#!/usr/bin/env bash
# Run undo_jax on a Cloud TPU VM (one host or a pod slice) with gcloud. See BUILD_NOTES.md (launch section).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [options]

Commands (each runs on every worker of the slice unless noted):
  create   create the TPU VM                      needs --name --zone --accelerator-type [--version]
  install  ship HEAD of this checkout, make a Python 3.11 venv with jax[tpu] and the project (gemini extra,
           pinned by constraints.txt)
  run      copy the flag file (and env file), run undo_jax.main on all workers, stream worker logs
  logs     follow the log of one worker (--worker=N, default 0) of a running or finished run
  stop     stop the run on all workers
  fetch    copy the run directory back (scp from worker 0, or gsutil for a gs:// run directory)
  delete   delete the TPU VM
  all      create, install, run, fetch, delete

Options (environment variable in brackets):
  --name=NAME               TPU VM name [TPU_NAME]
  --zone=ZONE               zone, e.g. us-central2-b [TPU_ZONE]
  --project=PROJECT         GCP project (default: gcloud's configured one) [TPU_PROJECT]
  --accelerator-type=TYPE   e.g. v5litepod-8, v4-32 [TPU_TYPE]
  --version=RUNTIME         TPU software version (default from the type) [TPU_RUNTIME]
  --spot                    create a Spot TPU VM
  --flagfile=FILE           absl flag file inside this repository, e.g. configs/svamp.cfg [FLAGFILE]
  --env-file=FILE           KEY=VALUE lines (e.g. GEMINI_API_KEY) sourced on the workers [ENV_FILE]
  --run-dir=DIR             run directory to fetch, relative to the repo on the worker or gs://...
                            (default: the flag file's --run_dir) [RUN_DIR]
  --dest=DIR                local folder that receives the run directory (default fetched/NAME)
  --worker=N                worker for `logs` (default 0)
  --dry-run                 print the commands, one per line, and run nothing
EOF
}

# Layout on every worker, relative to the login user's home directory.
REMOTE_REPO=undo_jax
REMOTE_VENV=undo_jax_venv
REMOTE_ARCHIVE=undo_jax.tar.gz
REMOTE_ENV=undo_jax.env
REMOTE_LOG=undo_jax_run.log
REMOTE_PID=undo_jax_run.pid
PYTHON_VERSION=3.11

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_PROJECT=${TPU_PROJECT:-}
TPU_TYPE=${TPU_TYPE:-}
TPU_RUNTIME=${TPU_RUNTIME:-}
FLAGFILE=${FLAGFILE:-}
ENV_FILE=${ENV_FILE:-}
RUN_DIR=${RUN_DIR:-}
DEST=""
WORKER=0
SPOT=0

COMMAND=${1:-}
[[ -n $COMMAND ]] || die "missing command (create|install|run|logs|stop|fetch|delete|all); see --help"
shift
for arg in "$@"; do
  case $arg in
    --name=*) TPU_NAME=${arg#*=} ;;
    --zone=*) TPU_ZONE=${arg#*=} ;;
    --project=*) TPU_PROJECT=${arg#*=} ;;
    --accelerator-type=*) TPU_TYPE=${arg#*=} ;;
    --version=*) TPU_RUNTIME=${arg#*=} ;;
    --spot) SPOT=1 ;;
    --flagfile=*) FLAGFILE=${arg#*=} ;;
    --env-file=*) ENV_FILE=${arg#*=} ;;
    --run-dir=*) RUN_DIR=${arg#*=} ;;
    --dest=*) DEST=${arg#*=} ;;
    --worker=*) WORKER=${arg#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$arg'; see --help" ;;
  esac
done

case $COMMAND in
  create | install | run | logs | stop | fetch | delete | all) ;;
  -h | --help) usage; exit 0 ;;
  *) die "unknown command '$COMMAND' (create|install|run|logs|stop|fetch|delete|all)" ;;
esac
wants() { [[ $COMMAND == "$1" || $COMMAND == all ]]; }

# The software version that matches each TPU generation (Cloud TPU docs, "TPU software versions").
default_runtime() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

# --- every check happens here, before the first command runs -----------------------------------
require TPU_NAME "TPU VM name (pass --name=NAME or set TPU_NAME)"
require TPU_ZONE "zone (pass --zone=ZONE or set TPU_ZONE)"
check_safe_path "$TPU_NAME" "TPU VM name"
if wants create; then
  require TPU_TYPE "accelerator type (pass --accelerator-type=TYPE, e.g. v4-32, or set TPU_TYPE)"
  [[ $TPU_TYPE != v5e-* ]] || die "accelerator type '$TPU_TYPE': gcloud calls v5e 'v5litepod-N'"
  TPU_RUNTIME=${TPU_RUNTIME:-$(default_runtime "$TPU_TYPE")}
  require TPU_RUNTIME "TPU software version for '$TPU_TYPE' (pass --version=RUNTIME or set TPU_RUNTIME)"
fi
if wants install; then
  git -C "$REPO_ROOT" rev-parse --verify -q HEAD >/dev/null || die "$REPO_ROOT is not a git checkout with a commit"
fi
if wants run; then
  require FLAGFILE "flag file (pass --flagfile=FILE or set FLAGFILE)"
  [[ -f $FLAGFILE ]] || die "flag file '$FLAGFILE' does not exist"
  FLAGFILE_IN_REPO=$(repo_relative "$FLAGFILE")
  [[ -n $FLAGFILE_IN_REPO ]] || die "flag file '$FLAGFILE' is outside the repository $REPO_ROOT"
  check_safe_path "$FLAGFILE_IN_REPO" "flag file path"
  if [[ -n $ENV_FILE ]]; then
    [[ -f $ENV_FILE ]] || die "env file '$ENV_FILE' does not exist"
  fi
fi
if [[ $COMMAND == logs ]]; then
  [[ $WORKER =~ ^[0-9]+$ ]] || die "worker '$WORKER' is not a worker number (--worker=N)"
fi
if wants fetch; then
  if [[ -z $RUN_DIR && -n $FLAGFILE && -f $FLAGFILE ]]; then
    RUN_DIR=$(flagfile_value "$FLAGFILE" run_dir)
  fi
  require RUN_DIR "run directory (pass --run-dir=DIR, set RUN_DIR, or put --run_dir= in the flag file)"
  check_safe_path "$RUN_DIR" "run directory"
  DEST=${DEST:-fetched/$TPU_NAME}
  FETCHED="$DEST/$(basename "$RUN_DIR")"
  [[ ! -e $FETCHED ]] || die "$FETCHED already exists; move it away or pass --dest=DIR"
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$TPU_ZONE")
[[ -z $TPU_PROJECT ]] || WHERE+=("--project=$TPU_PROJECT")

on_all_workers() { run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all "--command=$1"; }

do_create() {
  local extra=()
  if ((SPOT)); then extra+=(--spot); fi
  run "${GCLOUD_TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" "--accelerator-type=$TPU_TYPE" \
    "--version=$TPU_RUNTIME" ${extra[@]+"${extra[@]}"}
}

do_install() {
  local archive="${TMPDIR:-/tmp}/undo_jax-$TPU_NAME.tar.gz"
  if ! ((DRY_RUN)) && [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    echo "$(basename "$0"): warning: uncommitted changes are not shipped (install sends HEAD)" >&2
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$archive" HEAD
  run "${GCLOUD_TPU[@]}" scp "$archive" "$TPU_NAME:$REMOTE_ARCHIVE" "${WHERE[@]}" --worker=all
  # Unpacking over an existing checkout keeps runs/ and caches that live inside it. uv provides
  # Python 3.11 (the TPU images ship 3.10) and resolves jax[tpu] against the project's pins.
  on_all_workers "mkdir -p $REMOTE_REPO && tar -xzf $REMOTE_ARCHIVE -C $REMOTE_REPO \
&& python3 -m pip install --user --quiet --upgrade uv \
&& ~/.local/bin/uv venv --allow-existing --python $PYTHON_VERSION $REMOTE_VENV \
&& ~/.local/bin/uv pip install --python $REMOTE_VENV/bin/python --quiet -e \"./${REMOTE_REPO}[gemini]\" \"jax[tpu]\" \
-c ./$REMOTE_REPO/constraints.txt"
}

do_run() {
  run "${GCLOUD_TPU[@]}" scp "$FLAGFILE" "$TPU_NAME:$REMOTE_REPO/$FLAGFILE_IN_REPO" "${WHERE[@]}" --worker=all
  if [[ -n $ENV_FILE ]]; then
    run "${GCLOUD_TPU[@]}" scp "$ENV_FILE" "$TPU_NAME:$REMOTE_ENV" "${WHERE[@]}" --worker=all
  fi
  # The job runs under nohup with its output in a log file, so a dropped ssh connection does not
  # kill it (`logs` re-attaches); tail --pid streams that log and ends when the job does, and
  # `wait` hands the job's exit status back through ssh. Each run appends to its own dated log;
  # $REMOTE_LOG links to the latest.
  on_all_workers "cd $REMOTE_REPO || exit 1; \
if [ -f ../$REMOTE_PID ] && kill -0 \"\$(cat ../$REMOTE_PID)\" 2>/dev/null; then \
echo \"undo_jax is already running on \$(hostname)\" >&2; exit 1; fi; \
if [ -f ../$REMOTE_ENV ]; then chmod 600 ../$REMOTE_ENV; set -a; . ../$REMOTE_ENV; set +a; fi; \
log=undo_jax_run.\$(date +%Y%m%d-%H%M%S).log; ln -sfn \$log ../$REMOTE_LOG; \
nohup ../$REMOTE_VENV/bin/python -m undo_jax.main --flagfile=$FLAGFILE_IN_REPO >>../\$log 2>&1 </dev/null & \
pid=\$!; echo \$pid >../$REMOTE_PID; tail -n +1 -F --pid=\$pid ../\$log; wait \$pid"
}

do_logs() {
  run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" "--worker=$WORKER" \
    "--command=tail -n +1 -F --pid=\"\$(cat $REMOTE_PID)\" $REMOTE_LOG"
}

do_stop() {
  on_all_workers "if [ -f $REMOTE_PID ]; then kill \"\$(cat $REMOTE_PID)\" 2>/dev/null || true; fi"
}

do_fetch() {
  run mkdir -p "$DEST"
  if [[ $RUN_DIR == gs://* ]]; then
    run gsutil -m cp -r "$RUN_DIR" "$DEST"
  else
    # Process 0 writes the run directory (undo_jax.distributed.is_primary), so worker 0 has it all.
    local remote=$RUN_DIR
    [[ $remote == /* ]] || remote="$REMOTE_REPO/$RUN_DIR"
    run "${GCLOUD_TPU[@]}" scp --recurse "$TPU_NAME:$remote" "$DEST" "${WHERE[@]}" --worker=0
  fi
}

do_delete() {
  run "${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
}

if [[ $COMMAND == all ]]; then
  # A failed step leaves the VM up for inspection; say how to delete it (it bills until then).
  trap 'status=$?; if ((status)); then echo "$(basename "$0"): stopped; TPU VM $TPU_NAME may still be up \
(delete it: $0 delete --name=$TPU_NAME --zone=$TPU_ZONE)" >&2; fi' EXIT
  do_create
  do_install
  do_run
  do_fetch
  do_delete
else
  "do_$COMMAND"
fi
