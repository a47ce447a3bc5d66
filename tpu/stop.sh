#!/usr/bin/env bash
# Stops the workers on every host: the supervisor passes SIGINT to them (in-flight children are
# dropped; the run stays in the store).
# Usage: tpu/stop.sh [--dry-run]
set -euo pipefail
# shellcheck source=tpu/env.sh
. "$(dirname "$0")/env.sh"
ssh_hosts "cd ~/evojax_nas && if [ -f logs/supervise.pid ]; then kill -TERM \$(cat logs/supervise.pid) 2> /dev/null; sleep 20; rm -f logs/supervise.pid; fi; pgrep -fc '[e]vojax-nas worker' || true"
