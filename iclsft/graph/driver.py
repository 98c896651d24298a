"""The one entry point that runs an arm (`icl`, `sft`, `implicit`, the library's `run_spec`) and the one
rule for where a sweep's arms run (`runs_on_graph`).

On Ray, unless a training is sharded over Ray Train workers, the arms of a sweep run as one work graph
(`iclsft.graph.run`); a single SFT arm from the CLI does too (`graph=True`: trainings as tasks, a scorer
actor of its own, RUN/graph.json). Otherwise an arm runs through the arm runner in this process
(`iclsft.arms.runner.run_arm`), its trainings given by this module: Ray tasks (`train_on_ray`) while this
process scores the finished ones, each sharded over Ray Train workers (`train_sharded`), or in this
process (`executor: local`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from iclsft.arms import make_arm
from iclsft.arms.runner import run_arm
from iclsft.errors import ConditionsFailed
from iclsft.graph.ray_backend import train_on_ray, train_sharded
from iclsft.graph.run import run_graph
from iclsft.models import ModelRef
from iclsft.store import RunDir


def sharded(spec) -> bool:
    """The arm's trainings are sharded over Ray Train workers (each takes them all, one at a time)."""
    return spec.training is not None and spec.training.workers > 1


def runs_on_graph(executor, specs: Iterable) -> bool:
    """Where arms that share `executor` run: as one work graph on Ray, unless one of them shards its
    trainings; else one after another in this process."""
    return executor.name == "ray" and not any(sharded(s) for s in specs)


def run_spec(spec, out: str | Path, ref: ModelRef, *, progress: bool = True, retain: bool = True,
             graph: bool = False) -> pd.DataFrame:
    """Run (or resume) every condition of the arm `spec` into the run directory `out`; return the run's
    metrics table. `graph`: an arm that trains runs as a one-arm work graph where `runs_on_graph` says so
    (else, and for ICL, in this process). `retain`: delete the full checkpoints the arm's
    `checkpoints_keep` deletes once it is done (False when RSA or circuits will still read them)."""
    trains = spec.training is not None
    if graph and trains and runs_on_graph(spec.executor, [spec]):
        tables, failures = run_graph([(out, spec, ref)], spec.executor, record=Path(out) / "graph.json")
        if failures:
            raise ConditionsFailed("; ".join(failures))
        return tables[RunDir(out).path]
    train_jobs = None
    if trains and sharded(spec):
        train_jobs = train_sharded(spec.executor)
    elif trains and spec.executor.name == "ray":
        train_jobs = train_on_ray(spec.executor)
    return run_arm(make_arm(spec, ref, progress=progress, train_jobs=train_jobs), out, retain=retain)
