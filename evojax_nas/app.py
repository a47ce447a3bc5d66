"""The application layer: one run opened once — its store, config and task.

`open_run(url)` is what the command line, a worker process, `replay` and `report` call instead of
each opening the store, reading the config, loading the dataset and building an evaluator on
their own. Importing this module imports no JAX: the dataset is loaded, and the training
evaluator built, only when asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

from evojax_nas.config import EvolutionConfig, stored_config
from evojax_nas.errors import ConcurrencyError, EvojaxNasError
from evojax_nas.state import CONTROL, HISTORY, Control
from evojax_nas.steering import Adjustment, steer
from evojax_nas.store import Store, open_store, retrying


@dataclasses.dataclass(frozen=True)
class Task:
    """What a run trains on: its dataset and how a child is evaluated on it."""

    dataset: Any  # evojax_nas.data.Dataset
    store: Store
    cfg: EvolutionConfig

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.image_shape)

    @property
    def input_channels(self) -> int:
        return int(self.dataset.image_shape[-1])

    @property
    def num_classes(self) -> int:
        return int(self.dataset.num_classes)

    def evaluator(self):
        """A new training evaluator (train, then validation accuracy) for the run's children.

        Its programs come from the run's store when the config says so (see
        `evojax_nas.programs`); the data is uploaded to the device once, here.
        """
        from evojax_nas.evolution import program_cache, training_evaluator

        return training_evaluator(self.dataset, self.cfg, program_cache(self.store, self.cfg))


@dataclasses.dataclass(frozen=True)
class Run:
    """An opened run: its store and config; its task is loaded on first use."""

    store: Store
    cfg: EvolutionConfig

    @property
    def url(self) -> str:
        return self.store.url

    @functools.cached_property
    def task(self) -> Task:
        """The run's dataset (loaded once, on first use) and evaluator factory."""
        from evojax_nas.data import load_dataset

        dataset = load_dataset(self.cfg.dataset, data_dir=self.cfg.data_dir)
        return Task(dataset, self.store, self.cfg)


def open_run(where: str | Store, *, retry: bool = False) -> Run:
    """Opens an existing run.

    Args:
        where: the run's store, or its address (never created here).
        retry: wait out storage outages on every call (what a worker does).

    Raises:
        NotFoundError: there is no run at `where`.
    """
    store = open_store(where, create=False) if isinstance(where, str) else where
    if retry:
        store = retrying(store)
    return Run(store, stored_config(store.read_config()))


def adjust(store: Store, change: Adjustment, *, now: float | None = None) -> Control:
    """Steers a live run (`steering.steer`); workers apply the change at their next step.

    Writes the run's control meta and appends the change to its history (drawn on Figure 1),
    each with compare-and-swap.

    Args:
        store: the run's store.
        change: what to change.
        now: the time of the change (tests); default `time.time()`.

    Returns:
        The new control.

    Raises:
        EvojaxNasError: nothing to change, a bad value, too many concurrent writers.
        NotFoundError: no run at `store`.
    """
    change.check()  # before reading anything: a bad request is the clearer error
    store.read_config()  # NotFoundError (a user error) when there is no run here
    now = time.time() if now is None else now
    events: tuple[dict, ...] = ()

    def new_control(value: dict | None) -> dict:
        nonlocal events  # a retried compare-and-swap recomputes both
        control, events = steer(Control.from_json(value), change, now)
        return control.to_json()

    control = Control.from_json(_update_meta(store, CONTROL, new_control))
    _update_meta(store, HISTORY, lambda h: {"events": [*(h or {}).get("events", []), *events]})
    return control


def _update_meta(store: Store, name: str, change) -> dict:
    """`Store.update_meta`, a lost race on every attempt reported as a user error."""
    try:
        return store.update_meta(name, change, pause=0.05)
    except ConcurrencyError:
        raise EvojaxNasError(
            f"could not update {name} of {store.url}: too many concurrent writers"
        ) from None
