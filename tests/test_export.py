"""export / load_model: the exported model reproduces the report's test accuracy."""

import json
import os

import numpy as np
import pytest

from evojax_nas import cli, data, export, report
from evojax_nas.export import ExportError, ensemble_probabilities, load_model


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_run):
    return synthetic_run(tmp_path_factory.mktemp("exp") / "run")


def test_exported_model_reproduces_the_reports_test_accuracy(
    run, tmp_path, monkeypatch, count_test_split
):
    calls = count_test_split
    summary = report.run_summary(run, k=3)
    x, y = data.load_test_split("digits8x8")
    for k, field in ((1, "best_test_accuracy"), (3, "ensemble_test_accuracy")):
        out = str(tmp_path / f"k{k}")
        assert cli.main(["export", run.url, "--out", out, "--ensemble", str(k)]) == 0
        with open(os.path.join(out, "model.json")) as f:
            model = json.load(f)
        assert [m["id"] for m in model["members"]] == summary["ensemble_ids"][:k]
        assert model["test_accuracy"] == summary[field]
        for m in model["members"]:
            assert os.path.isfile(os.path.join(out, m["dna"]))
            assert os.path.isdir(os.path.join(out, m["checkpoint"]))
        probs = load_model(out)(x)
        assert probs.shape == (len(y), 10)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        assert float(np.mean(probs.argmax(-1) == y)) == summary[field]
    assert calls, "export measures on the test split"


def test_load_model_is_exported_at_the_package_top_level():
    import evojax_nas

    assert evojax_nas.load_model is export.load_model


def test_export_refuses_a_non_empty_directory_and_bad_images(run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not an empty directory"):
        report.export_run(run, str(tmp_path / "full"))
    report.export_run(run, str(tmp_path / "ok"))
    with pytest.raises(ExportError, match="expected images"):
        load_model(str(tmp_path / "ok"))(np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ExportError, match="not an exported model"):
        load_model(str(tmp_path / "full"))


def test_majority_vote_breaks_ties_by_summed_probability():
    a = np.array([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0]])
    b = np.array([[0.1, 0.5, 0.4], [0.2, 0.8, 0.0]])
    c = np.array([[0.0, 0.3, 0.7], [0.8, 0.2, 0.0]])
    # image 0: one vote each, class 1 has the largest summed probability (1.2);
    # image 1: class 0 wins two votes to one although class 1's summed probability is close.
    probs = ensemble_probabilities([a, b, c])
    assert probs.argmax(-1).tolist() == [1, 0]
    np.testing.assert_allclose(probs.sum(-1), 1.0)
    two = ensemble_probabilities([np.array([[0.9, 0.1]]), np.array([[0.45, 0.55]])])
    assert two.argmax(-1).tolist() == [0]  # 1-1 vote; summed 1.35 vs 0.65
