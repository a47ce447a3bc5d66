"""The stall diagnosis on synthetic population histories (records only; no JAX, no store)."""

import json

from evojax_nas import stall

PLAIN = "Input → Global Pool → Output"
ONE_CONV = "Input → C3x3(8)+BN+R → Global Pool → Output"
SKIP = "Input → I+skip(0) → Global Pool → Output"


def rec(ind_id, parent, born, *, alive=False, names=(), arch=PLAIN, weights=None):
    mutation = {"names": list(names), "touched": [], "reinitialised": [], "weights": weights}
    return {
        "id": ind_id,
        "parent": parent,
        "born": float(born),
        "alive": alive,
        "mutation": mutation if parent else {},
        "architecture": arch,
        "architecture_key": str(abs(hash(arch))),
        "val_accuracy": 0.1,
    }


def history(n_children, *, population=5, structural_every=0, accept_at=(), arch=ONE_CONV,
            names=("insert_convolution",)):  # fmt: skip
    """`population` conv-free initials, then `n_children` children of a rolling parent.

    Every `structural_every`-th child changes the architecture and dies unaccepted, except
    those at positions in `accept_at`, which become the parent of what follows. Non-structural
    children (a learning-rate change) keep their parent's architecture. The last `population`
    children that were not rejected are alive.
    """
    records = [rec(f"init-{i}", None, i) for i in range(population)]
    kept = list(records)
    parent, parent_arch = "init-0", PLAIN
    for k in range(n_children):
        born = population + k
        structural = k in accept_at or (structural_every and k % structural_every == 0)
        child_arch = arch if structural else parent_arch
        r = rec(f"c{k}", parent, born, names=names if structural else ["alter_learning_rate"],
                arch=child_arch)  # fmt: skip
        records.append(r)
        if k in accept_at or not structural:
            parent, parent_arch = r["id"], child_arch
            kept.append(r)
    for r in kept[-population:]:
        r["alive"] = True
    return records


def test_a_population_that_rejects_every_new_convolution_is_stalled():
    records = history(80, structural_every=4)  # every 4th child gains a conv and dies
    d = stall.diagnose(records, population=5, run="runs/x", steps=200)
    assert d.children == 80 and d.alive == 5 and d.window == 50
    assert d.stalled and d.last_structural_id is None and d.children_since_structural == 80
    assert d.alive_conv_lineage_share == 0 and d.alive_convolutions_mean == 0
    assert d.alive_architectures == 1
    assert "evojax-nas adjust runs/x --mutations-per-child 3 --for-minutes 5" in d.advice
    assert "evojax-nas adjust runs/x --reset-all-weights" in d.advice
    assert "--steps 400" in d.advice
    lines = stall.summary_lines(d.to_dict())
    assert len(lines) == 2 and "STALLED" in lines[0] and "--reset-all-weights" in lines[1]
    assert "0% of alive lineages gained a convolution" in lines[0]


def test_a_population_that_accepted_a_convolution_recently_is_healthy():
    records = history(80, structural_every=4, accept_at=(61,))
    d = stall.diagnose(records, population=5, now=records[-1]["born"] + 30)
    assert not d.stalled and d.advice == ""
    assert d.last_structural_id == "c61" and d.children_since_structural == 18
    assert d.seconds_since_structural == 18 + 30
    assert d.alive_conv_lineage_share == 1.0 and d.alive_convolutions_mean == 1.0
    lines = stall.summary_lines(d.to_dict())
    assert len(lines) == 1 and "STALLED" not in lines[0]
    assert "last one 18 children" in lines[0] and "100% of alive lineages" in lines[0]


def test_an_old_accepted_change_stalls_once_the_window_has_passed():
    records = history(120, accept_at=(10,))  # the conv lineage took over, then nothing
    d = stall.diagnose(records, population=5)
    assert d.last_structural_id == "c10" and d.children_since_structural == 109
    assert d.alive_conv_lineage_share == 1.0
    assert d.stalled and "109 children" in d.reason
    # a larger population widens the window: 2 × 60 children is not yet a stall
    assert stall.diagnose(records, population=60).window == 120
    assert not stall.diagnose(records, population=60).stalled


def test_a_fresh_structural_child_is_not_accepted_until_it_survives_or_reproduces():
    records = history(80)
    records[-1].update(architecture=ONE_CONV, architecture_key="new")
    d = stall.diagnose(records, population=5)  # alive, but born last: never tested
    assert d.last_structural_id is None and d.stalled
    records.append(rec("c80", "c79", 1000, alive=True, arch=ONE_CONV) | {"architecture_key": "new"})
    d = stall.diagnose(records, population=5)  # it reproduced: selection kept it
    assert d.last_structural_id == "c79" and d.children_since_structural == 1


def test_accepted_changes_without_any_convolution_still_stall():
    records = history(80, accept_at=(75,), arch=SKIP, names=("add_skip",))
    d = stall.diagnose(records, population=5)
    assert d.last_structural_id == "c75" and d.alive_conv_lineage_share == 0
    assert d.stalled and "convolution" in d.reason


def test_early_runs_and_runs_that_cannot_change_architecture_are_not_stalled():
    d = stall.diagnose(history(20), population=5)
    assert not d.stalled and "too early" in d.reason and d.window == 50
    records = history(80)
    for r in records:
        if r["parent"]:
            r["mutation"]["weights"] = {"identity": 1.0, "alter_learning_rate": 1.0}
    d = stall.diagnose(records, population=5)
    assert not d.stalled and "mutation_weights" in d.reason


def test_an_empty_run():
    d = stall.diagnose([])
    assert (d.children, d.alive, d.alive_architectures) == (0, 0, 0)
    assert d.alive_conv_lineage_share is None and d.alive_convolutions_mean is None
    assert d.seconds_since_structural is None and not d.stalled
    assert stall.summary_lines(d.to_dict())[0].startswith("stall check")
    assert stall.summary_lines(None) == []


def test_records_with_missing_or_odd_fields_are_tolerated():
    records = [
        "not a record",
        {"no": "id"},
        {"id": 7, "born": 1.0},
        {"id": "init", "born": 0.0, "alive": True},  # no architecture, no parent field
        {"id": "a", "parent": "init", "born": "yesterday", "alive": True},  # untrained
        {"id": "b", "parent": "init", "born": 2.0, "alive": "yes", "mutation": None},
        {"id": "c", "parent": "d", "born": 3.0, "alive": True, "mutation": {"names": "x"}},
        {"id": "d", "parent": "c", "born": 4.0, "alive": True, "architecture": 5},  # a cycle
        {"id": "e", "parent": 12, "born": True, "mutation": {"names": [1, None]}},
        {"id": "f", "parent": "zzz", "born": 5.0, "alive": True, "architecture": ONE_CONV,
         "mutation": {"names": ["insert_convolution"], "weights": {"identity": "lots"}}},
    ]  # fmt: skip
    d = stall.diagnose(records, population=-3, now=float("nan"))
    assert d.children == 4 and d.alive == 4  # init, c, d, f ("alive": "yes" is not alive)
    assert d.alive_conv_lineage_share == 0.25  # f inserted a convolution
    assert d.alive_convolutions_mean == 1.0  # only f's architecture is text
    json.dumps(d.to_dict())  # JSON-ready
    assert stall.summary_lines({"stalled": True})[0].startswith("stall check       STALLED")


# -- status and report through the command line, on a synthetic store -------------------------


def stalled_store(path, n_children=60):
    from evojax_nas import dna as D
    from evojax_nas.config import load_config, with_overrides
    from evojax_nas.store import open_store

    store = open_store(str(path))
    cfg = with_overrides(load_config("quick"), population=5, steps=200, dataset="digits8x8")
    store.write_config(cfg.to_dict())
    dna = D.to_dict(D.initial_dna(1, 10))
    for r in history(n_children, structural_every=3):
        record = {k: v for k, v in r.items() if k not in ("id", "alive")} | {"flops": 1.0}
        store.publish(r["id"], dna, record, r["val_accuracy"], None)
        if not r["alive"]:
            store.kill(r["id"])
    return store


def test_status_and_report_show_the_diagnosis(tmp_path, capsys):
    from evojax_nas import cli

    store = stalled_store(tmp_path / "run")
    assert cli.main(["status", store.url, "--json"]) == 0
    js = json.loads(capsys.readouterr().out)["stall"]
    assert js["stalled"] and js["children"] == 60 and js["alive"] == 5
    assert f"adjust {store.url} --mutations-per-child 3 --for-minutes 5" in js["advice"]
    assert "--steps 400" in js["advice"]
    assert cli.main(["status", store.url]) == 0
    text = capsys.readouterr().out
    assert "stall check       STALLED: no accepted change of architecture" in text
    assert f"adjust {store.url} --reset-all-weights" in text

    assert cli.main(["report", store.url, "--json", "--out", str(tmp_path / "rep")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stall"] == js  # the same records, the same diagnosis
    with open(tmp_path / "rep" / "report.json", encoding="utf-8") as f:
        assert json.load(f)["stall"]["stalled"]
    assert cli.main(["report", store.url, "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "STALLED" in text and "--mutations-per-child 3" in text


def test_status_of_a_young_run_is_not_stalled(tmp_path, capsys):
    from evojax_nas import cli

    store = stalled_store(tmp_path / "run", n_children=10)
    assert cli.main(["status", store.url]) == 0
    text = capsys.readouterr().out
    assert "stall check       too early to tell: 10 of 50 children born" in text
    assert "STALLED" not in text


def test_the_widest_convolutions_alive_and_born_are_reported():
    wide = "Input → C3x3/2(3)+BN+R → C5x1(16) → I+skip(0) → Global Pool → Output"
    records = history(60, structural_every=3, arch=wide)  # the wide children all die
    d = stall.diagnose(records, population=5)
    assert d.alive_widest_convolution == 0 and d.widest_convolution_born == 16
    records = history(60, accept_at=(10,), arch=ONE_CONV)
    d = stall.diagnose(records, population=5)
    assert d.alive_widest_convolution == 8 == d.widest_convolution_born
    line = stall.summary_lines(d.to_dict())[0]
    assert "widest convolution alive 8 channels (widest born 8)" in line
    assert stall.widest_convolution({"architecture": PLAIN}) == 0
    assert stall.widest_convolution({}) is None
    assert stall.diagnose([], population=5).widest_convolution_born is None


def test_the_learning_rate_alive_and_the_channel_children_that_kept_pace_are_reported():
    """Under inheritance selection lowers the learning rate, and children that changed a
    convolution's width rarely match their parent: both are in the diagnosis (issue 14)."""
    records = history(60, structural_every=3, names=("alter_number_of_channels",))
    rates = iter([0.1, 0.05, 0.02, 0.01, 0.005] * 20)
    for r in records:
        r["learning_rate"] = 0.1 if r["parent"] is None else next(rates)
    by_id = {r["id"]: r for r in records}
    for k in (0, 3):  # two channel children at least as good as their parent
        by_id[f"c{k}"]["val_accuracy"] = by_id[by_id[f"c{k}"]["parent"]]["val_accuracy"] + 0.1
    by_id["c6"]["val_accuracy"] = 0.05  # one worse; the rest equal their parent (0.1)
    d = stall.diagnose(records, population=5)
    alive = sorted(r["learning_rate"] for r in records if r["alive"])
    assert d.alive_learning_rate == alive[2] and d.initial_learning_rate == 0.1
    assert d.channel_children == 20 and d.channel_children_kept_pace == 19
    line = stall.summary_lines(d.to_dict())[0]
    assert f"median learning rate alive {alive[2]:.3g} (initial 0.1)" in line
    assert "19 of 20 channel-count children matched their parent" in line
    assert json.loads(json.dumps(d.to_dict()))["channel_children"] == 20
    plain = stall.diagnose(history(60, structural_every=3), population=5)
    assert plain.alive_learning_rate is None and plain.channel_children == 0
    assert "learning rate" not in stall.summary_lines(plain.to_dict())[0]
    assert stall._median_learning_rate([{"learning_rate": 0.1}, {"learning_rate": 0.3}]) == 0.2
