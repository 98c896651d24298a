"""Pieces of work in a sweep's graph and what comes back when one ends.

A `Work` is one training (role "trainer") or one scoring of a condition (role "scorer"); `needs` names
the works whose results it takes (a condition's scoring needs the training of its checkpoint). `cost`
is the planner's estimate in seconds: the scheduler starts long trainings first with it, and the
simulator uses it as the work's duration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("trainer", "scorer")


@dataclass(eq=False)
class Work:
    id: str
    role: str  # "trainer" or "scorer"
    label: str  # for progress lines
    cost: float  # estimated seconds
    needs: tuple[str, ...] = ()
    payload: Any = None  # what the backend runs (a training job, a scoring task)
    arm: str = ""  # the arm it belongs to (its run directory and arm name)
    affinity: str = ""  # the base model it needs loaded (a scorer keeps to one while it has work)
    # full checkpoints it makes: held (object store, scorers' scratch, the run's disk) until every work
    # that needs it has ended; the scheduler keeps at most `max_held` of them at once
    holds: int = 0

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"work {self.id}: role {self.role!r} is not one of {', '.join(ROLES)}")


@dataclass(eq=False)
class Finished:
    """A work that ended: its result, or `error` (a traceback, after the backend's retries)."""

    work: Work
    worker: str  # the slot it ran on (scorer-0, trainer-3, ...)
    started: float
    ended: float
    result: Any = None
    error: str | None = None
    host: str = ""  # where it ran (host:pid), when the backend knows

    @property
    def seconds(self) -> float:
        return self.ended - self.started
