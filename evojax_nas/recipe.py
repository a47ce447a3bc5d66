"""One recipe for a child: a pure plan of what to do, and `make_child` that does it.

The worker, `replay`, and the `mutate` command all make children this way; initial individuals
(and the `train` command's weights) are initialised by `initial_variables`. `plan_child` decides
from the run's config, its control and the parent's birth; clock values are its arguments,
never read inside. `make_child` is a pure function of its key, the parent and the plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax

from evojax_nas import dna as dna_lib
from evojax_nas.config import EvolutionConfig
from evojax_nas.keys import INIT, MUTATE, for_purpose
from evojax_nas.model import init_variables
from evojax_nas.mutations import mutate
from evojax_nas.state import Control


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a child is made from its parent: which mutations, how many, whether it inherits."""

    weights: Mapping[str, float] | None  # mutation name -> relative probability; None: uniform
    count: int  # mutations applied
    inherit: bool  # the child inherits the weights its mutations leave valid
    replaces_parent: bool = False  # a weight reset: the child replaces its parent

    def to_json(self) -> dict:
        """The plan's fields as a record's `mutation` holds them."""
        return {
            "count": self.count,
            "inherit": self.inherit,
            "weights": self.weights,
            "replaces_parent": self.replaces_parent,
        }

    @classmethod
    def from_json(cls, mutation: Mapping[str, Any], cfg: EvolutionConfig) -> Plan:
        """The plan a record's `mutation` says was followed (the config fills in what an older
        record lacks)."""
        return cls(
            weights=mutation.get("weights", cfg.mutation_weights),
            count=int(mutation.get("count", cfg.mutations_per_child)),
            inherit=bool(mutation.get("inherit", cfg.inheritance)),
            replaces_parent=bool(mutation.get("replaces_parent", False)),
        )


def plan_child(cfg: EvolutionConfig, control: Control, parent_birth: float, now: float) -> Plan:
    """What to do to a parent, given the run's config and control (a pure function).

    Args:
        cfg: the run's config (mutation weights, mutations per child, inheritance).
        control: what `adjust` set (a period of a higher mutation rate, a weight reset).
        parent_birth: the parent's birth, Unix seconds (from the population listing).
        now: the current Unix time, to compare with the end of a higher-rate period.
    """
    weights, count = cfg.mutation_weights, cfg.mutations_per_child
    until = control.mutations_until if control.mutations_until is not None else math.inf
    if control.mutations_per_child and now < until:
        count = control.mutations_per_child  # a period of higher mutation rate
    # A population-wide weight reset: an individual born before it is replaced, once, by the
    # same architecture retrained from fresh weights (paper §5, supplementary S3).
    replace = bool(control.reset_at) and parent_birth < control.reset_at
    if replace:
        weights, count = {"reset_weights": 1.0}, 1
    return Plan(weights, count, cfg.inheritance, replace)


def make_child(
    key: jax.Array, parent: dna_lib.DNA, params: Any, plan: Plan
) -> tuple[dna_lib.DNA, Any, dict]:
    """The child the plan makes from `parent` with the event key `key`.

    Returns:
        (the child's DNA, its initial variables, the record's `mutation` dict).
    """
    child, child_params, report = mutate(
        parent,
        params,
        for_purpose(key, MUTATE),
        weights=plan.weights,
        count=plan.count,
        inherit=plan.inherit,
    )
    return child, child_params, {**report.to_dict(), **plan.to_json()}


def make_initial(
    key: jax.Array, input_channels: int, num_classes: int, learning_rate: float
) -> tuple[dna_lib.DNA, Any]:
    """An initial individual (paper §3.2: no convolutions) and its fresh variables."""
    dna = dna_lib.initial_dna(input_channels, num_classes, learning_rate)
    return dna, initial_variables(key, dna)


def initial_variables(key: jax.Array, dna: dna_lib.DNA) -> Any:
    """Fresh variables for `dna`, drawn as an initial individual's are from its event key."""
    return init_variables(dna, for_purpose(key, INIT))


INITIAL_MUTATION = {"names": [], "touched": [], "reinitialised": ["*"]}  # an initial's record
