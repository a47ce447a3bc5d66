"""`compare` says whether a group difference is larger than the noise between runs."""

import numpy as np

from evojax_nas.compare import differences_table, group_differences, permutation_p


def _runs(group, accs):
    return [{"group": group, "best_test_accuracy": a} for a in accs]


def test_a_small_gap_within_the_spread_is_noise_a_clear_one_is_not():
    noisy = _runs("evolution", [0.90, 0.94, 0.92, 0.88, 0.96]) + _runs(
        "no inheritance", [0.89, 0.93, 0.91, 0.87, 0.95]
    )
    clear = _runs("evolution", [0.90, 0.91, 0.92, 0.905, 0.915]) + _runs(
        "random search", [0.70, 0.71, 0.72, 0.705, 0.715]
    )
    groups = lambda runs: [{"group": g} for g in dict.fromkeys(r["group"] for r in runs)]  # noqa: E731
    (d,) = group_differences(noisy, groups(noisy))
    assert d["exceeds_noise"] is False and d["p_value"] > 0.5 and abs(d["difference"]) < 0.02
    (d,) = group_differences(clear, groups(clear))
    assert d["exceeds_noise"] is True and d["difference"] < -0.15
    assert "larger than the noise" in differences_table([d]) and "| yes |" in differences_table([d])


def test_one_run_per_group_cannot_be_judged():
    runs = _runs("evolution", [0.9]) + _runs("random search", [0.5, 0.6])
    (d,) = group_differences(runs, [{"group": "evolution"}, {"group": "random search"}])
    assert d["exceeds_noise"] is None and "fewer than 2" in differences_table([d])


def test_the_permutation_test_is_exact_for_small_groups_and_seeded_for_large_ones():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    assert permutation_p(a, b) == 2 / 20  # the two extreme splits out of C(6, 3)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=15), rng.normal(size=15)
    assert permutation_p(x, y) == permutation_p(x, y)
