"""Trainings for the SFT arms of both studies: run the planned jobs (in this process, or as the driver
says: on Ray, sharded over Ray Train workers; `iclsft.graph.driver`) and turn each finished training into
the steps that score its conditions on its checkpoints, while the other jobs train.

Only the driver writes records. A failed training is retried by Ray (bounded), then recorded as an
error with its traceback for each of its conditions; the other conditions go on.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from iclsft.arms.runner import Step
from iclsft.sft.adapters import is_finished, set_aside_damaged
from iclsft.sft.retention import check_needed
from iclsft.sft.retention import redo_deleted as redo
from iclsft.sft.train import TrainJob, train

logger = logging.getLogger(__name__)

# trains the given jobs; yields (job, result, error traceback or None) as each ends
TrainJobs = Callable[[Sequence[TrainJob]], Iterable[tuple[TrainJob, dict, str | None]]]

def redo_deleted(arm, run) -> int:
    """The SFT arms' `redo`: with `retrain_deleted`, the conditions scored with a deleted checkpoint."""
    if arm.lora or not arm.spec.retrain_deleted:
        return 0
    return redo(run, arm.spec.conditions())


def training_steps(jobs: Sequence[TrainJob], where: dict[str, tuple[Any, str]], arm,
                   shared: dict[str, list[str]] | None = None) -> Iterator[Step]:
    """One step per condition of each job as its training finishes (`where`: condition id -> (condition,
    checkpoint dir)), scored by `arm.outcome` on its checkpoint (trained by `arm.train_jobs`); call
    `plan_trainings` first. `shared`: condition id -> the other conditions scored with the same checkpoint
    (said in the record and progress)."""
    shared = shared or {}
    for job, result, error in execute_jobs(jobs, arm.train_jobs):
        ckpts = []
        worker = result.get("worker", "?")
        work = ("trainer", worker, float(result.get("seconds", 0.0))) if result.get("trained") else None
        for cond_id in job.meta["conditions"]:
            cond, ckpt = where[cond_id]
            if error is not None:
                yield Step(cond, error=error, record={"checkpoint_dir": Path(ckpt).name})
                continue
            ckpts.append(ckpt)
            record = {"trained_now": bool(result.get("trained"))} | (
                {"shared_with": shared[cond_id]} if cond_id in shared else {})
            # inside the step: a missing or damaged checkpoint fails its conditions, not the arm
            yield Step(cond, compute=partial(arm.outcome, cond, ckpt, record),
                       note=training_note(result, shared.get(cond_id)), record={"checkpoint_dir": Path(ckpt).name},
                       work=work)
            work = None  # a training's time counts once, with its first condition
        for ckpt in dict.fromkeys(ckpts):
            arm.scorer.release(ckpt)


def training_note(result: dict, shared: list[str] | None) -> str:
    """How a condition's model came to be, for its progress line."""
    note = (f"trained {result.get('seconds', 0):.0f} s on {result.get('worker', '?')}" if result.get("trained")
            else "reused its checkpoint")
    return note + (f", shared with {', '.join(shared)}" if shared else "")


def plan_trainings(jobs: Sequence[TrainJob], retrain_deleted: bool = False) -> str:
    """Set damaged checkpoints aside (renamed, never read; they are trained again), refuse checkpoints
    deleted on purpose (or with `retrain_deleted` remove them: trained again; iclsft.sft.retention), then
    say how many models are to be trained and how many are reused."""
    paths = [Path(d) for j in jobs for _, d in j.checkpoints]
    set_aside_damaged(paths)
    check_needed(paths, retrain_deleted, f"scoring {sum(len(j.meta['conditions']) for j in jobs)} conditions")
    to_train = sum(not all(is_finished(Path(d)) for _, d in j.checkpoints) for j in jobs)
    return f"{to_train} models to train, {len(jobs) - to_train} reused"


def execute_jobs(jobs: Sequence[TrainJob], train_jobs: TrainJobs | None = None):
    """Yield (job, result, error traceback or None) as trainings finish; jobs whose checkpoints are all
    finished come first, untrained. `train_jobs` trains the others (the driver's: on Ray, sharded over Ray
    Train workers, ...); default: one after another in this process."""
    pending = [j for j in jobs if not all(is_finished(Path(d)) for _, d in j.checkpoints)]
    for job in jobs:  # nothing to train: score at once
        if job not in pending:
            yield job, {"seconds": 0.0, "losses": [], "trained": False}, None
    if pending:
        yield from (train_jobs or train_here)(pending)


def train_here(jobs: Sequence[TrainJob]):
    """The trainings in this process, one after another: (job, result, error traceback or None)."""
    for job in jobs:
        try:
            yield job, train(job), None
        except Exception:
            yield job, {}, traceback.format_exc()
