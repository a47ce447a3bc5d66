#!/usr/bin/env bash
# Creates the TPU VM (or pod slice). Usage: TPU_TYPE=v4-32 tpu/create.sh
set -euo pipefail
. "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
  --accelerator-type "$TPU_TYPE" --version "$TPU_IMAGE"
