"""scripts/bench_tap_conv.py in its tiny mode, so that the benchmark cannot rot."""

import os
import subprocess
import sys

from evojax_nas import devices

try:
    from tests.conftest import run_script
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import run_script


def test_tiny_run_times_both_paths_and_they_agree():
    res = run_script("bench_tap_conv.py", "--tiny", "--json")
    assert len(res["rows"]) == 2
    for row in res["rows"]:
        assert row["tap_sum_by_default"] and row["max_rel_error"] < 1e-5
        assert all(s > 0 for s in row["seconds"].values()) and row["ratio"] > 0


def test_a_benchmark_script_prints_no_libtpu_warnings_on_a_cpu_host():
    """Like the command line, the scripts name the CPU platform before JAX starts where JAX
    would otherwise initialise a TPU runtime this host lacks (libtpu installed: CI)."""
    script = os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "scripts", "bench_tap_conv.py"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run(
        [sys.executable, script, "--tiny"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tap sum" in out.stdout
    if devices.cpu_only_environment(env):
        assert "TPU" not in out.stderr, out.stderr[-2000:]
