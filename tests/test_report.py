"""report / compare / adjust: JSON fields, PNGs, the test split's confinement, steering."""

import collections
import dataclasses
import json
import time

import matplotlib.image
import pytest

from evojax_nas import cli, compare, data, plots, report
from evojax_nas import dna as D
from evojax_nas.app import adjust
from evojax_nas.cli_report import report_lines
from evojax_nas.cli_train import read_dna
from evojax_nas.errors import EvojaxNasError
from evojax_nas.evolution import Worker, training_evaluator
from evojax_nas.runner import run_status
from evojax_nas.steering import Adjustment
from evojax_nas.store import open_store
from evojax_nas.train import TrainResult

PNG = b"\x89PNG\r\n\x1a\n"


def forbid_test_split(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the test split was read outside report/compare/export")

    monkeypatch.setattr(data, "load_test_split", refuse)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):
    """A real in-process evolution (digits 8×8, 3 training steps a child) that may not read
    the test split."""
    url = str(tmp_path_factory.mktemp("tiny") / "run")
    store = open_store(url)
    store.write_config(tiny_config.to_dict())
    with pytest.MonkeyPatch.context() as mp:
        forbid_test_split(mp)
        dataset = data.load_dataset(tiny_config.dataset)
        evaluate = training_evaluator(dataset, tiny_config)
        worker = Worker(store, tiny_config, 0, evaluate, 1, dataset.num_classes)
        while worker.children < tiny_config.max_children:
            worker.step()
        run_status(store)
    return url


def test_evolution_never_reads_the_test_split_and_report_does(
    tiny_run, monkeypatch, capsys, count_test_split
):
    calls = count_test_split
    assert cli.main(["report", tiny_run, "--json", "--ensemble", "2"]) == 0
    assert calls, "report must measure on the test split"
    out = json.loads(capsys.readouterr().out)
    records = open_store(tiny_run).records()
    best = max(records, key=lambda r: r["val_accuracy"])
    assert out["best_val_accuracy"] == best["val_accuracy"]
    assert 0.0 <= out["best_test_accuracy"] <= 1.0
    assert out["ensemble_k"] == 2 and len(out["ensemble_ids"]) == 2
    assert 0.0 <= out["ensemble_test_accuracy"] <= 1.0
    assert out["individuals_trained"] == len(records)
    assert out["total_flops"] == pytest.approx(sum(r["flops"] for r in records))
    assert out["wall_hours"] > 0
    assert out["ancestry"][-1] == out["best_id"] and "test split" in out["test_split"]
    assert (
        out["best_architecture"].startswith("Input")
        and "Global Pool → Output" in (out["best_architecture"])
    )
    for name in ("figure1.png", "figure2.png"):
        path = out["outputs"][name]
        with open(path, "rb") as f:
            assert f.read(8) == PNG
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    with open(out["outputs"]["architecture.txt"], encoding="utf-8") as f:
        assert out["best_id"] in f.read()


def test_second_report_uses_the_cache_and_never_loads_data(tiny_run, monkeypatch):
    first = report.write_report(open_store(tiny_run), k=2)
    forbid_test_split(monkeypatch)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    start = time.perf_counter()
    second = report.run_summary(open_store(tiny_run), k=2)
    assert time.perf_counter() - start < 5
    for key in ("best_test_accuracy", "ensemble_test_accuracy", "progress"):
        assert second[key] == first[key]


def test_collected_best_so_far_is_reported_as_missing(tmp_path, synthetic_run):
    store = synthetic_run(tmp_path / "run")
    store.kill("i1")
    assert store.gc(0.0) == 1
    summary = report.write_report(store, k=3)
    assert summary["progress_missing"] == ["i1"]
    assert [p["id"] for p in summary["progress"]] == ["i0", "i1", "i3"]
    assert summary["ensemble_ids"] == ["i3", "c4", "i2"]  # i1 has no weights any more
    assert any("not measured" in line for line in report_lines(summary))
    with open(summary["outputs"]["figure2.png"], "rb") as f:
        assert f.read(8) == PNG


class CountingStore:
    """A store that counts what is read through it: calls per method, and the IDs read."""

    def __init__(self, store):
        self.store, self.calls = store, collections.Counter()

    def __getattr__(self, name):
        value = getattr(self.store, name)
        if not callable(value):
            return value

        def counted(*args, **kwargs):
            self.calls[name, *args[:1]] += 1
            self.calls[name] += 1
            return value(*args, **kwargs)

        return counted


def test_report_and_export_read_the_run_once(tmp_path, synthetic_run):
    real = synthetic_run(tmp_path / "run")
    for ind_id in ("i3", "c4"):  # dead, weights not yet collected: checked before use
        real.kill(ind_id)
    store = CountingStore(real)
    summary = report.write_report(store, k=3)
    assert summary["ensemble_ids"] == ["i3", "c4", "i1"]
    assert store.calls["records"] == 1 and store.calls["read_config"] == 1
    downloads = {key[1]: n for key, n in store.calls.items() if key[0] == "read_params"}
    assert downloads and set(downloads.values()) == {1}, downloads
    assert {n for key, n in store.calls.items() if key[0] == "read_dna"} == {1}

    store = CountingStore(real)  # test accuracies are cached now: only the members are read
    report.export_run(store, str(tmp_path / "model"), k=3)
    assert store.calls["records"] == 1
    downloads = {key[1]: n for key, n in store.calls.items() if key[0] == "read_params"}
    assert downloads == {"i3": 1, "c4": 1, "i1": 1}


def test_report_on_an_empty_run_is_a_user_error(tmp_path, capsys, tiny_config):
    store = open_store(str(tmp_path / "run"))
    store.write_config(tiny_config.to_dict())
    assert cli.main(["report", str(tmp_path / "run")]) == 2
    assert "no trained individuals" in capsys.readouterr().err


def test_compare_groups_runs_and_writes_a_table_and_png(
    tmp_path, monkeypatch, capsys, count_test_split, synthetic_run
):
    calls = count_test_split
    urls = [synthetic_run(tmp_path / f"e{s}", seed=s).url for s in range(2)]
    urls.append(synthetic_run(tmp_path / "r", selection="random").url)
    assert cli.main(["compare", *urls, "--out", str(tmp_path / "cmp.png"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert calls
    assert [g["group"] for g in out["groups"]] == ["evolution", "random search"]
    assert out["groups"][0]["runs"] == 2 and out["groups"][0]["test_std"] == 0.0
    assert "| evolution | 2 |" in out["table"] and "| random search | 1 |" in out["table"]
    with open(tmp_path / "cmp.png", "rb") as f:
        assert f.read(8) == PNG
    with pytest.raises(report.ReportError, match="labels"):
        compare.compare(urls, labels=["a"], out=str(tmp_path / "x.png"))


def test_paper_diagram_uses_the_papers_notation():
    text = report.paper_diagram(read_dna("small_conv"))
    assert text.startswith("Input → C") and text.endswith("Global Pool → Output")
    assert report.paper_diagram(D.initial_dna()) == "Input → Global Pool → Output"


def identity_evaluator(dna, params, key):
    return TrainResult(params, 0.5, False, 1, 1.0, 1.0, 1, 1, {"train": 0.0})


def step_until_child(worker):
    for _ in range(20):
        summary = worker.step()
        if summary["action"] == "reproduce":
            return summary
    raise AssertionError("no child reproduced")


def test_adjust_changes_what_workers_do_next(tmp_path, tiny_config):
    cfg = dataclasses.replace(tiny_config, population=4, mutation_weights={"identity": 1.0})
    store = open_store(str(tmp_path / "run"))
    store.write_config(cfg.to_dict())
    worker = Worker(store, cfg, 0, identity_evaluator, 1, 10)
    first = step_until_child(worker)
    assert len(first["mutation"]["names"]) == 1 and first["mutation"]["reinitialised"] == []

    adjust(store, Adjustment(mutations_per_child=3, for_minutes=5))
    assert step_until_child(worker)["mutation"]["names"] == ["identity"] * 3

    # a period that ended a minute ago:
    adjust(store, Adjustment(mutations_per_child=3, for_minutes=1), now=time.time() - 120)
    assert len(step_until_child(worker)["mutation"]["names"]) == 1

    adjust(store, Adjustment(reset_all_weights=True))
    assert step_until_child(worker)["mutation"]["reinitialised"], "weights must be reset"

    history, _ = store.read_meta(report.HISTORY)
    kinds = [e["kind"] for e in history["events"]]
    assert kinds == ["mutation_rate", "mutation_rate", "weight_reset"]
    records = report.trained_records(store)
    path = str(tmp_path / "f1.png")
    plots.figure1(
        records,
        records[-1]["id"],
        path,
        diagram=lambda i: report.paper_diagram(D.from_dict(store.read_dna(i))),
        history=history["events"],
    )
    with open(path, "rb") as f:
        assert f.read(8) == PNG


def test_adjust_refuses_nothing_or_bad_values(tmp_path, capsys, tiny_config):
    store = open_store(str(tmp_path / "run"))
    store.write_config(tiny_config.to_dict())
    with pytest.raises(EvojaxNasError, match="nothing to adjust"):
        adjust(store, Adjustment())
    assert cli.main(["adjust", store.url, "--mutations-per-child", "0"]) == 2
    assert cli.main(["adjust", store.url, "--for-minutes", "3", "--reset-all-weights"]) == 2
    assert cli.main(["adjust", store.url, "--reset-all-weights"]) == 0
    assert "reset_at" in capsys.readouterr().out
