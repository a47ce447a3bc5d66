#!/usr/bin/env bash
# Prints the run's state every minute (from this machine: needs only the store's address).
# Usage: STORE=gs://BUCKET/run1 tpu/watch.sh
set -euo pipefail
. "$(dirname "$0")/env.sh"
need_store
while true; do evojax-nas status "$STORE"; echo; sleep "${EVERY:-60}"; done
