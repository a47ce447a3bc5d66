import json

import pytest

from evojax_nas.config import EvolutionConfig, from_dict, load_config, with_overrides
from evojax_nas.errors import ConfigError
from evojax_nas.mutation_names import MUTATION_NAMES as MUTATIONS


def test_paper_config_holds_the_papers_numbers():
    cfg = load_config("paper")
    assert (cfg.population, cfg.steps, cfg.batch_size) == (1000, 25_600, 50)
    assert (cfg.momentum, cfg.weight_decay, cfg.initial_learning_rate) == (0.9, 1e-4, 0.1)
    assert cfg.selection == "tournament" and cfg.inheritance and cfg.mutation_weights is None
    assert cfg.dataset == "cifar10"


def test_quick_config_is_the_default_and_a_user_can_copy_and_edit_it(tmp_path):
    quick = load_config("quick")
    assert quick.dataset == "mnist5k" and quick.max_minutes == 10
    # The paper's mutations but the learning-rate one (README, "Evolution vs the paper's controls")
    weights = quick.mutation_weights
    assert weights["alter_learning_rate"] == 0 and set(weights) == set(MUTATIONS)
    assert all(w == 1 for name, w in weights.items() if name != "alter_learning_rate")
    data = quick.to_dict() | {"population": 7, "selection": "aging", "_doc": "my run"}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    mine = load_config(str(path))
    assert mine.population == 7 and mine.selection == "aging"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"population": 1}, "population must be at least 2"),
        ({"population": 2.5}, "'population' must be a positive integer"),
        ({"steps": 0}, "'steps' must be a positive integer"),
        ({"selection": "best"}, "selection must be one of"),
        ({"momentum": float("nan")}, "'momentum' must be a finite number"),
        ({"initial_learning_rate": 0}, "initial_learning_rate must be > 0"),
        ({"inheritance": "yes"}, "inheritance must be true or false"),
        ({"mutation_weights": {"teleport": 1}}, "unknown mutations"),
        ({"mutation_weights": {"identity": 0}}, "all zero"),
        ({"max_minutes": -1}, "max_minutes must be > 0"),
        ({"colour": "red"}, "unknown config fields"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(EvolutionConfig().to_dict() | change)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config"):
        load_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(bad))


def test_overrides_apply_only_given_values_and_are_validated():
    cfg = with_overrides(load_config("quick"), population=5, seed=None)
    assert cfg.population == 5 and cfg.seed == load_config("quick").seed
    with pytest.raises(ConfigError):
        with_overrides(cfg, selection="nope")


def test_a_run_stored_before_train_impl_existed_is_read_as_whole():
    from evojax_nas.config import EvolutionConfig, from_dict, stored_config

    old = EvolutionConfig().to_dict()
    del old["train_impl"]
    assert from_dict(old).train_impl == "auto"  # a new config file gets today's default
    assert stored_config(old).train_impl == "whole"  # a stored run, what trained it then
    assert stored_config({**old, "train_impl": "layerwise"}).train_impl == "layerwise"


def test_auto_train_impl_resolves_by_platform_and_steps():
    from evojax_nas.evolution import LAYERWISE_MAX_STEPS, resolve_train_impl

    assert resolve_train_impl("auto", 200, "cpu") == "layerwise"
    assert resolve_train_impl("auto", LAYERWISE_MAX_STEPS["cpu"] + 1, "cpu") == "whole"
    assert resolve_train_impl("auto", 200, "gpu") == "layerwise"  # the quick job on a GPU
    assert resolve_train_impl("auto", LAYERWISE_MAX_STEPS["gpu"] + 1, "gpu") == "whole"
    assert resolve_train_impl("auto", 25_600, "gpu") == "whole"  # the paper's
    assert resolve_train_impl("auto", 200, "tpu") == "whole"
    assert resolve_train_impl("whole", 200, "cpu") == "whole"
    assert resolve_train_impl("layerwise", 25_600, "tpu") == "layerwise"


def test_the_persistent_xla_cache_bound_reads_mib_or_minus_one_and_rejects_the_rest(monkeypatch):
    from evojax_nas.config import XLA_CACHE_MAX_MB, xla_cache_max_bytes

    monkeypatch.delenv("EVOJAX_NAS_XLA_CACHE_MAX_MB", raising=False)
    assert xla_cache_max_bytes() == int(XLA_CACHE_MAX_MB * 2**20)
    assert xla_cache_max_bytes("512") == 512 * 2**20
    assert xla_cache_max_bytes("0.5") == 2**19
    assert xla_cache_max_bytes("-1") == -1
    monkeypatch.setenv("EVOJAX_NAS_XLA_CACHE_MAX_MB", "64")
    assert xla_cache_max_bytes() == 64 * 2**20
    for bad in ("0", "-5", "lots", "inf", "nan"):
        with pytest.raises(ConfigError, match="EVOJAX_NAS_XLA_CACHE_MAX_MB"):
            xla_cache_max_bytes(bad)
