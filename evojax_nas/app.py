"""The application layer: one run opened once — its store, config and task.

`open_run(url)` is what the command line, a worker process, `replay` and `report` call instead of
each opening the store, reading the config, loading the dataset and building an evaluator on
their own. Importing this module imports no JAX: the dataset is loaded, and the training
evaluator built, only when asked for.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from evojax_nas.config import EvolutionConfig, from_dict
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
    return Run(store, from_dict(store.read_config()))
