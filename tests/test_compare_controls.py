"""scripts/compare_controls.py: its statistics, and a tiny real sweep so the script cannot rot."""

import json
import math
import os

import pytest

try:
    from tests.conftest import load_script
except ImportError:  # tests/ is not a package: pytest put it on sys.path itself.
    from conftest import load_script

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cc():
    return load_script("compare_controls.py")


@pytest.mark.parametrize(
    "df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)]
)
def test_t_quantile_matches_the_tables(cc, df, expected):
    assert cc.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)


def test_welch_interval_by_hand(cc):
    a, b = [0.5, 0.6, 0.7], [0.3, 0.35, 0.4]
    w = cc.welch(a, b)
    va, vb = 0.01 / 3, 0.0025 / 3  # sample variances 0.01 and 0.0025, over n = 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    half = cc.t_quantile(0.975, df) * math.sqrt(va + vb)
    assert w["diff"] == pytest.approx(0.25) and w["df"] == pytest.approx(df)
    assert (w["low"], w["high"]) == pytest.approx((0.25 - half, 0.25 + half))
    assert w["low"] > 0  # a clear difference: the interval excludes zero
    assert cc.welch([0.5, 0.6], [0.55, 0.5])["low"] < 0 < cc.welch([0.5, 0.6], [0.55, 0.5])["high"]
    one = cc.welch([0.5], [0.4, None, 0.45])  # one seed: a difference, no interval
    assert one["diff"] == pytest.approx(0.075) and one["low"] is None
    assert cc.welch([0.5, 0.5], [0.4, 0.4])["low"] == pytest.approx(0.1)  # no spread at all


def test_statistics_compare_each_control_with_evolution_at_the_same_steps(cc):
    def run(group, steps, seed, val, test):
        label = f"{group}, {steps} steps"
        return {"group": group, "steps": steps, "seed": seed, "label": label, "val": val,
                "test": test}  # fmt: skip

    runs = [run("evolution", 100, s, 0.8 + s / 100, 0.78) for s in range(3)]
    runs += [run("random search", 100, s, 0.7 + s / 100, None if s else 0.7) for s in range(3)]
    runs += [run("evolution", 200, s, 0.9, 0.88) for s in range(3)]
    stats = cc.statistics(runs)
    assert list(stats["groups"]) == [
        "evolution, 100 steps", "random search, 100 steps", "evolution, 200 steps"
    ]  # fmt: skip
    g = stats["groups"]["random search, 100 steps"]
    assert g["val"]["n"] == 3 and g["val"]["mean"] == pytest.approx(0.71)
    assert g["test"] == {"n": 1, "mean": 0.7, "std": None}  # unmeasured tests are left out
    (d,) = stats["differences"]
    assert d["versus"] == "evolution, 100 steps" and d["label"] == "random search, 100 steps"
    half = 2.7764 * math.sqrt(2 * 0.01**2 / 3)  # equal spreads: df = 4
    assert d["val"]["diff"] == pytest.approx(0.1) and d["val"]["df"] == pytest.approx(4)
    assert d["val"]["low"] == pytest.approx(0.1 - half, abs=1e-4)
    lines = cc.stat_lines(stats)
    assert any("random search, 100 steps, best val.: 10.00 points" in line for line in lines)
    assert any("test: 8.00 points, 95% CI n/a" in line for line in lines)


def test_bad_arguments_are_refused(cc, capsys):
    for argv in (["--groups", "evolution,bogus"], ["--sweep-steps", "a,b"], ["--set", "x"]):
        with pytest.raises(SystemExit):
            cc.parse_args(argv)
    assert cc.parse_args(["--sweep-steps", "50,100"]).group_names == ["evolution"]
    assert len(cc.parse_args([]).group_names) == 3


def test_a_tiny_sweep_runs_end_to_end(cc, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--sweep-steps", "2,3", "--seeds", "1", "--minutes", "5",
            "--max-children", "2", "--population", "2", "--workers", "1",
            "--dataset", "digits8x8"]  # fmt: skip
    assert cc.main(argv) == 0
    text = capsys.readouterr().out
    assert "| evolution, 2 steps | 1 |" in text and "| evolution, 3 steps | 1 |" in text
    assert "warning" not in text  # the sweep differs in steps on purpose
    for png in ("sweep.png", "compare.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == PNG
    with open(out / "statistics.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert [r["steps"] for r in saved["runs"]] == [2, 3]
    for r in saved["runs"]:
        with open(os.path.join(r["url"], "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        assert (cfg["steps"], cfg["population"], cfg["max_minutes"]) == (r["steps"], 2, 5)
        assert 0 <= r["val"] <= 1
    assert cc.main(argv) == 0  # a finished comparison is not run again, only re-read
    assert capsys.readouterr().out == text
