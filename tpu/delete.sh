#!/usr/bin/env bash
# Deletes the TPU VM / pod slice (the run stays in its gs:// store).
# Usage: tpu/delete.sh [--dry-run]
set -euo pipefail
# shellcheck source=tpu/env.sh
. "$(dirname "$0")/env.sh"
run_gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
