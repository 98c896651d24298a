"""Pieces of work in a sweep's graph and what comes back when one ends.

A `Work` is one training (role "trainer") or one scoring of a condition (role "scorer"); `needs` names
the works whose results it takes (a condition's scoring needs the training of its checkpoint). `cost`
is the planner's estimate in seconds: the scheduler starts long trainings first with it, and the
simulator uses it as the work's duration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    # what its slot must have open, and the seconds to open it (the simulator's engines and hook models)
    setup: tuple[tuple[str, float], ...] = ()

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


def icl_chains(conds: Sequence) -> list[list]:
    """ICL conditions in chains that share a growing prompt (`ConditionBase.chain`: one task, seed and, in
    the 2D study, order; implicit: both variants after the same prompt), `chain_rank` ascending (K first),
    chains in the arm's order."""
    chains: dict[tuple, list] = {}
    for c in conds:
        chains.setdefault(c.chain, []).append(c)
    return [sorted(chain, key=lambda c: c.chain_rank) for chain in chains.values()]


def unit_label(conds: Sequence) -> str:
    """A work's label from its conditions'."""
    return conds[0].label if len(conds) == 1 else f"{conds[0].label} (+{len(conds) - 1})"


def scoring_share(works: Iterable[Work]) -> float | None:
    """The part of the works' seconds that scorers do (scoring and RSA, and each distinct setup once: at
    least one engine per full checkpoint where engines cannot swap weights); None when there is no work."""
    seconds = {role: 0.0 for role in ROLES}
    setups: dict[str, tuple[str, float]] = {}
    for w in works:
        seconds[w.role] += w.cost
        for key, extra in w.setup:
            setups[key] = (w.role, extra)
    for role, extra in setups.values():
        seconds[role] += extra
    total = sum(seconds.values())
    return seconds["scorer"] / total if total > 0 else None
