# Settings shared by the tpu/ scripts. Override any of them in the environment.
#   TPU_NAME   name of the TPU VM or pod slice            (default evojax-nas)
#   ZONE       Cloud zone                                 (default us-central2-b)
#   TPU_TYPE   accelerator type, e.g. v4-8, v4-32, v5litepod-8 (default v4-8)
#   TPU_IMAGE  TPU VM software version                    (default tpu-ubuntu2204-base)
#   STORE      the run's store, gs://BUCKET/PREFIX        (required by start/watch)
#   CHIPS      chips per host = workers per host          (default 4)
#   REPO_URL   where hosts get evojax_nas from            (default: this checkout, copied by scp)
TPU_NAME=${TPU_NAME:-evojax-nas}
ZONE=${ZONE:-us-central2-b}
TPU_TYPE=${TPU_TYPE:-v4-8}
TPU_IMAGE=${TPU_IMAGE:-tpu-ubuntu2204-base}
CHIPS=${CHIPS:-4}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
need_store() {
  case "${STORE:-}" in gs://*) ;; *) echo "set STORE=gs://BUCKET/PREFIX (the run's store)" >&2; exit 2;; esac
}
