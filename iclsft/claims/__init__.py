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
from iclsft.tasks import linear2d as task2d

__all__ = ["Result", "evaluate_all", "format_table", "run_claims", "study_claims", "write_claims"]


def evaluate_all(two_d: linear2d.Evidence | None, imp: implicit.Evidence | None) -> list[Result]:
    """Every claim of both studies on the evidence given (None: that study has no run)."""
    out = linear2d.evaluate(two_d) if two_d is not None else [
        untestable(c, "no 2D run (linear2d/xor/semantic arms) in this directory") for c in linear2d.CLAIMS]
    out += implicit.evaluate(imp) if imp is not None else [
        untestable(c, "no implicit-pattern run in this directory (nor an implicit/ folder beside it)")
        for c in implicit.CLAIMS]
    return with_holm(out)


def run_claims(run_dir: str | Path) -> list[Result]:
    path = Path(run_dir)
    arms = _arms(path)
    if arms is None and not (path / "implicit" / "spec.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no spec.json, no implicit/ run in it)")
    two_d = imp = None
    if arms and not _is_implicit(arms):
        two_d = load_linear2d(path)
    if arms and _is_implicit(arms):
        imp = load_implicit(path)
    elif (path / "implicit" / "spec.json").is_file():
        imp = load_implicit(path / "implicit")
    return evaluate_all(two_d, imp)


def write_claims(run_dir: str | Path, results: Sequence[Result]) -> Path:
    """RUN/claims.json (machine-readable) and RUN/claims.txt (the table); returns the JSON path."""
    path = Path(run_dir)
    atomic_write_bytes(path / "claims.json", to_json(results).encode("utf-8"))
    atomic_write_bytes(path / "claims.txt", (format_table(results) + "\n").encode("utf-8"))
    return path / "claims.json"


def _arms(path: Path) -> dict | None:
    try:
        return json.loads((path / "spec.json").read_text())["arms"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_implicit(arms: dict) -> bool:
    return bool(arms) and all(str(a).startswith("implicit-") for a in arms)


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
