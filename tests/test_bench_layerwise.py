"""scripts/bench_layerwise.py in its tiny mode, and its layer-wise driver's signature cache."""

from evojax_nas import xla_backend
from evojax_nas.conv import host_cpu_flags

try:
    from tests.conftest import load_script, run_script
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import load_script, run_script


def _module():
    return load_script("bench_layerwise.py")


def test_tiny_run_compares_both_paths_and_checks_them_numerically():
    res = run_script("bench_layerwise.py", "--tiny", "--json")
    assert res["check"]["ok"]
    small = res["check"]["small_conv sample"]["errors"]
    assert {"gradients after 1 step", "momenta after 3 steps", "variables after 3 steps"} <= set(
        small
    )
    rows = res["rows"]
    assert len(rows) == res["architectures"] == 3
    for row in rows:
        for path in ("whole", "layerwise"):
            assert row[path]["compile"] > 0 and row[path]["train"] > 0
        # Both paths train and evaluate the same child: the same number of correct answers
        # (random labels, so only equal, not high).
        assert row["whole"]["correct"] == row["layerwise"]["correct"]
    assert sum(r["layerwise"]["new_signatures"] for r in rows) == res["signatures"]
    for paths in res["projection"].values():
        for p in paths.values():
            assert 0 < p["non_training_share"] < 1 and p["children_per_minute"] > 0
    shares = [res["projection"][f"all new, {s} steps"]["whole"] for s in (200, 800, 2000)]
    assert shares[0]["non_training_share"] > shares[2]["non_training_share"]


def test_tiny_run_compares_the_layer_options_with_those_before():
    res = run_script("bench_layerwise.py", "--tiny", "--compare-options", "--json")
    assert res["architectures"] == 3 and res["signatures"] > 0 and res["compared"] == "unrolling"
    now, before = res["options"]["now"], res["options"]["before"]
    emitters = now.get("xla_cpu_use_fusion_emitters"), before.get("xla_cpu_use_fusion_emitters")
    known = xla_backend.option_known("xla_cpu_use_fusion_emitters", False)  # gone in jaxlib 0.11
    assert emitters == (("False", "False") if known else (None, None))
    assert xla_backend.EXTRA_OPTIONS not in before
    assert (xla_backend.EXTRA_OPTIONS in now) == ("avx512f" not in host_cpu_flags())
    for totals in res["totals"].values():
        assert totals["compile"] > 0 and totals["train"] > 0
    assert res["agree"] and res["answers_differ_by"] <= 0.001 * res["answers"]
    assert all(r > 0 for r in res["ratio_before_over_now"].values())


def test_tiny_run_measures_a_second_worker_loading_shared_layers():
    res = run_script("bench_layerwise.py", "--tiny", "--second-worker", "--json")
    first, second = res["workers"]["first"], res["workers"]["second"]
    assert first["compiles"] > 0 and first["loads"] == 0
    assert second["compiles"] == 0 and second["loads"] == first["compiles"]
    assert res["shared_programs"] == first["compiles"] and res["shared_bytes"] > 0
    assert res["agree"] and first["correct"] == second["correct"]
    assert res["ms_per_compile"] > 0 and res["ms_per_load"] > 0


def test_tiny_run_measures_the_layer_wise_path_alone():
    res = run_script("bench_layerwise.py", "--tiny", "--layers-only", "--json")
    assert res["architectures"] == 3 and res["signatures"] == sum(res["signatures_by_op"].values())
    assert res["totals"]["compile"] > 0 and res["totals"]["train"] > 0
    # Evaluation has no forward programs of its own: only its cut and the head's count.
    assert res["signatures_by_op"]["vertex_fwd"] == res["signatures_by_op"]["vertex_bwd"]
    assert "split" in res["signatures_by_op"] and "head_eval" in res["signatures_by_op"]


def test_a_seen_architecture_compiles_no_new_signature_and_a_broken_update_is_caught():
    bench = _module()
    from evojax_nas import dna as D
    from evojax_nas.samples import read_dna

    b = bench.Bench("digits8x8", 2, 0)
    dna = D.for_data(read_dna("small_conv"), 1, 10)
    b.net(dna)
    compiled, seconds = len(b.cache), b.cache.seconds
    assert compiled > 0
    b.net(dna.replace(learning_rate=0.5))  # the same architecture, another learning rate
    assert (len(b.cache), b.cache.seconds) == (compiled, seconds)

    from evojax_nas import layerwise

    sgd = layerwise._sgd
    try:  # the check must notice a gradient 0.1 % off
        layerwise._sgd = lambda p, g, m, lr, mo, d: sgd(p, g * 1.001, m, lr, mo, d)
        assert not b.check(dna)["ok"]
    finally:
        layerwise._sgd = sgd


def test_tiny_run_times_compiling_by_operation(capsys):
    import json

    assert _module().main(["--tiny", "--by-op", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ops = res["by_op"]
    assert res["signatures"] == sum(r["count"] for r in ops.values()) > 0
    assert {"conv_fwd", "conv_bwd", "vertex_fwd", "vertex_bwd", "head_train"} <= set(ops)
    assert all(r["trace"] > 0 and r["lower"] > 0 and r["compile"] > 0 for r in ops.values())
    total = sum(r["trace"] + r["lower"] + r["compile"] for r in ops.values())
    assert abs(res["seconds"] - total) < 1e-6


def _fake_run(root, depth_pairs) -> str:
    """A run directory whose children are input → conv (a) → BN+ReLU → conv (b) → output."""
    import json

    from evojax_nas import dna as D

    V, E = D.Vertex, D.Edge
    conv = dict(kind="conv", filter_half_height=1.0, filter_half_width=1.0)
    for i, (a, b) in enumerate(depth_pairs):
        dna = D.DNA(
            vertices=(V(0, "linear", "input"), V(1, "bn_relu"), V(2, "linear", "output")),
            edges=(E(3, 0, 1, depth_factor=a, **conv), E(4, 1, 2, depth_factor=b / a, **conv)),
            learning_rate=0.05,
            input_channels=1,
            num_classes=10,
            next_id=5,
        )
        ind = root / "inds" / f"w000-e{i:06d}"
        ind.mkdir(parents=True)
        (ind / "dna.json").write_text(D.to_json(D.validate(dna)))
        (ind / "record.json").write_text(json.dumps({"born": 1000.0 + i}))
    return str(root)


def test_padding_channels_leaves_fewer_signatures_and_the_same_answers(tmp_path, capsys):
    """Depths 5-8 share their layer programs once padded to 8 (`layerwise.CHANNEL_PADDING`),
    and the answers stay those of the unpadded programs."""
    import json

    bench = _module()
    run = _fake_run(tmp_path / "run", [(5, 6), (7, 5), (6, 8), (8, 7)])
    args = ["--run", run, "--dataset", "digits8x8", "--steps", "3", "--json"]
    assert bench.main([*args, "--signatures"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    padded, unpadded = res["signatures"]["padded"], res["signatures"]["unpadded"]
    assert res["architectures"] == 4
    # unpadded, each child's two convolutions and BN vertex are its own; padded, all alike
    assert (padded["by_op"]["conv_bwd"], padded["by_op"]["vertex_fwd"]) == (2, 1)
    assert (unpadded["by_op"]["conv_bwd"], unpadded["by_op"]["vertex_fwd"]) == (8, 4)
    assert bench.main([*args, "--compare-options", "padding"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["channel_padding"]["before"] == [1, 0]
    assert res["signatures"] < res["signatures_before"]
    assert res["agree"] and res["answers_differ_by"] <= 0.001 * res["answers"]
