# shellcheck shell=bash
# Settings and helpers shared by the tpu/ scripts (sourced). Override any setting in the
# environment:
#   TPU_NAME   name of the TPU VM or pod slice                      (default evojax-nas)
#   ZONE       Cloud zone                                           (default us-central2-b)
#   TPU_TYPE   accelerator type, e.g. v4-8, v4-32, v5litepod-8      (default v4-8)
#   TPU_IMAGE  TPU VM software version                              (default tpu-ubuntu2204-base)
#   PROJECT    Cloud project                             (default: gcloud's configured project)
#   STORE      the run's store, gs://BUCKET/PREFIX                  (required by start/watch)
#   REPO_URL   where hosts get evojax_nas from        (default: this checkout, copied by scp)
#   DATA_ARCHIVE  a CIFAR binary archive install.sh copies to every host's ~/evojax_nas/data
# Every script takes --dry-run (also DRY_RUN=1): it prints the exact gcloud commands, one a line,
# and exits 0 without calling them.
TPU_NAME=${TPU_NAME:-evojax-nas}
ZONE=${ZONE:-us-central2-b}
TPU_TYPE=${TPU_TYPE:-v4-8}
TPU_IMAGE=${TPU_IMAGE:-tpu-ubuntu2204-base}
DRY_RUN=${DRY_RUN:-}
SPOT=${SPOT:-}
PREEMPTIBLE=${PREEMPTIBLE:-}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "$(basename "$0"): unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

project_args=()
if [ -n "${PROJECT:-}" ]; then project_args=(--project "$PROJECT"); fi

# One word as a shell reads it back: as it is when plain, else in single quotes.
quote() {
  case $1 in
    '' | *[!A-Za-z0-9_./:=@,+%-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# gcloud, or in a dry run the command it would run, shell-quoted on one line.
run_gcloud() {
  if [ -n "$DRY_RUN" ]; then
    printf 'gcloud'
    for word in "$@" "${project_args[@]}"; do printf ' %s' "$(quote "$word")"; done
    printf '\n'
    return 0
  fi
  if ! command -v gcloud > /dev/null; then
    echo "gcloud not found: install the Google Cloud CLI (or run with --dry-run)" >&2
    exit 2
  fi
  gcloud "$@" "${project_args[@]}"
}

# A shell command on every host of the slice (or on host $2).
ssh_hosts() {
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="${2:-all}" \
    --command "$1"
}

need_store() {
  case "${STORE:-}" in
    gs://?*) ;;
    *) echo "set STORE=gs://BUCKET/PREFIX (the run's store)" >&2; exit 2 ;;
  esac
}
