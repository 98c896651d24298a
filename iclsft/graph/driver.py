"""The one entry point that runs an arm (`icl`, `sft`, `implicit`, the library's `run_spec`; a sweep runs
all its arms through `run_graph` the same way) and the one rule for where arms run (`runs_on_graph`).

Every arm runs as a work graph (`iclsft.graph.run`): its trainings and scorings handed to the one
scheduler. On Ray (an SFT arm's executor `ray`, the default) trainings are Ray tasks and scorings go to a
scorer actor with resources of its own (RUN/graph.json records them); otherwise (ICL, `executor: local`,
trainings sharded over Ray Train workers) the same works run one at a time in this process.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from iclsft.errors import ConditionsFailed
from iclsft.graph.run import run_graph
from iclsft.models import ModelRef
from iclsft.spec import ExecutorSpec
from iclsft.store import RunDir

IN_PROCESS = ExecutorSpec(name="local")  # where an arm that trains nothing runs


def sharded(spec) -> bool:
    """The arm's trainings are sharded over Ray Train workers (each takes them all, one at a time)."""
    return spec.training is not None and spec.training.workers > 1


def runs_on_graph(executor, specs: Iterable) -> bool:
    """Where arms that share `executor` run: on Ray, unless one of them shards its trainings (those run in
    this process, one at a time); else in this process."""
    return executor.name == "ray" and not any(sharded(s) for s in specs)


def run_spec(spec, out: str | Path, ref: ModelRef, *, progress: bool = True) -> pd.DataFrame:
    """Run (or resume) every condition of the arm `spec` into the run directory `out`; return the run's
    metrics table. Failed conditions are recorded (rerun to retry them) and raised as one ConditionsFailed."""
    executor = spec.executor if spec.training is not None else IN_PROCESS
    ray = runs_on_graph(executor, [spec])
    tables, failures = run_graph([(out, spec, ref)], executor, record=Path(out) / "graph.json" if ray else None,
                                 local=not ray, progress=progress)
    if failures:
        raise ConditionsFailed("; ".join(failures))
    return tables[RunDir(out).path]
