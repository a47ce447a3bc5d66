"""scripts/bench_lookahead.py: a worker's replay with and without building the next net on a
thread (in-process, tiny), how rounds are summarised, and the script's two modes as processes."""

import json

try:
    from tests.conftest import load_script
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import load_script


def test_replay_gives_the_same_answers_with_the_next_net_built_on_a_thread():
    m = load_script("bench_lookahead.py")
    args = m.parse_args(["--tiny", "--workers", "1"])
    dnas = m.worker_dnas(args, 0)
    assert len(dnas) == args.limit == 4
    off = m.replay(dnas, args.dataset, args.steps, lookahead=False)
    on = m.replay(dnas, args.dataset, args.steps, lookahead=True)
    for res in (off, on):
        assert res["children"] == 4 and res["signatures"] > 0 and res["compile"] > 0
        assert res["train"] > 0 and res["wall"] >= res["wait"] + res["train"] + res["eval"]
        assert len(res["correct"]) == 4
    # The same nets, data and keys both ways: the same answers child by child.
    assert on["correct"] == off["correct"]
    assert on["signatures"] == off["signatures"]


def test_chain_children_are_shared_out_between_workers_without_overlap():
    m = load_script("bench_lookahead.py")
    args = m.parse_args(["--tiny", "--workers", "2", "--limit", "100"])
    from evojax_nas import dna as D

    keys = [{D.architecture_key(d) for d in m.worker_dnas(args, w)} for w in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_summary_takes_the_slowest_worker_and_the_median_round():
    m = load_script("bench_lookahead.py")

    def worker(wall, train, children=10):
        return dict(wall=wall, wait=1.0, train=train, eval=0.5, compile=2.0, children=children)

    rounds = {
        "off": [[worker(60, 50), worker(30, 25)], [worker(40, 30), worker(40, 30)]],
        "on": [[worker(30, 28), worker(30, 28)], [worker(30, 28), worker(30, 28)]],
    }
    out = m.summarise(rounds)
    # off: 20 children over 60 s and over 40 s -> 20 and 30 a minute, median 25
    assert out["off"]["children_per_minute"] == 25.0
    assert out["on"]["children_per_minute"] == 40.0
    assert out["ratio_on_over_off"] == 40.0 / 25.0
    assert abs(out["on"]["non_training_share"] - (1 - 56 / 60)) < 1e-12


def test_main_runs_the_workers_as_processes_and_compares_the_modes(capsys):
    m = load_script("bench_lookahead.py")
    assert m.main(["--tiny", "--json", "--workers", "1", "--rounds", "1", "--limit", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same_answers"] and out["workers"] == 1 and out["steps"] == 4
    for mode in ("off", "on"):
        assert out[mode]["children_per_minute"] > 0 and len(out[mode]["rounds"]) == 1
        assert 0 < out[mode]["non_training_share"] < 1
    ratio = out["on"]["children_per_minute"] / out["off"]["children_per_minute"]
    assert abs(out["ratio_on_over_off"] - ratio) < 1e-12
