#!/usr/bin/env bash
# Creates the run in the gs:// store (if it is new) and starts the workers on every host: one
# worker process per chip (`evojax-nas worker --workers auto` gives each its own chip), kept
# running by tpu/supervise.sh. Workers coordinate only through the store.
# Usage: STORE=gs://BUCKET/run1 CONFIG=paper tpu/start.sh [--dry-run]
#        [DATA_DIR=data (the archive install.sh copied) | DATA_DIR=gs://BUCKET/tfds]
set -euo pipefail
# shellcheck source=tpu/env.sh
. "$(dirname "$0")/env.sh"
need_store
config=${CONFIG:-paper}
data=${DATA_DIR:+ --data-dir $DATA_DIR}
# The config is written once, from host 0; every worker reads it from the store.
ssh_hosts "cd ~/evojax_nas && .venv/bin/evojax-nas evolve --out $STORE --config $config$data --create-only" 0
ssh_hosts "cd ~/evojax_nas && mkdir -p logs && (nohup tpu/supervise.sh .venv/bin/evojax-nas worker $STORE --workers auto --restart > logs/workers.log 2>&1 < /dev/null & echo \$! > logs/supervise.pid) && sleep 20 && tail -n 5 logs/workers.log"
