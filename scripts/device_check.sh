#!/usr/bin/env bash
# The device check for a machine with an accelerator (GPU or TPU): versions and devices, the
# train-step benchmark (ours against PyTorch eager where torch is there), scripts/bench_child.py
# (whole-program and layer-wise children, compile in the background) and a short quick
# evolution with --workers auto and its worker time, into one report.
# Usage: scripts/device_check.sh [OUT_DIR]       (default runs/device-check-<time>)
#   PYTHON=...     the interpreter (default .venv/bin/python, else python3); the package is run
#                  from this checkout (PYTHONPATH), so an image's own JAX will do
#   RUN_DIR=...    the evolution's store (default OUT_DIR/run)
#   MINUTES=3      the evolution's length;  STAGE_SECONDS=240  each benchmark's time limit
#   BENCH_ARGS="--impls xla --torch-device cuda --steps 50"     (scripts/bench_train_step.py's)
#   CHILD_ARGS="--children 40 --train-impl both --lookahead on" (scripts/bench_child.py's)
# A stage that fails or runs out of time is reported as such; the later stages still run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:-runs/device-check-$(date +%Y%m%d-%H%M%S)}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
py=$PYTHON
run=${RUN_DIR:-$out/run}
minutes=${MINUTES:-3}
limit=${STAGE_SECONDS:-240}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# One process may hold the GPU beside another (bench_child's second worker, torch beside JAX).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
mkdir -p "$out"
report=$out/report.md

# stage TITLE SECONDS COMMAND...: runs COMMAND with a time limit, its output into the report.
stage() {
  local title=$1 seconds=$2
  shift 2
  printf '\n## %s\n\n```\n' "$title" >> "$report"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$report" || rc=$?
  printf '```\n(%s s, exit %s%s)\n' "$((SECONDS - t0))" "$rc" \
    "$([ "$rc" = 124 ] && echo ": stopped at its ${seconds}-s limit")" >> "$report"
}

echo "# Device check, $(date -u +%FT%TZ), $(hostname)" > "$report"
stage "versions and devices" 120 "$py" -c '
import importlib.metadata as md, jax
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
d = jax.devices()
print(d[0].platform, "|", d[0].device_kind, "|", len(d), "devices")
from evojax_nas.devices import describe_plan, discover, plan
print(discover())
print(describe_plan(plan(2)))'
command -v nvidia-smi > /dev/null && stage "nvidia-smi" 30 nvidia-smi -L

# shellcheck disable=SC2086  # the arguments are words
stage "train step (scripts/bench_train_step.py ${BENCH_ARGS:-})" "$limit" \
  "$py" scripts/bench_train_step.py ${BENCH_ARGS:-}
# shellcheck disable=SC2086
stage "children (scripts/bench_child.py ${CHILD_ARGS:-})" "$limit" \
  "$py" scripts/bench_child.py ${CHILD_ARGS:-}

# One line per child goes to OUT_DIR/evolve.log; the report takes its last lines.
# shellcheck disable=SC2016  # expanded by the inner shell
stage "quick evolution, --workers auto, $minutes minutes" $((minutes * 60 + 120)) bash -c \
  '"$1" -m evojax_nas.cli evolve --workers auto --max-minutes "$2" --max-children 100000 \
    --out "$3" > "$4/evolve.log" 2>&1; rc=$?; tail -n 6 "$4/evolve.log"; exit $rc' \
  _ "$py" "$minutes" "$run" "$out"
stage "status" 60 "$py" -m evojax_nas.cli status "$run"
stage "worker time (scripts/worker_time.py)" 60 "$py" scripts/worker_time.py "$run"
stage "children per minute, compile and train per child" 60 "$py" - "$run" << 'PY'
import statistics, sys
from evojax_nas.store import open_store
records = [r for r in open_store(sys.argv[1], create=False).records() if r.get("born")]
span = max(r["born"] for r in records) - min(r["born"] for r in records)
compile_s = [r["timings"]["compile"] for r in records if "compile" in r.get("timings", {})]
steps = sum(r["steps"] for r in records)
train_s = sum(r["timings"].get("train", 0) for r in records)
print(f"children {len(records)}, children/min {len(records) / max(span / 60, 1e-9):.1f}")
if compile_s:
    print(f"compile s per child: median {statistics.median(compile_s):.2f}, max {max(compile_s):.2f}")
print(f"train steps/s per worker (training time only): {steps / max(train_s, 1e-9):.1f}")
print("best validation accuracy:", max(r.get("val_accuracy") or 0 for r in records))
print("devices:", sorted({(r.get('device') or {}).get('kind', '?') for r in records}))
PY
echo "report: $report"
