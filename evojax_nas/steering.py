"""Steering a live run (paper §5, Figure 4): what an `adjust` request does to the run's control.

The escape from local optima is a period of a higher mutation rate, or a population-wide weight
reset. `steer` is the pure rule, from the current `Control` and the request (and the time of the
change, passed in) to the new control and the events to append to the run's history;
`evojax_nas.app.adjust` applies it to a store. Plain Python, no I/O.
"""

from __future__ import annotations

import dataclasses

from evojax_nas.errors import EvojaxNasError
from evojax_nas.state import MAX_MUTATIONS, Control


@dataclasses.dataclass(frozen=True)
class Adjustment:
    """A requested change to a live run.

    Attributes:
        mutations_per_child: mutations applied to each child from now on (the paper's period
            of increased mutation rate); the run's config value restores the normal rate.
        for_minutes: length of that period; None means until changed again.
        reset_all_weights: every lineage's next child starts from fresh weights (the paper's
            population-wide weight reset).
    """

    mutations_per_child: int | None = None
    for_minutes: float | None = None
    reset_all_weights: bool = False

    def check(self) -> None:
        """Raises EvojaxNasError (a user error) for an empty or out-of-range request."""
        k = self.mutations_per_child
        if k is None and not self.reset_all_weights:
            raise EvojaxNasError(
                "nothing to adjust: give --mutations-per-child K or --reset-all-weights"
            )
        if k is not None and not 1 <= k <= MAX_MUTATIONS:
            raise EvojaxNasError(
                f"--mutations-per-child must be between 1 and {MAX_MUTATIONS}, got {k}"
            )
        if self.for_minutes is not None and (k is None or self.for_minutes <= 0):
            raise EvojaxNasError("--for-minutes needs --mutations-per-child and a positive value")


def steer(control: Control, change: Adjustment, now: float) -> tuple[Control, tuple[dict, ...]]:
    """The run's control after `change`, made at Unix time `now`, and its history events.

    Args:
        control: the run's current control.
        change: the request (checked with `Adjustment.check`).
        now: the time of the change.

    Returns:
        (the new control, the events to append to the run's history).
    """
    change.check()
    events = []
    if change.mutations_per_child is not None:
        until = None if change.for_minutes is None else now + 60 * change.for_minutes
        control = dataclasses.replace(
            control, mutations_per_child=change.mutations_per_child, mutations_until=until
        )
        events.append(
            {
                "time": now,
                "kind": "mutation_rate",
                "mutations_per_child": change.mutations_per_child,
                "until": until,
            }
        )
    if change.reset_all_weights:
        control = dataclasses.replace(control, reset_at=now)
        events.append({"time": now, "kind": "weight_reset"})
    return control, tuple(events)
