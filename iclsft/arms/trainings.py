"""What the SFT arms of both studies share in planning their trainings: damaged checkpoints set aside,
deleted ones refused or trained again, and the notes their progress lines carry. The trainings run as the
work graph's trainer works (`iclsft.graph`), each finished one's conditions scored while others train."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from iclsft.sft.adapters import is_finished, set_aside_damaged
from iclsft.sft.retention import check_needed
from iclsft.sft.retention import redo_deleted as redo
from iclsft.sft.train import TrainJob

logger = logging.getLogger(__name__)


def redo_deleted(arm, run) -> int:
    """The SFT arms' `redo`: with `retrain_deleted`, the conditions scored with a deleted checkpoint."""
    if arm.lora or not arm.spec.retrain_deleted:
        return 0
    return redo(run, arm.spec.conditions())


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
