"""`iclsft-eval claims RUN`: the headline claims of both studies checked on a run (SPEC §11).

    results = run_claims("runs/demo-cpu/smollm2-135m")   # list of core.Result, 2D then implicit
    write_claims(run_dir, results)                        # RUN/claims.json and RUN/claims.txt

A run directory of the 2D study is read for the 2D claims (metrics, RSA arrays, per-query scores); an
implicit-suite run directory (or the `implicit/` folder a sweep puts beside a model's 2D run) for the
implicit claims. A study without a run gets every claim "untestable", naming what is missing. Needs no
model: everything comes from stored results. Tests and definitions: tests/test_claims.py,
docs/claims.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iclsft.artifacts import atomic_write_bytes
from iclsft.claims import implicit, linear2d
from iclsft.claims.core import Result, format_table, to_json, untestable, with_holm
from iclsft.evaluate.rundata import load_run
from iclsft.evaluate.runs import read_metrics, recompute_metrics
from iclsft.evaluate.seen import seen_feature_effect
from iclsft.implicit.circuits import load_shift
from iclsft.rsa.run import load_rsa
from iclsft.spec import stored_task
from iclsft.study import get, of_run, studies
from iclsft.tasks import linear2d as task2d

__all__ = ["Result", "evaluate_all", "format_table", "run_claims", "study_claims", "write_claims"]


def evaluate_all(evidence: dict[str, Any]) -> list[Result]:
    """Every claim of every registered study on the evidence given (study name -> its evidence; a study
    left out has no run: its claims are untestable, saying so), with Holm p over them all."""
    out: list[Result] = []
    for study in studies():
        if study.claims is None:
            continue
        if study.name in evidence:
            out += study.claims.evaluate(evidence[study.name])
        else:
            out += [untestable(c, study.claims.missing) for c in study.claims.claims]
    return with_holm(out)


def run_claims(run_dir: str | Path) -> list[Result]:
    """The claims of the run directory `run_dir` (its study's evidence, and that of a study's run the
    sweep put in its `folder` inside it, e.g. implicit/), every other claim untestable."""
    path = Path(run_dir)
    runs = {}
    here = of_run(path)
    if here is not None:
        runs[here.name] = path
    for study in studies():
        if study.folder and study.name not in runs and of_run(path / study.folder) is study:
            runs[study.name] = path / study.folder
    if not runs:
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no spec.json, no implicit/ run in it)")
    return evaluate_all({name: get(name).claims.evidence(where) for name, where in runs.items()
                         if get(name).claims is not None})


def write_claims(run_dir: str | Path, results: Sequence[Result]) -> Path:
    """RUN/claims.json (machine-readable) and RUN/claims.txt (the table); returns the JSON path."""
    path = Path(run_dir)
    atomic_write_bytes(path / "claims.json", to_json(results).encode("utf-8"))
    atomic_write_bytes(path / "claims.txt", (format_table(results) + "\n").encode("utf-8"))
    return path / "claims.json"


def load_linear2d(path: Path, data=None) -> linear2d.Evidence:
    """The metrics table with each condition's late/early collapse index (where RSA is done) and its
    seen-feature effect (random-order conditions) merged in. `data`: the run as
    `iclsft.evaluate.rundata.load_run` read it, when the caller (the report) has it already."""
    data = load_run(path) if data is None else data
    extra = []
    for _, cond in data.conditions.iterrows():
        row = {"condition": cond["condition"]}
        if cond["rsa"]:
            collapse = np.asarray(load_rsa(cond["dir"])["collapse_resid"], dtype=np.float64)
            half = len(collapse) // 2
            row["collapse_early"] = float(collapse[:half].mean()) if half else np.nan
            row["collapse_late"] = float(collapse[half:].mean())
        if cond["order"] == task2d.RANDOM_ORDER:
            spec = json.loads((Path(cond["dir"]) / "condition.json").read_text())
            task = stored_task(spec["task"])
            exemplars = task2d.exemplars(task, int(cond["seed"]), int(cond["shots"]), cond["order"])
            scores = pd.read_parquet(Path(cond["dir"]) / "scores.parquet")
            row["seen_feature_effect"] = seen_feature_effect(scores, exemplars)
        extra.append(row)
    table = pd.DataFrame(extra, columns=["condition", "collapse_early", "collapse_late", "seen_feature_effect"])
    return linear2d.Evidence(metrics=data.metrics.merge(table, on="condition", how="left"))


def load_implicit(path: Path, metrics: pd.DataFrame | None = None) -> implicit.Evidence:
    """The implicit run's metrics table (`metrics`, when the caller has it already) and circuit shifts."""
    if metrics is None:
        metrics = read_metrics(path)
    if metrics is None or "variant" not in metrics:
        metrics = recompute_metrics(path)
    return implicit.Evidence(metrics=metrics, shift=load_shift(path))


def study_claims(evidence: linear2d.Evidence | implicit.Evidence) -> list[Result]:
    """The claims of one study (the one `evidence` belongs to), with Holm p over them: a report page's table."""
    study = linear2d if isinstance(evidence, linear2d.Evidence) else implicit
    return with_holm(study.evaluate(evidence))
