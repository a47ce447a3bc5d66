#!/usr/bin/env bash
# Creates the run in the gs:// store (if it is new) and starts one worker per chip on every host.
# Workers coordinate only through the store: no collectives, no barriers.
# Usage: STORE=gs://BUCKET/run1 CONFIG=paper tpu/start.sh   [DATA_DIR=gs://BUCKET/tfds]
set -euo pipefail
. "$(dirname "$0")/env.sh"
need_store
config=${CONFIG:-paper}
data=${DATA_DIR:+--data-dir $DATA_DIR}
# The config is written once, from here; every worker reads it from the store.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command \
  "cd ~/evojax_nas && .venv/bin/evojax-nas evolve --out $STORE --config $config $data --create-only"
# One single-chip JAX process per chip (TPU_VISIBLE_CHIPS), each its own PJRT client.
ssh_all "cd ~/evojax_nas && mkdir -p logs && for i in \$(seq 0 $((CHIPS - 1))); do \
  TPU_VISIBLE_CHIPS=\$i TPU_CHIPS_PER_PROCESS_BOUNDS=1,1,1 TPU_PROCESS_BOUNDS=1,1,1 \
  TPU_PROCESS_PORT=\$((8476 + i)) nohup .venv/bin/evojax-nas worker $STORE \
  > logs/worker-\$i.log 2>&1 & done; sleep 2; pgrep -fc 'evojax-nas worker'"
