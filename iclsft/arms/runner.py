"""What every arm of both studies (ICL, SFT, the implicit suite) is and how its pass over a run directory
is kept: the `Arm` protocol, `ArmBase`, and `ArmRun`.

An arm is a frozen spec (its conditions, content-hashed) and a planner: `prepare` plans what is left to
compute (an SFT arm its trainings: a `TrainingPlan`), `outcome` scores one condition on the base model or
on a trained checkpoint, wherever the work graph runs it (`iclsft.graph`: in this process or on a scorer
actor). `ArmRun` does the rest, the same way for every arm: finished conditions skipped, each failure
recorded (its error and traceback in the condition's record) while the other conditions go on, the arm's
own entry in RUN/record.json, the run's metrics table, and failures reported as one `ConditionsFailed`
line at the end.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from iclsft.errors import ConditionsFailed
from iclsft.evaluate.runs import recompute_metrics
from iclsft.sft.adapters import ADAPTERS_DIR, read_marker
from iclsft.sft.retention import finish_deletions
from iclsft.store import RunDir

logger = logging.getLogger(__name__)

# What scoring a condition may fail with and still let the arm go on (anything else, e.g. KeyboardInterrupt,
# stops it)
STEP_ERRORS = (RuntimeError, ValueError, MemoryError, OSError)


@dataclass
class Outcome:
    """A scored condition, not yet written: its files and its record's fields (`metrics` among them).
    Arms compute outcomes wherever the scoring runs (this process or a scorer actor); only the driver
    writes them (`RunDir.write_condition`)."""

    files: dict[str, bytes]
    fields: dict

    @property
    def metrics(self) -> dict:
        return self.fields["metrics"]


@dataclass
class TrainingPlan:
    """What an SFT arm's `prepare` planned: the jobs (trained, or reused where their checkpoints are
    finished), each condition's (condition, checkpoint dir), and the conditions that share their checkpoint
    with others (condition id -> the others' directory names)."""

    jobs: list
    checkpoints: dict[str, tuple[Any, str]]
    shared: dict[str, list[str]] = field(default_factory=dict)


class Arm(Protocol):
    spec: Any  # the arm's frozen, checked spec: .arm, .conditions(), .identity()

    def redo(self, run: RunDir) -> int: ...  # conditions set aside to compute again, before the to-do list

    def prepare(self, run: RunDir, todo: list) -> str: ...  # plan the work; a note for the first progress line

    def outcome(self, cond, checkpoint: str | None = None, record: dict | None = None) -> Outcome: ...

    def describe(self, metrics: dict) -> str: ...

    def close(self) -> None: ...

    def record(self) -> dict: ...  # fields for the arm's run record


class ArmBase:
    """What the arms have in common: a `Scorer` (`iclsft.arms.scorer`) closed at the end, nothing to plan
    by default, and `outcome`: one condition scored on the base model or on a trained checkpoint (the one
    entry point of the scorers)."""

    scorer: Any
    trains: bool = False  # the arm trains models (SFT): it has checkpoints and their policy
    lora: bool = False  # the arm's checkpoints are LoRA adapters
    plan: TrainingPlan | None = None  # an SFT arm's, once prepared

    def outcome(self, cond, checkpoint: str | None = None, record: dict | None = None) -> Outcome:
        """Score `cond` on the base model, or on the trained `checkpoint` (verified first; its marker's
        step, loss and time go into the record); writes nothing."""
        record = dict(record or {})
        if checkpoint is None:
            return self.score(cond, self.scorer.base(), None, record)
        engine, adapter = self.scorer.checkpoint(checkpoint, self.lora)
        return self.score(cond, engine, adapter, checkpoint_record(checkpoint) | record)

    def score(self, cond, engine, adapter: str | None, record: dict) -> Outcome:
        raise NotImplementedError

    def redo(self, run: RunDir) -> int:
        """Finished conditions to compute again (set aside here): none, but see the SFT arms."""
        return 0

    def prepare(self, run: RunDir, todo: list) -> str:
        return ""

    def close(self) -> None:
        self.scorer.close()

    def record(self) -> dict:
        """Fields for the arm's run record: how many engines were started."""
        return {"engine_starts": self.scorer.starts}


class ArmRun:
    """One arm's pass over its run directory (opened for its spec and locked by the caller): the to-do list and the
    plan, each condition's record as it ends (`done`, `failed`: its outcome computed by the work graph), then
    the arm's run record, the run's metrics table and the failures as one `ConditionsFailed`."""

    def __init__(self, arm: Arm, run: RunDir):
        self.arm, self.run, spec = arm, run, arm.spec
        self.conds = spec.conditions()
        if arm.trains:
            finish_deletions(run.path / ADAPTERS_DIR)  # what a killed deletion left
        arm.redo(run)  # e.g. conditions scored with a checkpoint deleted on purpose, with retrain_deleted
        self.todo = [c for c in self.conds if not run.is_done(c)]
        note = arm.prepare(run, self.todo)  # e.g. the SFT arms plan their trainings: "2 models to train, 1 reused"
        logger.info("%s: %d conditions, %d already finished, %d to run%s", spec.arm, len(self.conds),
                    len(self.conds) - len(self.todo), len(self.todo), f"; {note}" if note else "")
        self.started = time.time()
        run.write_arm_record(spec.arm, "running", conditions=len(self.conds), todo=len(self.todo))
        self.failures: list[str] = []
        self.busy = Busy()
        self.count = 0

    def done(self, cond, outcome: Outcome, note: str, seconds: float, worker: str) -> None:
        """Write the outcome of a condition scored elsewhere (`worker`, in `seconds`)."""
        self.run.write_condition(cond, outcome.files, **outcome.fields)
        self._progress(cond, outcome, note, seconds, worker, written=True)

    def failed(self, cond, trace: str, record: dict | None = None, error: str | None = None) -> None:
        error = error or trace.strip().splitlines()[-1]
        self.count += 1
        self.run.write_condition_error(cond, error, traceback=trace, **(record or {}))
        self.failures.append(error)
        logger.warning("[%d/%d] %s: FAILED %s", self.count, len(self.todo), cond.label, error)

    def _progress(self, cond, outcome: Outcome, note: str, seconds: float, worker: str, written: bool) -> None:
        self.count += 1
        self.busy.add("scorer", worker, seconds)
        how = f"{note}, " if note else ""
        where = f" on {worker}" if worker != socket.gethostname() else ""
        logger.info("[%d/%d] %s: %s%s (%.1f s%s)", self.count, len(self.todo), cond.label, how,
                    self.arm.describe(outcome.metrics), seconds, where)

    def interrupted(self, e: BaseException) -> None:
        self.run.write_arm_record(self.arm.spec.arm, "interrupted", error=f"{type(e).__name__}: {e}",
                                  seconds=round(time.time() - self.started, 1))

    def finish(self, **record) -> pd.DataFrame:
        """The arm's run record and the run's metrics table; raises ConditionsFailed when any failed."""
        spec, run = self.arm.spec, self.run
        table = recompute_metrics(run.path, skip_damaged=True)  # another arm's damaged file: named, not fatal
        wall = time.time() - self.started
        if self.todo:
            logger.info("%s: %d conditions in %.0f s; %s", spec.arm, len(self.todo), wall, self.busy.summary(wall))
        run.write_arm_record(spec.arm, "error" if self.failures else "ok", conditions=len(self.conds),
                             failed=len(self.failures), seconds=round(wall, 1), busy=self.busy.record(wall),
                             **(self.arm.record() | record))
        if self.failures:
            raise ConditionsFailed(
                f"{len(self.failures)} of {len(self.todo)} {spec.arm} conditions failed (first: {self.failures[0]}; "
                f"their record.json under {run.path / 'conditions'} holds the error); rerun the same command to "
                "retry them")
        return table


def checkpoint_record(ckpt: str | Path) -> dict:
    """A checkpoint's own step, loss and training time (from its marker), for the records it scores."""
    marker = read_marker(Path(ckpt))
    return {"checkpoint_dir": Path(ckpt).name, "train_seconds": marker.get("seconds"),
            "train_steps": marker.get("step"), "total_steps": marker.get("total_steps"),
            "final_loss": marker.get("loss")}


class Busy:
    """Busy seconds per role ("scorer": this process computing conditions; "trainer": the trainings
    behind them) and per worker, for the arm's summary and run record."""

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}

    def add(self, role: str, worker: str, seconds: float) -> None:
        per_worker = self.seconds.setdefault(role, {})
        per_worker[worker] = per_worker.get(worker, 0.0) + seconds

    def record(self, wall: float) -> dict:
        """role -> busy seconds, workers, utilisation (busy / (workers x wall))."""
        return {role: {"seconds": round(sum(w.values()), 1), "workers": len(w),
                       "utilisation": round(sum(w.values()) / (len(w) * wall), 3) if wall > 0 else 0.0}
                for role, w in self.seconds.items()}

    def summary(self, wall: float) -> str:
        parts = [f"{role}s busy {r['seconds']:.0f} s on {r['workers']} worker{'s' * (r['workers'] > 1)} "
                 f"({100 * r['utilisation']:.0f}%)" for role, r in sorted(self.record(wall).items())]
        return ", ".join(parts) or "nothing computed"
