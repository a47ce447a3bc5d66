#!/usr/bin/env bash
# Prints the run's state every minute (from this machine: needs only the store's address), and
# each host's worker processes and the tail of its log every EVERY_HOSTS-th time (default 10).
# Usage: STORE=gs://BUCKET/run1 tpu/watch.sh [--dry-run]
set -euo pipefail
# shellcheck source=tpu/env.sh
. "$(dirname "$0")/env.sh"
need_store
hosts="cd ~/evojax_nas && echo \$(hostname): \$(pgrep -fc '[e]vojax-nas worker') worker processes && tail -n 2 logs/workers.log"
if [ -n "$DRY_RUN" ]; then
  echo "# every ${EVERY:-60} s: evojax-nas status $STORE"
  ssh_hosts "$hosts"
  exit 0
fi
i=0
while true; do
  evojax-nas status "$STORE"
  if [ $((i % ${EVERY_HOSTS:-10})) -eq 0 ]; then ssh_hosts "$hosts" || true; fi
  i=$((i + 1))
  echo
  sleep "${EVERY:-60}"
done
