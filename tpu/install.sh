#!/usr/bin/env bash
# Installs evojax_nas with JAX for TPU on every host of the slice.
# Usage: tpu/install.sh            (copies this checkout to every host)
#        REPO_URL=https://… tpu/install.sh   (hosts clone it instead)
set -euo pipefail
. "$(dirname "$0")/env.sh"
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${REPO_URL:-}" ]; then
  ssh_all "rm -rf ~/evojax_nas && git clone --depth 1 $REPO_URL ~/evojax_nas"
else
  tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/evojax_nas.tgz .
  gcloud compute tpus tpu-vm scp /tmp/evojax_nas.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
  ssh_all "rm -rf ~/evojax_nas && mkdir ~/evojax_nas && tar -C ~/evojax_nas -xzf ~/evojax_nas.tgz"
fi
ssh_all "cd ~/evojax_nas && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
  && .venv/bin/pip install -q -e '.[cifar]' 'jax[tpu]' \
  && .venv/bin/python -c 'import jax; print(jax.devices())'"
