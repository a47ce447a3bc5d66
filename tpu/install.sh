#!/usr/bin/env bash
# Installs evojax_nas with JAX for TPU on every host of the slice.
# Usage: tpu/install.sh [--dry-run]          (copies this checkout to every host)
#        REPO_URL=https://… tpu/install.sh   (hosts clone it instead)
#        DATA_ARCHIVE=cifar-10-binary.tar.gz tpu/install.sh   (also copies the CIFAR binary
#        archive to ~/evojax_nas/data on every host; then use DATA_DIR=data with start.sh)
set -euo pipefail
# shellcheck source=tpu/env.sh
. "$(dirname "$0")/env.sh"
root=$(cd "$(dirname "$0")/.." && pwd)
bundle=${TMPDIR:-/tmp}/evojax_nas.tgz
if [ -n "${REPO_URL:-}" ]; then
  ssh_hosts "rm -rf ~/evojax_nas && git clone --depth 1 $REPO_URL ~/evojax_nas && mkdir -p ~/evojax_nas/data"
else
  if [ -n "$DRY_RUN" ]; then
    echo "# tar -C $root --exclude=.venv --exclude=runs --exclude=.git -czf $bundle ."
  else
    tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf "$bundle" .
  fi
  run_gcloud compute tpus tpu-vm scp "$bundle" "$TPU_NAME":~/evojax_nas.tgz --zone "$ZONE" \
    --worker=all
  ssh_hosts "rm -rf ~/evojax_nas && mkdir -p ~/evojax_nas/data && tar -C ~/evojax_nas -xzf ~/evojax_nas.tgz"
fi
if [ -n "${DATA_ARCHIVE:-}" ]; then
  run_gcloud compute tpus tpu-vm scp "$DATA_ARCHIVE" "$TPU_NAME":~/evojax_nas/data/ \
    --zone "$ZONE" --worker=all
fi
ssh_hosts "cd ~/evojax_nas && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[cifar,tpu]' && .venv/bin/evojax-nas --help > /dev/null && ls /dev/accel* /dev/vfio 2> /dev/null | head -n 16"
