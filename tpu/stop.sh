#!/usr/bin/env bash
# Stops every worker on every host (in-flight children are dropped; the run stays in the store).
set -euo pipefail
. "$(dirname "$0")/env.sh"
ssh_all "pkill -INT -f 'evojax-nas worker' || true; sleep 5; pkill -KILL -f 'evojax-nas worker' || true"
