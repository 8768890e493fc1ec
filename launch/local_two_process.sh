#!/usr/bin/env bash
# A multi-process run on this one machine, for testing the multi-host code paths without
# a pod: NUM_PROCESSES (2) CPU processes, each with DEVICES_PER_PROCESS (4) fake devices,
# joined by jax.distributed through a coordinator on localhost.
#
# Usage, from the repo root:
#   launch/local_two_process.sh
# which runs
#   CONFIG=digits:mcl_x2,smoke WORKDIR=workdirs/local_two_process PORT=12355 \
#     launch/local_two_process.sh [EXTRA_MAIN_FLAGS ...]
# Each process logs to $LOG_DIR/process_<id>.log. The script waits for all of them and
# exits non-zero if any fails; when one fails the others are killed at once (they would
# otherwise wait for it until the heartbeat timeout mcl-train sets, 60 s (--heartbeat_timeout_s;
# docs/LAUNCH.md, "A lost process"), and SIGTERM
# does not end them: JAX catches it as a preemption notice). DRY_RUN=1 prints the commands
# instead.
#
# A preemption drill: `kill -TERM <this script's pid>` passes SIGTERM to every process;
# they agree on a step, save a checkpoint there and exit 0, and the script waits for that
# before it exits (143). Running the same command again resumes from that step.
#
# Settings (environment variables):
#   CONFIG, WORKDIR, PORT                (defaults above)
#   NUM_PROCESSES (2), DEVICES_PER_PROCESS (4)
#   PYTHON     interpreter               (default .venv/bin/python, else python3)
#   LOG_DIR    (default $WORKDIR/launch_logs)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$SCRIPT_DIR/lib.sh"

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p;}' "$0"; exit 0 ;;
esac

CONFIG="${CONFIG:-digits:mcl_x2,smoke}"
WORKDIR="${WORKDIR:-workdirs/local_two_process}"
PORT="${PORT:-12355}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
LOG_DIR="${LOG_DIR:-$WORKDIR/launch_logs}"
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer."

cd "$REPO_ROOT"
PYTHON="$(default_python "$REPO_ROOT")"
# Inherited XLA_FLAGS are kept, except an earlier device count (e.g. from a test runner).
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

process_cmd() {
  # SLURM_* variables are dropped so that, inside an allocation, JAX's SLURM detection
  # does not override the explicit flags' device choice.
  local id=$1
  shift
  printf '%s\0' env -u SLURM_NTASKS -u SLURM_PROCID -u SLURM_LOCALID \
    XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu \
    "$PYTHON" -m mcl_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="localhost:$PORT" --num_processes="$NUM_PROCESSES" \
    --process_id="$id" "$@"
}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  print_cmd mkdir -p "$LOG_DIR"
  for ((id = 0; id < NUM_PROCESSES; id++)); do
    mapfile -d '' cmd < <(process_cmd "$id" "$@")
    printf '%s > %s 2>&1 &\n' "$(print_cmd "${cmd[@]}")" "$(print_cmd "$LOG_DIR/process_$id.log")"
  done
  echo "wait"
  exit 0
fi

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  die "needs bash >= 5.1 (wait -n -p); this is bash $BASH_VERSION."
fi

mkdir -p "$LOG_DIR"
declare -A process_of_pid=()
pids=()

# Sends signal $1 to every process still running.
stop_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    kill "-$1" "$pid" 2>/dev/null || true
  done
}

# SIGTERM or Ctrl-C to the script: the processes get SIGTERM (a preemption notice: save,
# then exit 0), and the script waits for them to finish saving.
# shellcheck disable=SC2317  # only the traps below call it
on_signal() {
  local code=$1 pid rc=0
  trap '' INT TERM
  log "signal received: every process saves a checkpoint and stops; rerun to resume."
  stop_all TERM
  for pid in ${pids[@]+"${pids[@]}"}; do
    wait "$pid" || rc=$?
  done
  ((rc == 0)) || log "a process exited with status $rc while stopping."
  exit "$code"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

for ((id = 0; id < NUM_PROCESSES; id++)); do
  mapfile -d '' cmd < <(process_cmd "$id" "$@")
  log "process $id: $(print_cmd "${cmd[@]}") > $LOG_DIR/process_$id.log"
  "${cmd[@]}" > "$LOG_DIR/process_$id.log" 2>&1 &
  pids+=("$!")
  process_of_pid[$!]=$id
done

status=0
while ((${#pids[@]} > 0)); do
  finished=""
  rc=0
  wait -n -p finished "${pids[@]}" || rc=$?
  [[ -n "$finished" ]] || break  # Nothing left to wait for.
  remaining=()
  for pid in "${pids[@]}"; do
    [[ "$pid" == "$finished" ]] || remaining+=("$pid")
  done
  pids=(${remaining[@]+"${remaining[@]}"})
  id="${process_of_pid[$finished]}"
  if ((rc != 0)); then
    log "process $id failed (exit $rc); last lines of $LOG_DIR/process_$id.log:"
    tail -n 20 "$LOG_DIR/process_$id.log" >&2 || true
    if ((status == 0)); then
      status=$rc
      if ((${#pids[@]} > 0)); then
        log "stopping the other processes."
        stop_all KILL
      fi
    fi
  else
    log "process $id finished."
  fi
done
if ((status == 0)); then
  log "all $NUM_PROCESSES processes succeeded."
fi
exit "$status"
