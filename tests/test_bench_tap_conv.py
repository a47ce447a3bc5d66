"""scripts/bench_tap_conv.py in its tiny mode, so that the benchmark cannot rot."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_tap_conv.py"


def test_tiny_run_times_both_paths_and_they_agree():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert len(res["rows"]) == 2
    for row in res["rows"]:
        assert row["tap_sum_by_default"] and row["max_rel_error"] < 1e-5
        assert all(s > 0 for s in row["seconds"].values()) and row["ratio"] > 0
