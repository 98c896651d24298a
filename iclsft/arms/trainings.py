"""Trainings for the SFT arms of both studies: run the planned jobs (on Ray, in this process, or
sharded over Ray Train workers) and turn each finished training into the steps that score its
conditions on its checkpoints, while the other jobs train.

Only the driver writes records. A failed training is retried by Ray (bounded), then recorded as an
error with its traceback for each of its conditions; the other conditions go on.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from iclsft.arms.runner import Step
from iclsft.sft.adapters import is_finished, set_aside_damaged
from iclsft.sft.train import TrainJob, in_training_order, train
from iclsft.spec import ExecutorSpec

logger = logging.getLogger(__name__)

def redo_deleted(arm, run) -> int:
    """The SFT arms' `redo`: with `retrain_deleted`, the conditions scored with a deleted checkpoint."""
    if arm.lora or not arm.spec.retrain_deleted:
        return 0
    from iclsft.sft.retention import redo_deleted as redo

    return redo(run, arm.spec.conditions())


def training_steps(jobs: Sequence[TrainJob], where: dict[str, tuple[Any, str]], executor: ExecutorSpec, arm,
                   shared: dict[str, list[str]] | None = None) -> Iterator[Step]:
    """One step per condition of each job as its training finishes (`where`: condition id -> (condition,
    checkpoint dir)), scored by `arm.outcome` on its checkpoint; call `plan_trainings` first. `shared`:
    condition id -> the other conditions scored with the same checkpoint (said in the record and progress)."""
    shared = shared or {}
    for job, result, error in execute_jobs(jobs, executor):
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
    from iclsft.sft.retention import check_needed

    paths = [Path(d) for j in jobs for _, d in j.checkpoints]
    set_aside_damaged(paths)
    check_needed(paths, retrain_deleted, f"scoring {sum(len(j.meta['conditions']) for j in jobs)} conditions")
    to_train = sum(not all(is_finished(Path(d)) for _, d in j.checkpoints) for j in jobs)
    return f"{to_train} models to train, {len(jobs) - to_train} reused"


def execute_jobs(jobs: Sequence[TrainJob], executor: ExecutorSpec):
    """Yield (job, result, error traceback or None) as trainings finish; jobs whose checkpoints are all
    finished come first, untrained."""
    if not jobs:
        return
    pending = [j for j in jobs if not all(is_finished(Path(d)) for _, d in j.checkpoints)]
    for job in jobs:  # nothing to train: score at once
        if job not in pending:
            yield job, {"seconds": 0.0, "losses": [], "trained": False}, None
    if not pending:
        return
    if pending[0].sft.workers > 1:  # sharded: each training takes all its Ray Train workers, one at a time
        from iclsft.sft.distributed import train_distributed

        for job in pending:
            try:
                yield job, train_distributed(in_training_order(job), executor), None
            except Exception:
                yield job, {}, traceback.format_exc()
        return
    if executor.name == "local":
        for job in pending:
            try:
                yield job, train(job), None
            except Exception:
                yield job, {}, traceback.format_exc()
        return
    yield from _execute_ray(pending, executor)


def _execute_ray(jobs: list[TrainJob], executor: ExecutorSpec):
    try:
        import ray
    except ImportError as e:
        raise ImportError("the SFT arms train on Ray: pip install 'iclsft-eval[sft]' (or use --executor local)") from e
    import torch

    from iclsft.graph.ray_backend import start_ray

    # keep one core for the driver, which scores finished models while the others train
    started_here = start_ray(executor, cpus=max(1, (os.cpu_count() or 2) - 1))
    if started_here:
        logger.info("ray: %g CPUs, %g GPUs", ray.cluster_resources().get("CPU", 0),
                    ray.cluster_resources().get("GPU", 0))
    gpus = 1 if torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) >= 1 else 0
    remote = ray.remote(num_cpus=executor.cpus_per_task, num_gpus=gpus, max_retries=executor.max_retries,
                        retry_exceptions=True)(train)
    refs = {remote.remote(job): job for job in jobs}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            job = refs.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # after Ray's bounded retries
                yield job, {}, "".join(traceback.format_exception(e))
                continue
            yield job, result, None
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
