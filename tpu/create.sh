#!/usr/bin/env bash
# Creates the TPU VM (or pod slice).
# Usage: TPU_TYPE=v4-32 tpu/create.sh [--spot | --preemptible] [--dry-run]
#   --spot         a Spot VM: much cheaper, can be preempted at any time (the run survives:
#                  it lives in the store; start the workers again on a new slice)
#   --preemptible  the older preemptible VMs (at most 24 h), same trade-off
set -euo pipefail
# shellcheck source=tpu/env.sh
. "$(dirname "$0")/env.sh"
if [ -n "$SPOT" ] && [ -n "$PREEMPTIBLE" ]; then
  echo "choose one of --spot and --preemptible" >&2
  exit 2
fi
extra=()
if [ -n "$SPOT" ]; then extra+=(--spot); fi
if [ -n "$PREEMPTIBLE" ]; then extra+=(--preemptible); fi
run_gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
  --accelerator-type "$TPU_TYPE" --version "$TPU_IMAGE" "${extra[@]}"
