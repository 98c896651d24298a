"""Arms: how each study's conditions are computed, all run by one runner (`runner.run_arm`).

    spec, ref = make_icl_spec(angles=[45], shots=[1, 2])   # or make_sft_spec, make_implicit_spec
    table = run_spec(spec, "runs/x", ref)                  # run or resume; the run's metrics table

Modules: runner (the loop, records, failures), scorer (engines for base and trained models),
trainings (SFT jobs on Ray or locally), linear2d and implicit (each study's arms).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from iclsft.arms.runner import run_arm
from iclsft.models import ModelRef
from iclsft.runspec import make_icl_spec, make_implicit_spec, make_sft_spec


def make_arm(spec, ref: ModelRef, *, progress: bool = True, scorer=None):
    """The arm that computes `spec`'s conditions (its inputs checked against the tokenizer). `scorer`: the
    engines to score with (a `Scorer` shared by several arms, e.g. on a scorer actor); default: its own."""
    if spec.kind == "icl":
        from iclsft.arms.linear2d import IclArm

        return IclArm(spec, ref, progress=progress, scorer=scorer)
    if spec.kind == "sft":
        from iclsft.arms.linear2d import SftArm

        return SftArm(spec, ref, progress=progress, scorer=scorer)
    from iclsft.arms.implicit import ImplicitIclArm, ImplicitSftArm

    return (ImplicitIclArm if spec.method == "icl" else ImplicitSftArm)(spec, ref, progress=progress, scorer=scorer)


def run_spec(spec, out: str | Path, ref: ModelRef, *, progress: bool = True, retain: bool = True) -> pd.DataFrame:
    """Run (or resume) every condition of the arm `spec` into the run directory `out`; return its metrics
    (`retain`: as `run_arm`'s)."""
    return run_arm(make_arm(spec, ref, progress=progress), out, retain=retain)


__all__ = ["make_arm", "make_icl_spec", "make_implicit_spec", "make_sft_spec", "run_arm", "run_spec"]
