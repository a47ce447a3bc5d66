"""One recipe for a child: the plan is pure (clock passed in), and `make_child` is keyed."""

import dataclasses

import jax
import numpy as np

from evojax_nas import dna as D
from evojax_nas.config import EvolutionConfig
from evojax_nas.model import flatten
from evojax_nas.recipe import Plan, make_child, make_initial, plan_child
from evojax_nas.state import Control

CFG = EvolutionConfig(population=4, mutations_per_child=1)


def test_the_plan_follows_the_config_without_control():
    plan = plan_child(CFG, Control(), parent_birth=10.0, now=20.0)
    assert plan == Plan(CFG.mutation_weights, 1, CFG.inheritance, False)


def test_a_higher_rate_period_ends_at_the_given_time_not_the_wall_clock():
    control = Control(mutations_per_child=7, mutations_until=100.0)
    assert plan_child(CFG, control, 0.0, now=99.0).count == 7
    assert plan_child(CFG, control, 0.0, now=100.0).count == 1
    assert plan_child(CFG, Control(mutations_per_child=7), 0.0, now=1e12).count == 7


def test_a_weight_reset_replaces_parents_born_before_it_only():
    control = Control(reset_at=50.0)
    old, young = plan_child(CFG, control, 49.0, 60.0), plan_child(CFG, control, 51.0, 60.0)
    assert old.replaces_parent and old.count == 1 and old.weights == {"reset_weights": 1.0}
    assert not young.replaces_parent


def test_a_record_round_trips_its_plan():
    plan = Plan({"identity": 1.0}, 3, False, True)
    assert Plan.from_json(plan.to_json(), CFG) == plan
    assert Plan.from_json({}, CFG) == plan_child(CFG, Control(), 0.0, 0.0)


def test_make_child_is_a_function_of_its_key():
    key = jax.random.PRNGKey(3)
    parent, params = make_initial(key, 1, 3, 0.1)
    plan = Plan({"insert_convolution": 1.0}, 1, True)
    a = make_child(key, parent, params, plan)
    b = make_child(key, parent, params, plan)
    assert a[0] == b[0] and a[0] != parent
    assert all(np.array_equal(flatten(a[1])[k], flatten(b[1])[k]) for k in flatten(a[1]))
    assert a[2]["names"] == ["insert_convolution"] and a[2]["count"] == 1
    assert isinstance(a[0], D.DNA)
    c = make_child(jax.random.PRNGKey(4), parent, params, dataclasses.replace(plan))
    assert flatten(c[1]).keys() and c[2]["inherit"] is True
