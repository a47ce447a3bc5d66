"""scripts/bench_train_step.py: its variants build and run, its report pairs the repeats."""

from evojax_nas import conv as conv_lib
from evojax_nas import model as model_lib

try:
    from tests.conftest import load_script
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import load_script


def test_report_pairs_repeats_against_torch_and_the_first_variant(capsys):
    script = load_script("bench_train_step.py")
    before, ours, torch = (script.Timed(n, None, 1e9) for n in ("jax a", "jax b", "torch eager"))
    before.times, ours.times, torch.times = [6.0, 2.0], [2.0, 1.0], [3.0, 3.0]
    script.report("net", [before, ours, torch], steps=1)
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[2:]}
    # torch ÷ b per repeat: 1.5 and 3.0 (median 2.25); a ÷ b: 3.0 and 2.0 (median 2.5).
    assert "2.25 (min/min 3.00)" in rows["b"] and "2.50 (min/min 2.00)" in rows["b"]
    assert rows["a"].rstrip().endswith("1.00 (min/min 1.50)")  # the first: against torch only
    assert "min/min" not in rows["eager"]


def test_variants_build_train_and_pick_their_relu(monkeypatch):
    """ "custom" builds DNANet with `relu_for` (so `conv.stored_relu`); "custom-maxrelu" patches
    it out for `jax.nn.relu`, as before, and puts it back."""
    script = load_script("bench_train_step.py")
    calls, real = [], model_lib.relu_for
    monkeypatch.setattr(model_lib, "relu_for", lambda impl: calls.append(impl) or real(impl))
    dna, data = script.load_dna("conv4"), script.synthetic_dataset(100)
    timed, timings = script.jax_variant(dna, "custom", data, 1)
    assert calls and set(calls) == {"custom"} and real("custom") is conv_lib.stored_relu
    assert timed.run(1) > 0 and timings["compile"] > 0
    calls.clear()
    timed, _ = script.jax_variant(dna, "custom-maxrelu", data, 1)
    assert calls == [] and timed.run(1) > 0
    model_lib.relu_for("custom")
    assert calls == ["custom"]  # restored after the variant was built
