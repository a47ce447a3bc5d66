"""The command line in-process (`cli.main(argv)`): help, bad input, status, budgets, messages."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from evojax_nas import cli
from evojax_nas.config import EvolutionConfig, load_config, with_overrides
from evojax_nas.store import open_store

TINY = ["--population", "3", "--steps", "5", "--dataset", "digits8x8", "--max-children", "4"]
DNA = {"vertices": [{"id": 0, "type": "linear"}], "edges": [], "learning_rate": 0.1}


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, ds, fs in os.walk(path)
                  for f in fs + ds)  # fmt: skip


def fake_run(path, n: int, *, now=None, **cfg) -> str:
    """A run with `n` trained individuals, one a second before `now`, 6 s of training each."""
    now = time.time() if now is None else now
    store = open_store(str(path))
    c = with_overrides(
        load_config("quick"), **{"population": 3, "steps": 5, "dataset": "digits8x8", **cfg}
    )
    store.write_config(c.to_dict())
    for i in range(n):
        born = now - (n - i)
        record = {"parent": None, "born": born, "train_seconds": 6.0, "val_accuracy": i / 10}
        record["architecture"] = "Input → I → Global Pool → Output"
        store.publish(f"init-000-{i:06d}", DNA, record | {"flops": 1.0}, i / 10, None)
    return str(path)


# -- help ---------------------------------------------------------------------------------------


def test_help_and_light_commands_do_not_import_jax():
    code = (
        "import sys\n"
        "from evojax_nas import cli\n"
        "for argv in (['--help'], ['evolve', '--help'], ['status', 'nowhere'],"
        " ['adjust', 'nowhere', '--reset-all-weights']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _options(parser):
    """(command, option strings, help) of every argument of every subcommand."""
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                yield name, action.option_strings or [action.dest], action.help


def test_every_option_has_help_and_dataset_help_names_npz():
    parser = cli.build_parser()
    missing = [(c, o) for c, o, h in _options(parser) if not h]
    assert not missing
    for command in ("evolve", "train"):
        helps = {o[0]: h for c, o, h in _options(parser) if c == command}
        assert "npz:PATH" in helps["--dataset"]


def test_the_readme_lists_every_command_and_option():
    """Each command has a bullet in the README's Commands section naming all its options."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    bullets = {}
    for bullet in re.split(r"(?m)^- ", section)[1:]:
        name = re.match(r"`evojax-nas ([\w-]+)", bullet)
        if name:
            bullets[name[1]] = bullet
    parser = cli.build_parser()
    for command, opts, _ in _options(parser):
        assert command in bullets, f"README's Commands section has no `evojax-nas {command}`"
        if opts[0].startswith("--"):
            assert opts[0] in bullets[command], f"README: `{command}` lacks {opts[0]}"
    for command, text in bullets.items():  # and every option it shows exists
        known = {o for c, opts, _ in _options(parser) if c == command for o in opts}
        usage = text.split("`")[1]
        assert set(re.findall(r"--[a-z-]+", usage)) <= known, (command, usage)


def test_mutation_and_sample_names_match_their_sources():
    from evojax_nas import cli_train, mutation_names, mutations, samples

    assert mutation_names.MUTATION_NAMES == tuple(mutations.MUTATIONS)
    assert cli_train.SAMPLES == samples.SAMPLES


# -- bad input: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "{d}"],
        ["status", "{d}", "--json"],
        ["report", "{d}"],
        ["export", "{d}", "--out", "{d}/model"],
        ["replay", "{d}", "w000-e000001"],
        ["adjust", "{d}", "--reset-all-weights"],
        ["compare", "{d}", "--out", "{d}/c.png"],
        ["worker", "{d}"],
    ],
)
def test_read_only_commands_on_a_directory_that_is_not_a_run(argv, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    before = tree(tmp_path)
    code, _, err = run([a.format(d=tmp_path) for a in argv], capsys)
    one_line_error(code, err)
    assert "no run at" in err
    assert tree(tmp_path) == before


def test_evolve_checks_out_and_dataset_before_creating_anything(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run(["evolve", "--out", str(tmp_path / "file" / "run"), *TINY], capsys)
    one_line_error(code, err)
    assert "is a file, not a directory" in err
    for extra in ([], ["--create-only"]):
        argv = ["evolve", "--out", str(tmp_path / "run"), "--dataset", "mnsit", *extra]
        code, out, err = run(argv, capsys)
        one_line_error(code, err)
        assert "unknown dataset 'mnsit'" in err and not out
        assert not (tmp_path / "run").exists()


def test_a_binary_file_as_dna_is_one_line(tmp_path, capsys):
    (tmp_path / "x.json").write_bytes(bytes(range(256)))
    for argv in (["train", "--dna"], ["mutate", "--seed", "1", "--out", "o.json", "--dna"]):
        code, _, err = run([*argv, str(tmp_path / "x.json")], capsys)
        one_line_error(code, err)
        assert "not a DNA JSON file" in err


def test_a_file_that_is_not_npz_is_named_as_such(tmp_path, capsys):
    (tmp_path / "x.npz").write_text("hello")
    code, _, err = run(["train", "--dna", "initial", "--dataset", f"npz:{tmp_path}/x.npz"], capsys)
    one_line_error(code, err)
    assert "not a zip archive" in err and "pickle" not in err


def test_a_gs_store_without_credentials_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
    code, _, err = run(["status", "gs://some-bucket/run"], capsys)
    one_line_error(code, err)
    assert "credentials" in err


def test_report_on_a_created_only_run_advises_a_worker(tmp_path, capsys):
    code, out, err = run(["evolve", "--out", str(tmp_path / "r"), *TINY, "--create-only"], capsys)
    assert code == 0 and "worker" in out
    code, _, err = run(["report", str(tmp_path / "r")], capsys)
    one_line_error(code, err)
    assert " worker " in err and "evolve" not in err


# -- budgets over the whole run ------------------------------------------------------------------


def test_a_second_evolve_or_a_worker_on_a_finished_run_does_nothing(tmp_path, capsys):
    cfg = dict(population=3, steps=5, dataset="digits8x8", max_children=4)
    path = fake_run(tmp_path / "r", 4, **cfg)
    code, out, _ = run(["evolve", "--out", path, *TINY], capsys)
    assert code == 0 and "is finished (its 4 children are trained): nothing to do" in out
    code, out, _ = run(["worker", path], capsys)
    assert code == 0 and "nothing to do" in out
    assert open_store(path).read_meta("worker-0")[0] is None  # no worker was even claimed
    assert len(open_store(path).records()) == 4


def test_a_joined_worker_stops_once_the_whole_run_has_its_children(tmp_path, synthetic_run):
    """`run_max_children` (what `evojax-nas worker` passes): the run's children, other workers'
    included, are counted from the store's listings every 5 events."""
    from evojax_nas.runner import worker_main

    store = synthetic_run(tmp_path / "r", max_children=None)  # 5 individuals already
    trained = worker_main(store.url, 7, 30, None, run_max_children=8)
    assert 3 <= trained < 30  # stopped by the run's budget, not by its own share of 30
    assert 8 <= len(store.individual_ids()) < 5 + 30


# -- status ---------------------------------------------------------------------------------------


def _status(path, capsys):
    code, text, _ = run(["status", path], capsys)
    assert code == 0
    code, js, _ = run(["status", path, "--json"], capsys)
    return text, json.loads(js)


def test_status_live_idle_finished_and_rates_agree_with_json(tmp_path, capsys):
    path = fake_run(tmp_path / "r", 3, max_children=10)
    store = open_store(path)
    store.heartbeat(0, {"time": time.time(), "action": "reproduce"})
    text, js = _status(path, capsys)
    assert js["state"] == "live" and js["workers_live"] == 1 and "state             live" in text
    rates = re.search(r"children/min\s+([\d.]+) over the last 10 minutes, ([\d.]+) overall", text)
    assert float(rates[1]) == round(js["children_per_minute_last_10min"], 2)
    assert float(rates[2]) == round(js["children_per_minute_overall"], 2)
    assert js["best_architecture_detail"] in text

    store.heartbeat(0, {"time": time.time() - 3600, "action": "reproduce"})  # SIGKILLed long ago
    text, js = _status(path, capsys)
    assert js["state"] == "idle" and "worker" in text.splitlines()[1]

    store.heartbeat(0, {"time": time.time(), "stopped": time.time()})
    path2 = fake_run(tmp_path / "r2", 3, max_children=3)
    open_store(path2).heartbeat(0, {"time": time.time(), "stopped": time.time()})
    assert _status(path, capsys)[1]["state"] == "idle"
    text, js = _status(path2, capsys)
    assert js["state"] == "finished" and "its 3 children are trained" in text


def test_status_overall_rate_ignores_pauses_between_sessions(tmp_path):
    from evojax_nas.runner import run_status

    path = fake_run(tmp_path / "r", 4, now=time.time() - 7200)  # a session two hours ago
    store = open_store(path)
    rec = {"parent": None, "born": time.time(), "train_seconds": 6.0, "val_accuracy": 0.1}
    store.publish("init-001-000000", DNA, rec, 0.1, None)  # a late worker joins now
    status = run_status(store)
    assert status["training_minutes"] < 1  # 4×1 s overlapping spans + 6 s, not two hours
    assert status["children_per_minute_overall"] == 5  # rated over at least one minute


# -- initial individuals --------------------------------------------------------------------------


def test_no_more_initial_individuals_than_the_set_point_while_seeding(tmp_path):
    from evojax_nas.evolution import Worker, _initials_ahead

    path = fake_run(tmp_path / "r", 2)  # set-point 3: one initial individual left to make
    store = open_store(path)
    cfg = EvolutionConfig(population=3, steps=5, dataset="digits8x8")
    now = time.time()
    store.heartbeat(0, {"action": "initial", "time": now - 1})  # worker 0 is making it
    late = Worker(store, cfg, 1, None, 1, 10)
    assert _initials_ahead(late, store.population(), now)
    assert not _initials_ahead(late, store.population(), now - 2)  # 1 decided first
    store.heartbeat(0, {"action": "initial", "time": now - 1, "stopped": now})
    assert not _initials_ahead(late, store.population(), now)


# -- reports ---------------------------------------------------------------------------------------


def test_report_and_compare_labels_say_what_was_measured():
    from evojax_nas.cli_report import report_lines
    from evojax_nas.compare import comparable, table
    from evojax_nas.report import ReportError

    summary = {
        "store": "r", "dataset": "digits8x8", "selection": "tournament", "inheritance": True,
        "seed": 0, "individuals_trained": 5, "total_flops": 1.0, "wall_hours": 0.1,
        "best_id": "a", "best_val_accuracy": 0.5, "best_test_accuracy": 0.4,
        "best_architecture": "Input → Global Pool → Output",
        "best_architecture_detail": "Input → I → Global Pool → Output",
        "ensemble_k": 100, "ensemble_ids": ["a", "b"], "ensemble_test_accuracy": 0.4,
        "test_split": "note", "progress_missing": [],
    }  # fmt: skip
    text = "\n".join(report_lines(summary))
    assert "ensemble top-2 " in text and "top-100" in text.split("ensemble top-2")[1]
    group = {"group": "evolution", "runs": 1, "test_mean": 0.4, "test_std": None, "val_mean": 0.5,
             "individuals_mean": 5, "flops_mean": 1.0, "wall_hours_mean": 0.1}  # fmt: skip
    assert "| 40.00 | n/a |" in table([group])
    budget = {"population": 3, "steps": 5, "max_children": 4, "max_minutes": None, "workers": 2}
    a = {"dataset": "digits8x8", "budget": budget}
    assert comparable([a, a]) == []
    assert comparable([a, a | {"budget": budget | {"steps": 50}}]) == [
        "the runs differ in steps (5, 50)"
    ]
    with pytest.raises(ReportError, match="different datasets"):
        comparable([a, a | {"dataset": "mnist5k"}])
