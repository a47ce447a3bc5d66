"""`evojax-nas mutate`, in-process through `cli.main`: the run's recipe, keyed like an event."""

import json

import numpy as np
import pytest

from evojax_nas import cli, recipe
from evojax_nas import dna as D
from evojax_nas import mutations as MU
from evojax_nas.cli_mutate import dna_changes, mutant, mutate_file
from evojax_nas.cli_train import read_dna
from evojax_nas.config import EvolutionConfig
from evojax_nas.errors import DNAError, EvojaxNasError
from evojax_nas.evolution import Worker
from evojax_nas.keys import event_key
from evojax_nas.model import flatten
from evojax_nas.store import open_store
from evojax_nas.train import TrainResult


def mutate(capsys, *args):
    code = cli.main(["mutate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_mutate_command_writes_the_child_and_prints_what_changed(tmp_path, capsys):
    out = tmp_path / "child.json"
    argv = ["--dna", "initial", "--seed", "3", "--mutation", "insert_convolution"]
    code, text, err = mutate(capsys, *argv, "--out", str(out))
    assert code == 0, err
    child = D.load(str(out))
    parent = D.initial_dna()
    assert len(child.conv_edges()) == 1
    assert "mutation: insert_convolution" in text
    assert f"before: {D.describe(parent)}" in text and f"after:  {D.describe(child)}" in text
    assert D.architecture_key(parent) in text and D.architecture_key(child) in text
    conv = child.conv_edges()[0]
    assert f"+ edge {conv.id}: 0→" in text and "~ edge 2 src: 0 →" in text
    assert f"params/conv_e{conv.id}/kernel" in text
    # The same seed gives the same child, byte for byte, through the importable function.
    again = tmp_path / "again.json"
    mutate_file("initial", 3, str(again), mutation="insert_convolution")
    assert again.read_text() == out.read_text()


def test_mutate_command_reports_bad_input_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vertices": [], "edges": [], "learning_rate": 0.1}))
    code, _, err = mutate(capsys, "--dna", str(bad), "--seed", "0", "--out", str(tmp_path / "x"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evojax-nas: error:") and "bad.json" in lines[0]
    assert not (tmp_path / "x").exists()
    for option in ("--worker", "--event"):  # argparse's own error: one line, exit 2
        with pytest.raises(SystemExit) as exc:
            cli.main(["mutate", "--dna", "initial", "--seed", "0", option, "-1", "--out", "x"])
        assert exc.value.code == 2 and "integer >= 0" in capsys.readouterr().err


def test_mutate_file_applies_the_named_or_a_random_mutation(tmp_path):
    parent_path = tmp_path / "parent.json"
    mutate_file("initial", 1, str(parent_path), mutation="insert_convolution")
    parent = D.load(str(parent_path))
    text = mutate_file(str(parent_path), 5, str(tmp_path / "c.json"), mutation="filter_size")
    child = D.load(str(tmp_path / "c.json"))
    (conv,) = child.conv_edges()
    assert "mutation: filter_size" in text and f"touched IDs: {conv.id}" in text
    assert "~ edge" in text and "filter_half_" in text
    names = set()
    for seed in range(12):
        text = mutate_file(str(parent_path), seed, str(tmp_path / f"r{seed}.json"))
        names.add(text.splitlines()[0].removeprefix("mutation: "))
    assert len(names) > 3 and names <= set(MU.MUTATIONS)
    assert dna_changes(parent, parent) == []


def test_mutate_file_errors_are_ours(tmp_path):
    with pytest.raises(DNAError, match="cannot read"):
        mutate_file(str(tmp_path / "missing.json"), 0, str(tmp_path / "o.json"))
    with pytest.raises(MU.MutationError, match="no skip"):
        mutate_file("initial", 0, str(tmp_path / "o.json"), mutation="remove_skip")
    with pytest.raises(MU.MutationError, match="unknown"):
        mutate_file("initial", 0, str(tmp_path / "o.json"), mutation="grow_wings")
    with pytest.raises(EvojaxNasError, match="cannot write"):
        mutate_file("initial", 0, str(tmp_path / "no" / "dir" / "o.json"))


def test_cli_main_runs_mutate_in_process(tmp_path, capsys):
    out = tmp_path / "c.json"
    argv = ["--dna", "initial", "--seed", "0", "--out", str(out), "--mutation"]
    code, text, _ = mutate(capsys, *argv, "identity")
    assert code == 0 and "(same: no recompile)" in text
    assert D.load(str(out)) == D.initial_dna()
    code, _, err = mutate(capsys, *argv, "remove_skip")
    assert code == 2 and "no skip" in err


@pytest.mark.parametrize("mutation", [None, "insert_convolution"])
def test_mutate_makes_the_child_a_workers_event_makes(mutation, tmp_path, capsys, monkeypatch):
    """`mutate --seed S --worker W --event E` = what worker W's event E of a run with seed S
    makes from that parent, with the run's plan: same DNA, same inherited weights."""
    seed, worker_id, event = 5, 1, 7
    key = event_key(seed, worker_id, event)
    parent = D.for_data(read_dna("small_conv"), 1, 10)
    # The CLI has no parent weights: it draws stand-ins from the event key. Giving the run's
    # parent exactly those makes the inherited weights comparable too.
    parent_vars = recipe.initial_variables(key, parent)
    weights = None if mutation is None else {mutation: 1.0}  # None: a default run's plan
    cfg = EvolutionConfig(population=2, seed=seed, mutation_weights=weights)
    store = open_store(str(tmp_path / "run"))
    store.write_config(cfg.to_dict())
    record = {"parent": None, "born": 1000.0, "val_accuracy": 0.9}
    store.publish("p", D.to_dict(parent), record, 0.9, parent_vars)
    store.publish("q", D.to_dict(parent), record | {"val_accuracy": 0.1}, 0.1, parent_vars)
    trained = []

    def evaluate(dna, params, key):  # what the worker trains: the child's initial variables
        trained.append((dna, params))
        return TrainResult(params, 0.5, False, 1, 1.0, 1.0, 1, 1, {"train": 0.0})

    worker = Worker(store, cfg, worker_id, evaluate, 1, 10, event=event)
    summary = worker.step()
    assert summary["parent"] == "p" and summary["killed"] == "q"
    (run_child, run_vars), run_record = trained[0], store.read_record(summary["id"])

    made = []  # what the command computed, weights included (it writes only the DNA)
    real_make_child = recipe.make_child

    def spy(*args):
        made.append(real_make_child(*args))
        return made[-1]

    monkeypatch.setattr(recipe, "make_child", spy)
    (tmp_path / "parent.json").write_text(D.to_json(parent))
    argv = ["--dna", str(tmp_path / "parent.json"), "--seed", str(seed)]
    argv += ["--worker", str(worker_id), "--event", str(event), "--out", str(tmp_path / "c")]
    code, text, err = mutate(capsys, *argv, *(["--mutation", mutation] if mutation else []))
    assert code == 0, err
    assert D.load(str(tmp_path / "c")) == run_child != parent
    assert f"mutation: {', '.join(run_record['mutation']['names'])}" in text
    fresh = ", ".join(run_record["mutation"]["reinitialised"]) or "(none)"
    assert f"re-initialised tensors: {fresh}" in text
    a, b = flatten(made[0][1]), flatten(run_vars)
    assert len(made) == 1 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Another event's key makes another child (the key is not ignored).
    other = mutant(parent, event_key(seed, worker_id, event + 1), mutation)
    assert other[0] != run_child or not all(np.array_equal(flatten(other[1])[k], a[k]) for k in a)
