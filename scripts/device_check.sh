#!/usr/bin/env bash
# The device check for a machine with an accelerator (GPU or TPU): the train-step benchmark,
# scripts/bench_child.py (where it exists) and a 5-minute quick evolution with --workers auto,
# then a small report: device kind, steps/s, compile seconds, children per minute.
# Usage: scripts/device_check.sh [OUT_DIR]       (default runs/device-check-<time>)
#        MINUTES=5 PYTHON=.venv/bin/python EVOJAX_NAS=.venv/bin/evojax-nas (overridable)
#        BENCH_ARGS="--no-torch --impls xla --repeats 3" (scripts/bench_train_step.py's)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/device-check-$(date +%Y%m%d-%H%M%S)}
py=${PYTHON:-.venv/bin/python}
cli=${EVOJAX_NAS:-.venv/bin/evojax-nas}
minutes=${MINUTES:-5}
mkdir -p "$out"
report=$out/report.md

section() { printf '\n## %s\n\n```\n' "$1" >> "$report"; }
endsection() { printf '```\n' >> "$report"; }

echo "# Device check, $(date -u +%FT%TZ), $(hostname)" > "$report"
section "devices (JAX)"
"$py" -c 'import jax; d = jax.devices(); print(d[0].platform, "|", d[0].device_kind, "|", len(d), "devices")' \
  2>&1 | tee -a "$report"
endsection
section "workers auto"
"$py" -c 'from evojax_nas.devices import describe_plan, discover, plan; print(discover()); print(describe_plan(plan(2)))' \
  2>&1 | tee -a "$report"
endsection

bench=${BENCH_ARGS:---no-torch --impls xla --repeats 3}
section "train-step benchmark (scripts/bench_train_step.py $bench)"
# shellcheck disable=SC2086  # the arguments are words
"$py" scripts/bench_train_step.py $bench 2>&1 | tee -a "$report" || true
endsection

if [ -f scripts/bench_child.py ]; then
  section "one child (scripts/bench_child.py)"
  "$py" scripts/bench_child.py 2>&1 | tee -a "$report" || true
  endsection
fi

section "quick evolution, --workers auto, $minutes minutes"
"$cli" evolve --workers auto --max-minutes "$minutes" --max-children 100000 --out "$out/run" \
  2>&1 | tail -n 5 | tee -a "$report" || true
"$cli" status "$out/run" 2>&1 | tee -a "$report" || true
"$py" - "$out/run" << 'PY' 2>&1 | tee -a "$report" || true
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
print("devices:", sorted({(r.get('device') or {}).get('kind', '?') for r in records}))
PY
endsection
echo "report: $report"
