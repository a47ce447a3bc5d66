"""Has evolution stopped changing architectures? A diagnosis from a run's records alone.

The paper's Figure 3 (right): with too few training steps per child, a child whose mutation
changed its architecture (a fresh convolution, more channels) is measured before it has caught
up with its parent, loses the tournament, and the population stays in a local optimum. This
module reads `store.records()` (one listing, no DNA, no weights, no JAX) and says whether a run
looks stuck, and what to do about it.

Definitions (all over records; dead individuals' records are kept forever):

* a *child* is a trained record (numeric "born") with a parent;
* a *structural* child is one whose architecture differs from its parent's ("architecture_key",
  else the "architecture" text; when neither is recorded, a mutation other than
  `alter_learning_rate`, `identity` and `reset_weights`);
* a structural child is *accepted* when selection kept it: it reproduced (some record names it
  as parent), or it is alive and at least `population` children were born after it (it survived
  about a generation of tournaments). A structural child alive for only a few births has not
  been tested yet;
* a lineage *gained a convolution* when one of its children applied `insert_convolution` or
  shows more convolutions in its "architecture" text (`C3x3`…) than its parent.

Two more measurements help read a narrow population (README, "Evolution vs the paper's
controls"): the median learning rate alive against the initial individuals' (a population
that lowered its learning rate trains a child's freshly initialised layers slowly), and how
many `alter_number_of_channels` children did at least as well as their parent (with
inheritance, the changed convolution and every layer after it start from fresh weights).

The run is *stalled* when at least `window = max(2 × population, 50)` children were born and
either no accepted structural change happened in the last `window` children, or no alive
individual descends from a lineage that gained a convolution (the failure of issue 14: the
population stays convolution-free). Two generations without an accepted change is long for
the paper's tournament, which replaces the population about once per `population` children;
the floor of 50 keeps tiny populations from being called stalled by chance. When no recorded
mutation can change an architecture (the run's `mutation_weights`), nothing is called stalled.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

NON_STRUCTURAL = frozenset({"alter_learning_rate", "identity", "reset_weights"})
MIN_WINDOW = 50
_CONV = re.compile(r"\bC\d+x\d+")
_CONV_DEPTH = re.compile(r"\bC\d+x\d+(?:/\d+)?\((\d+)\)")


@dataclasses.dataclass(frozen=True)
class StallDiagnosis:
    """What `diagnose` found; `to_dict` is the JSON form in `status` and `report`.

    Attributes:
        children: trained individuals with a parent.
        window: children without an accepted structural change that make a stall.
        alive: alive trained individuals.
        alive_architectures: distinct architectures among them.
        alive_conv_lineage_share: share of them whose lineage gained a convolution (None: none
            alive).
        alive_convolutions_mean: mean convolutions on their backbones (None: not recorded).
        alive_widest_convolution: the most output channels of any backbone convolution of an
            alive individual (0: none has a convolution; None: not recorded). At a few
            hundred steps per child an inheriting population can keep adding convolutions but
            stop widening them (README, "Evolution vs the paper's controls").
        widest_convolution_born: the same over every trained individual of the run.
        alive_learning_rate: median learning rate of the alive (None: not recorded).
        initial_learning_rate: median learning rate of the initial individuals (no parent).
        channel_children: children of `alter_number_of_channels` alone whose parent is known.
        channel_children_kept_pace: how many of them reached at least their parent's
            validation accuracy.
        last_structural_id: the latest accepted structural child (None: none yet).
        last_structural_born: its birth (unix time).
        children_since_structural: children born after it (all children when there is none).
        seconds_since_structural: from its birth to `now` (None when there is none).
        stalled: the run looks stuck (see the module docstring).
        reason: one sentence on the state.
        advice: what to do (empty when not stalled).
    """

    children: int
    window: int
    alive: int
    alive_architectures: int
    alive_conv_lineage_share: float | None
    alive_convolutions_mean: float | None
    alive_widest_convolution: int | None
    widest_convolution_born: int | None
    alive_learning_rate: float | None
    initial_learning_rate: float | None
    channel_children: int
    channel_children_kept_pace: int
    last_structural_id: str | None
    last_structural_born: float | None
    children_since_structural: int
    seconds_since_structural: float | None
    stalled: bool
    reason: str
    advice: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _names(record: dict) -> list[str]:
    mutation = record.get("mutation")
    names = mutation.get("names") if isinstance(mutation, dict) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def convolutions(record: dict) -> int | None:
    """Convolutions on the backbone, counted in the record's "architecture" text (None: none)."""
    text = record.get("architecture")
    return len(_CONV.findall(text)) if isinstance(text, str) else None


def widest_convolution(record: dict) -> int | None:
    """Output channels of the widest backbone convolution in the record's "architecture" text
    (0: no convolution; None: not recorded)."""
    text = record.get("architecture")
    if not isinstance(text, str):
        return None
    return max((int(d) for d in _CONV_DEPTH.findall(text)), default=0)


def _widest(records: Iterable[dict]) -> int | None:
    widths = [w for w in map(widest_convolution, records) if w is not None]
    return max(widths) if widths else None


def _median_learning_rate(records: Iterable[dict]) -> float | None:
    rates = [r["learning_rate"] for r in records if _num(r.get("learning_rate"))]
    return statistics.median(rates) if rates else None


def _channel_children(children: Iterable[dict], by_id: dict[str, dict]) -> tuple[int, int]:
    """(children of `alter_number_of_channels` alone with a known parent, how many of them
    reached their parent's validation accuracy)."""
    total = kept = 0
    for r in children:
        parent = by_id.get(r["parent"])
        if _names(r) != ["alter_number_of_channels"] or parent is None:
            continue
        mine, theirs = r.get("val_accuracy"), parent.get("val_accuracy")
        if _num(mine) and _num(theirs):
            total += 1
            kept += mine >= theirs
    return total, kept


def _arch(record: dict) -> str | None:
    for field in ("architecture_key", "architecture"):
        if isinstance(record.get(field), str):
            return f"{field}:{record[field]}"
    return None


def is_structural(child: dict, parent: dict | None) -> bool:
    """Did the child's architecture change relative to its parent?"""
    mine, theirs = _arch(child), _arch(parent) if parent is not None else None
    if mine is not None and theirs is not None and mine.split(":")[0] == theirs.split(":")[0]:
        return mine != theirs
    return any(n not in NON_STRUCTURAL for n in _names(child))


def gained_convolution(child: dict, parent: dict | None) -> bool:
    """Did this child add a convolution to its lineage?"""
    if "insert_convolution" in _names(child):
        return True
    mine, theirs = convolutions(child), convolutions(parent) if parent is not None else None
    return mine is not None and theirs is not None and mine > theirs


def structural_possible(children: Iterable[dict]) -> bool:
    """False only when every child records mutation weights that exclude structural mutations."""
    for r in children:
        mutation = r.get("mutation")
        weights = mutation.get("weights") if isinstance(mutation, dict) else None
        if not isinstance(weights, dict):
            return True  # unrecorded, or None (uniform over all mutations)
        if any(_num(w) and w > 0 and n not in NON_STRUCTURAL for n, w in weights.items()):
            return True
    return False


def _lineage_gained(ind_id: str, by_id: dict[str, dict], memo: dict[str, bool]) -> bool:
    chain, seen, cur = [], set(), by_id.get(ind_id)
    while cur is not None and cur["id"] not in memo and cur["id"] not in seen:
        seen.add(cur["id"])  # a hostile store may hold a cycle
        chain.append(cur)
        cur = by_id.get(cur.get("parent")) if isinstance(cur.get("parent"), str) else None
    gained = memo.get(cur["id"], False) if cur is not None else False
    for r in reversed(chain):  # oldest first
        gained = gained or gained_convolution(r, by_id.get(r.get("parent")))
        memo[r["id"]] = gained
    return memo.get(ind_id, False)


def diagnose(
    records: Sequence[dict],
    population: int | None = None,
    now: float | None = None,
    *,
    run: str = "RUN",
    steps: int | None = None,
    command: str = "evojax-nas",
) -> StallDiagnosis:
    """Reads a run's records and says whether its architectures stopped changing.

    Args:
        records: `store.records()`; malformed entries are skipped, missing fields tolerated.
        population: the run's set-point (default: the number alive).
        now: the time `seconds_since_structural` is measured to (default: the last birth).
        run: the run's store, as named in the advice.
        steps: the run's training steps per child (the advice suggests twice as many).
        command: how to call evojax-nas in the advice.

    Returns:
        A `StallDiagnosis`.
    """
    by_id = {r["id"]: r for r in records if isinstance(r, dict) and isinstance(r.get("id"), str)}
    done = sorted(
        (r for r in by_id.values() if _num(r.get("born"))), key=lambda r: (r["born"], r["id"])
    )
    children = [r for r in done if isinstance(r.get("parent"), str)]
    alive = [r for r in done if r.get("alive") is True]
    population = population if _num(population) and population > 0 else max(len(alive), 1)
    window = max(2 * int(population), MIN_WINDOW)
    parents = {r.get("parent") for r in by_id.values()}
    order = {r["id"]: i for i, r in enumerate(children)}

    def accepted(r: dict) -> bool:
        later = len(children) - 1 - order[r["id"]]
        return r["id"] in parents or (r.get("alive") is True and later >= population)

    last = next(
        (r for r in reversed(children) if is_structural(r, by_id.get(r["parent"])) and accepted(r)),
        None,
    )
    since = len(children) - 1 - order[last["id"]] if last else len(children)
    memo: dict[str, bool] = {}
    conv_share = (
        sum(_lineage_gained(r["id"], by_id, memo) for r in alive) / len(alive) if alive else None
    )
    convs = [c for c in map(convolutions, alive) if c is not None]
    end = now if _num(now) else (done[-1]["born"] if done else None)
    stalled, reason = _verdict(children, window, since, conv_share)
    channel_children, channel_kept = _channel_children(children, by_id)
    return StallDiagnosis(
        children=len(children),
        window=window,
        alive=len(alive),
        alive_architectures=len({_arch(r) or r["id"] for r in alive}),
        alive_conv_lineage_share=conv_share,
        alive_convolutions_mean=sum(convs) / len(convs) if convs else None,
        alive_widest_convolution=_widest(alive),
        widest_convolution_born=_widest(done),
        alive_learning_rate=_median_learning_rate(alive),
        initial_learning_rate=_median_learning_rate(
            r for r in done if not isinstance(r.get("parent"), str)
        ),
        channel_children=channel_children,
        channel_children_kept_pace=channel_kept,
        last_structural_id=last["id"] if last else None,
        last_structural_born=last["born"] if last else None,
        children_since_structural=since,
        seconds_since_structural=max(0.0, end - last["born"]) if last and end is not None else None,
        stalled=stalled,
        reason=reason,
        advice=advice(run, steps, command) if stalled else "",
    )


def _verdict(
    children: Sequence[dict], window: int, since: int, conv_share: float | None
) -> tuple[bool, str]:
    if len(children) < window:
        return False, f"too early to tell: {len(children)} of {window} children born"
    if not structural_possible(children):
        return False, "the run's mutation_weights allow no change of architecture"
    if since >= window:
        return True, f"no accepted change of architecture in the last {since} children"
    if conv_share == 0:
        return True, "no alive individual descends from a lineage that gained a convolution"
    return False, "architectures are still changing"


def advice(run: str, steps: int | None = None, command: str = "evojax-nas") -> str:
    """The paper's remedies for a stalled run, as commands to paste.

    Args:
        run: the run's store (as the user typed it or its URL).
        steps: the run's training steps per child, to suggest twice as many.
        command: how to call evojax-nas.
    """
    more = f"--steps {2 * steps}" if _num(steps) and steps > 0 else "a larger --steps"
    return (
        f"a higher mutation rate for a while: `{command} adjust {run} --mutations-per-child 3 "
        f"--for-minutes 5`; or retrain every lineage from fresh weights: `{command} adjust "
        f"{run} --reset-all-weights`; or start a new run with more training steps per child "
        f"({more}), so that a changed architecture can catch up with its parent before it is "
        "judged (paper §5, Figure 3)"
    )


def summary_lines(d: dict[str, Any]) -> list[str]:
    """`status`/`report` text: one line (two when stalled), from `StallDiagnosis.to_dict()`."""
    if not isinstance(d, dict):
        return []
    share = d.get("alive_conv_lineage_share")
    parts = [
        d.get("reason", ""),
        f"{d.get('alive_architectures', 0)} distinct architecture(s) alive",
        "conv lineages n/a"
        if share is None
        else f"{100 * share:.0f}% of alive lineages gained a convolution",
    ]
    alive_w, born_w = d.get("alive_widest_convolution"), d.get("widest_convolution_born")
    if _num(alive_w) and _num(born_w):
        parts.append(f"widest convolution alive {alive_w} channels (widest born {born_w})")
    lr, lr0 = d.get("alive_learning_rate"), d.get("initial_learning_rate")
    if _num(lr) and _num(lr0):
        parts.append(f"median learning rate alive {lr:.3g} (initial {lr0:.3g})")
    total, kept = d.get("channel_children"), d.get("channel_children_kept_pace")
    if _num(total) and _num(kept) and total:
        parts.append(f"{kept} of {total} channel-count children matched their parent")
    since, seconds = d.get("children_since_structural"), d.get("seconds_since_structural")
    if d.get("last_structural_id") and _num(since) and _num(seconds):
        parts.insert(1, f"last one {since} children / {seconds / 60:.1f} min ago")
    head = "STALLED: " if d.get("stalled") else ""
    lines = [f"stall check       {head}{'; '.join(parts)}"]
    if d.get("stalled") and d.get("advice"):
        lines.append(f"  remedies        {d['advice']}")
    return lines
