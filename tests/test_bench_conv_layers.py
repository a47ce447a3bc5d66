"""scripts/bench_conv_layers.py in its tiny mode, so that the benchmark cannot rot."""

try:
    from tests.conftest import load_script
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import load_script


def test_layers_are_the_sample_nets_convolutions():
    script = load_script("bench_conv_layers.py")
    conv8 = script.layers("conv8", 32)
    assert [(r["size"], r["cin"], r["cout"], r["stride"]) for r in conv8] == [
        (32, 3, 64, 1),
        (32, 64, 64, 1),
        (32, 64, 128, 2),
        (16, 128, 128, 1),
        (16, 128, 256, 2),
        (8, 256, 256, 1),
        (8, 256, 256, 1),
        (8, 256, 256, 1),
    ]
    assert all(r["kernel"] == (3, 3) for r in conv8)


def test_tiny_run_times_the_three_products_of_every_layer(capsys):
    script = load_script("bench_conv_layers.py")
    res = script.bench(script.parse_args(["--tiny"]))
    assert [r["cout"] for r in res["rows"]] == [32, 64, 64, 128]
    assert list(res["totals_ms"]) == ["ours"]  # --tiny: PyTorch is not timed
    for r in res["rows"]:
        assert all(0 < r["ms"]["ours"][p] < 1e4 for p in script.PRODUCTS)
    script.report(res)
    assert "total" in capsys.readouterr().out
