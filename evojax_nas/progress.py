"""Live progress of a run on the terminal: one line per trained child, from worker events."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any


@dataclasses.dataclass
class Progress:
    """Live totals from worker events; prints one line per trained child (nothing if `out`
    is None)."""

    budget: int | None
    start: float = dataclasses.field(default_factory=time.time)
    children: int = 0  # in the run, including `offset` trained before this session
    offset: int = 0  # children trained before this session (not in the rate)
    kills: int = 0
    abandoned: int = 0
    best: float = 0.0
    best_id: str = ""
    flops: float = 0.0
    population: int = 0
    out: Any = dataclasses.field(default_factory=lambda: sys.stdout)  # the current stdout
    errors: list = dataclasses.field(default_factory=list)  # messages of failed workers
    by_worker: dict = dataclasses.field(default_factory=dict)  # children per worker ID
    last_by_worker: dict = dataclasses.field(default_factory=dict)  # last child's ID per worker

    def __post_init__(self):
        self.children = max(self.children, self.offset)

    def say(self, line: str) -> None:
        if self.out is not None:
            print(line, file=self.out, flush=True)

    def forget(self, worker: int, ind_id: str) -> None:
        """Uncounts `worker`'s last reported child `ind_id`: it never reached the store (the
        worker died while publishing it in the background)."""
        if self.last_by_worker.get(worker) == ind_id:
            del self.last_by_worker[worker]
            self.by_worker[worker] -= 1
            self.children -= 1

    def count_unreported(self, worker: int, count: int) -> None:
        """Counts `count` children of `worker` that are in the store but were never reported
        (the worker was killed before its report left the process)."""
        self.by_worker[worker] = self.by_worker.get(worker, 0) + count
        self.children += count

    def update(self, event: dict) -> None:
        action = event.get("action")
        if action == "error":
            self.errors.append(event["message"])
            return
        self.population = event.get("population", self.population)
        if action == "kill":
            self.kills += 1
            return
        if action not in ("initial", "reproduce"):
            self.abandoned += action == "abandoned"
            return
        self.children += 1
        self.by_worker[event.get("worker")] = self.by_worker.get(event.get("worker"), 0) + 1
        self.last_by_worker[event.get("worker")] = event["id"]
        self.flops += event.get("flops", 0.0)
        if event.get("val_accuracy", 0.0) > self.best:
            self.best, self.best_id = event["val_accuracy"], event["id"]
        minutes = max(time.time() - self.start, 1e-9) / 60
        total = f"/{self.budget}" if self.budget is not None else ""
        names = ",".join(event.get("mutation", {}).get("names", [])) or "initial"
        self.say(
            f"[{minutes:6.1f} min] children {self.children}{total} | best val "
            f"{self.best:.4f} | population {self.population} | FLOPs {self.flops:.2e} | "
            f"{(self.children - self.offset) / minutes:.1f}/min | {event['id']} {names} "
            f"val {event.get('val_accuracy', 0):.4f}"
        )
