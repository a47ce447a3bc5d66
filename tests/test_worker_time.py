"""scripts/worker_time.py: a run's worker time split into the recorded phases and the rest."""

import json

try:
    from tests.conftest import load_script, make_random_dataset, make_tiny_run
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import load_script, make_random_dataset, make_tiny_run


def _module():
    return load_script("worker_time.py")


def test_wall_time_is_split_into_recorded_phases_gaps_and_edges():
    wt = _module()
    timings = {"train": 1.0, "compile": 0.5}
    records = [{"worker": 0, "born": b, "timings": timings} for b in (10.0, 12.0, 15.0)]
    records += [
        {"worker": 1, "born": 20.0, "timings": {"train": 2.0}},  # no heartbeat: from its birth
        {"worker": 1, "born": 23.0, "timings": {"train": 2.0}},
        {"worker": 1, "born": 24.0},  # an initial published without timings: not counted
    ]
    beats = [{"worker": 0, "started": 8.0, "stopped": 15.5}]
    out = wt.worker_time(records, beats)
    # Worker 0: 7.5 s = 4.5 timed + (0.5 + 1.5) between + (0.5 + 0.5) at the edges.
    # Worker 1: 18.0 .. 23.0 = 5 s = 4 timed + 1 between.
    assert out["workers"] == 2 and out["children"] == 5
    assert out["worker_seconds"] == 12.5
    s = out["seconds"]
    assert (s["train"], s["compile"], s[wt.UNTIMED], s[wt.EDGES]) == (7.0, 1.5, 3.0, 1.0)
    assert abs(sum(out["shares"].values()) - 1) < 1e-12
    assert abs(out["non_training_share"] - (1 - 7.0 / 12.5)) < 1e-12
    assert out["between_children_median_seconds"] == 1.0


def test_the_script_reads_a_run_as_a_user_gives_it(tmp_path, capsys):
    store, _ = make_tiny_run(tmp_path / "run", make_random_dataset(100, 8, 3, 4))
    wt = _module()
    assert wt.main([str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["children"] == len([r for r in store.records() if r.get("timings")]) >= 6
    assert out["shares"]["train"] > 0 and 0 < out["non_training_share"] < 1
    assert wt.main([str(tmp_path / "run")]) == 0
    assert "non-training share" in capsys.readouterr().out
