#!/usr/bin/env bash
# Run N JAX processes on this machine over loopback, each with K fake CPU devices: a real multi-host
# run (jax.distributed + gloo collectives, one data shard per process, one checkpoint written by all
# processes) on a laptop or CI box. Also the way to use several CPU sockets as separate "hosts".
#
#   launch/local_multiprocess.sh [options] [--] TRAIN_ARGS...
#   launch/local_multiprocess.sh -n 2 -d 2 -- --config configs/tiny.py --set paths.work_dir=runs/mp
#
# Options:
#   -n, --num-processes N       processes to start (default 2)
#   -d, --devices-per-process K fake CPU devices per process (default 2)
#   -p, --port PORT             coordinator port on 127.0.0.1 (default $NOTELLM_PORT or 12321)
#   -l, --log-dir DIR           per-process logs DIR/process_<i>.log (default runs/local_multiprocess)
#   -m, --module MODULE         python module to run (default notellm_jax.train; another command:
#                               -m notellm_jax -- embed --config ...)
#       --dry-run               print the exact commands instead of running them
#
# Each process gets NOTELLM_COORDINATOR=127.0.0.1:PORT, NOTELLM_NUM_PROCESSES=N, NOTELLM_PROCESS_ID=i
# (read by notellm_jax.distributed.init_distributed), JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=K (any earlier device count in XLA_FLAGS is dropped).
# PYTHON selects the interpreter (default .venv/bin/python if present, else python3).
# The script waits for every process; if one fails, the others are stopped (they would otherwise
# block in a collective), its log tail is printed, and the script exits with that process's status.
# Needs bash >= 5.1 (`wait -n -p`).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

NUM_PROCESSES=2
DEVICES=2
PORT="${NOTELLM_PORT:-12321}"
LOG_DIR="runs/local_multiprocess"
MODULE="notellm_jax.train"
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) NUM_PROCESSES="$2"; shift 2 ;;
    -d|--devices-per-process) DEVICES="$2"; shift 2 ;;
    -p|--port) PORT="$2"; shift 2 ;;
    -l|--log-dir) LOG_DIR="$2"; shift 2 ;;
    -m|--module) MODULE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
for value in "$NUM_PROCESSES" "$DEVICES" "$PORT"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "local_multiprocess.sh: expected a positive integer, got '$value' (see --help)" >&2
    exit 2
  fi
done
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=".venv/bin/python"; else PYTHON="python3"; fi
fi

# XLA_FLAGS without any device count the caller set (e.g. pytest's 8 fake devices), plus ours.
xla_flags=""
read -ra caller_flags <<<"${XLA_FLAGS:-}"
for flag in "${caller_flags[@]}"; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$DEVICES"

# COMMAND := the command line of process $1 (the remaining arguments go to the module).
build_command() {
  local id="$1"
  shift
  COMMAND=(env "NOTELLM_COORDINATOR=127.0.0.1:$PORT" "NOTELLM_NUM_PROCESSES=$NUM_PROCESSES"
    "NOTELLM_PROCESS_ID=$id" "JAX_PLATFORMS=cpu" "XLA_FLAGS=$xla_flags" "$PYTHON" -m "$MODULE" "$@")
}

if [[ "$DRY_RUN" == 1 ]]; then
  command_line mkdir -p "$LOG_DIR"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    build_command "$i" "$@"
    echo "$(command_line "${COMMAND[@]}") > $(quote "$LOG_DIR/process_$i.log") 2>&1 &"
  done
  echo "wait  # all $NUM_PROCESSES processes; non-zero exit if any fails"
  exit 0
fi

mkdir -p "$LOG_DIR"
declare -A process_of=()
stop_all() {
  for pid in "${!process_of[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_command "$i" "$@"
  "${COMMAND[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  process_of[$!]=$i
  echo "[local_multiprocess] process $i: pid $!, log $LOG_DIR/process_$i.log"
done

status=0
while [[ ${#process_of[@]} -gt 0 ]]; do
  finished=""
  code=0
  wait -n -p finished "${!process_of[@]}" || code=$?
  i="${process_of[$finished]}"
  unset "process_of[$finished]"
  if [[ "$code" -ne 0 && "$status" -eq 0 ]]; then
    status="$code"
    echo "[local_multiprocess] process $i failed (exit $code); stopping the others. Last lines of its log:" >&2
    tail -n 30 "$LOG_DIR/process_$i.log" >&2
    stop_all
  fi
done
if [[ "$status" -eq 0 ]]; then
  echo "[local_multiprocess] all $NUM_PROCESSES processes finished OK"
fi
exit "$status"
