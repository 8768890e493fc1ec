# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, not run.
#
# DRY_RUN=1: `run` prints each command (one line, shell-quoted so it can be pasted back)
# on stdout instead of running it; messages for people go to stderr. This is how the
# scripts are checked on machines without gcloud, a TPU or SLURM (tests/test_launch.py).

# Prints a command as one line: arguments made only of safe characters stay bare, the
# others are quoted the way bash reads them back ('...' or $'...').
print_cmd() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$arg")
    else
      out+=("${arg@Q}")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# Runs a command, or only prints it when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    print_cmd "$@"
  else
    "$@"
  fi
}

# Quotes arguments for a remote shell (gcloud ... --command=STRING).
quote_args() {
  local out=() arg
  for arg in "$@"; do
    out+=("$(printf '%q' "$arg")")
  done
  printf '%s' "${out[*]}"
}

log() {
  printf '[%s] %s\n' "$(basename "$0")" "$*" >&2
}

die() {
  log "error: $*"
  exit 2
}

# The Python to run: $PYTHON if set, else the repo's .venv if it has one, else python3.
default_python() {
  local repo_root=$1
  if [[ -n "${PYTHON:-}" ]]; then
    printf '%s' "$PYTHON"
  elif [[ -x "$repo_root/.venv/bin/python" ]]; then
    printf '%s' ".venv/bin/python"
  else
    printf '%s' "python3"
  fi
}
