"""`steer`: the pure rule of `adjust`, from (control, request, time) to the new control."""

import pytest

from evojax_nas.errors import EvojaxNasError
from evojax_nas.state import Control
from evojax_nas.steering import Adjustment, steer


def test_a_period_of_higher_mutation_rate_ends_when_asked():
    control, events = steer(Control(), Adjustment(mutations_per_child=4, for_minutes=2), 100.0)
    assert control == Control(mutations_per_child=4, mutations_until=220.0)
    assert events == (
        {"time": 100.0, "kind": "mutation_rate", "mutations_per_child": 4, "until": 220.0},
    )
    # A new rate without a length replaces the old period: until changed again.
    control, events = steer(control, Adjustment(mutations_per_child=2), 300.0)
    assert control == Control(mutations_per_child=2, mutations_until=None)
    assert events[0]["until"] is None


def test_a_weight_reset_keeps_the_mutation_rate():
    before = Control(mutations_per_child=3, mutations_until=50.0)
    control, events = steer(before, Adjustment(reset_all_weights=True), 10.0)
    assert control == Control(mutations_per_child=3, mutations_until=50.0, reset_at=10.0)
    assert events == ({"time": 10.0, "kind": "weight_reset"},)
    both, events = steer(Control(), Adjustment(5, None, True), 7.0)
    assert both == Control(mutations_per_child=5, reset_at=7.0)
    assert [e["kind"] for e in events] == ["mutation_rate", "weight_reset"]


@pytest.mark.parametrize(
    "change, message",
    [
        (Adjustment(), "nothing to adjust"),
        (Adjustment(mutations_per_child=0), "between 1 and 100"),
        (Adjustment(mutations_per_child=101), "between 1 and 100"),
        (Adjustment(for_minutes=3, reset_all_weights=True), "--for-minutes needs"),
        (Adjustment(mutations_per_child=2, for_minutes=0), "positive"),
    ],
)
def test_bad_requests_are_user_errors(change, message):
    with pytest.raises(EvojaxNasError, match=message):
        steer(Control(), change, 0.0)
