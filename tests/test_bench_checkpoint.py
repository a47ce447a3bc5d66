"""scripts/bench_checkpoint.py in its tiny mode, so that the benchmark cannot rot."""

try:
    from tests.conftest import load_script
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import load_script


def test_the_checkpoint_benchmark_times_both_ways_and_reads_both_back():
    script = load_script("bench_checkpoint.py")
    rows = script.bench(script.parse_args(["--tiny"]))  # asserts each restore equals its save
    assert [r["arrays"] for r in rows] == [2, 6]
    for r in rows:
        for way in ("packed", "unpacked"):
            for op in ("save", "restore"):
                wall, cpu = r[f"{way}_{op}_ms"]
                assert wall > 0 and cpu >= 0
