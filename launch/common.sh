# shellcheck shell=bash
# Helpers sourced by launch/tpu_vm.sh and launch/gpu_host.sh: argument checks and a dry-run aware
# command runner. Kept to bash 3.2 features so the scripts also run from a macOS laptop.

DRY_RUN=0
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
SECRET_NAMES="GEMINI_API_KEY OPENAI_API_KEY HF_TOKEN"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# require VAR HOW: stop (before anything has run) when the setting VAR is empty.
require() {
  [[ -n "${!1:-}" ]] || die "missing $2"
}

# check_safe_path VALUE WHAT: paths go into remote shell commands, so only plain characters pass.
check_safe_path() {
  [[ $1 =~ ^[A-Za-z0-9_./:@+-]+$ ]] || die "$2 '$1' has characters other than letters, digits and _./:@+-"
}

# The printed form of one argument: bare when the shell would read it unchanged, else single-quoted.
quote_arg() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Replace secret values (and NAME=value assignments of secret names) with *** in a printed line.
mask_secrets() {
  local line=$1 name value
  for name in $SECRET_NAMES; do
    value=${!name:-}
    if [[ -n $value ]]; then
      line=${line//"$value"/***}
    fi
    line=$(printf '%s\n' "$line" | sed -E "s/(${name}=)[^ '\"]*/\\1***/g")
  done
  printf '%s\n' "$line"
}

# show_cmd ARGS...: the command as one line that can be pasted into a shell.
show_cmd() {
  local out="" arg
  for arg in "$@"; do
    out+="$(quote_arg "$arg") "
  done
  mask_secrets "${out% }"
}

# run ARGS...: print the command on stdout and stop there under --dry-run; otherwise echo it to
# stderr (as bash -x would) and execute it.
run() {
  if ((DRY_RUN)); then
    show_cmd "$@"
    return 0
  fi
  echo "+ $(show_cmd "$@")" >&2
  "$@"
}

# repo_relative FILE: the path of an existing FILE relative to the repository root; empty when the
# file lies outside it.
repo_relative() {
  local dir rel
  dir=$(cd "$(dirname "$1")" && pwd -P) || return 0
  case "$dir/" in
    "$REPO_ROOT"/*)
      rel="${dir#"$REPO_ROOT"}/$(basename "$1")"
      printf '%s\n' "${rel#/}"
      ;;
  esac
}

# flagfile_value FILE NAME: the last --NAME=value line of an absl flag file (empty if none).
flagfile_value() {
  sed -n "s/^--$2=//p" "$1" | tail -n 1
}
