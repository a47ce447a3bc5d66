#!/usr/bin/env bash
# Deletes the TPU VM / pod slice (the run stays in its gs:// store).
set -euo pipefail
. "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
