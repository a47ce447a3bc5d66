"""scripts/bench_tap_conv.py in its tiny mode, so that the benchmark cannot rot."""

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
