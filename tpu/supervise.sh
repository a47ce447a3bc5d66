#!/usr/bin/env bash
# Keeps a command running (on a TPU host: `evojax-nas worker STORE --workers auto --restart`,
# which starts one worker process per chip and restarts one that dies; this loop restarts the
# whole if it exits with an error). Stops when the command succeeds (its budget is done) or on
# SIGTERM / SIGINT, which it passes on to the command as SIGTERM (`evojax-nas worker` then
# interrupts its workers: they stop cleanly). Not SIGINT: a shell starts background commands
# with SIGINT ignored, and an ignored signal stays ignored in every process started from it.
# Usage: tpu/supervise.sh COMMAND [ARGS…]     (DELAY: seconds between restarts, default 10)
set -uo pipefail
if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
child=
stop() {
  if [ -n "$child" ]; then
    kill -TERM "$child" 2> /dev/null
    wait "$child"
  fi
  exit 0
}
trap stop INT TERM
while :; do
  "$@" &
  child=$!
  wait "$child"
  code=$?
  child=
  if [ "$code" -eq 0 ]; then exit 0; fi
  echo "$(date -u +%FT%TZ) supervise: exit code $code; restarting in ${DELAY:-10} s" >&2
  sleep "${DELAY:-10}" &
  wait $!
done
