"""Arms: how each study's conditions are computed, all run by one runner (`runner.run_arm`).

    spec, ref = make_icl_spec(angles=[45], shots=[1, 2])   # or make_sft_spec, make_implicit_spec
    table = run_spec(spec, "runs/x", ref)                  # iclsft.graph.driver: run or resume

Modules: runner (the loop, records, failures), scorer (engines for base and trained models),
trainings (SFT jobs, trained where the driver says), linear2d and implicit (each study's arms).
"""

from __future__ import annotations

from iclsft.arms.implicit import ImplicitIclArm, ImplicitSftArm
from iclsft.arms.linear2d import IclArm, SftArm
from iclsft.arms.runner import run_arm
from iclsft.arms.trainings import TrainJobs
from iclsft.models import ModelRef
from iclsft.runspec import make_icl_spec, make_implicit_spec, make_sft_spec


def make_arm(spec, ref: ModelRef, *, progress: bool = True, scorer=None, train_jobs: TrainJobs | None = None):
    """The arm that computes `spec`'s conditions (its inputs checked against the tokenizer). `scorer`: the
    engines to score with (a `Scorer` shared by several arms, e.g. on a scorer actor); default: its own.
    `train_jobs`: what trains an SFT arm's jobs (default: this process)."""
    if spec.kind == "icl":
        arm = IclArm(spec, ref, progress=progress, scorer=scorer)
    elif spec.kind == "sft":
        arm = SftArm(spec, ref, progress=progress, scorer=scorer)
    else:
        arm = (ImplicitIclArm if spec.method == "icl" else ImplicitSftArm)(spec, ref, progress=progress, scorer=scorer)
    arm.train_jobs = train_jobs
    return arm


__all__ = ["make_arm", "make_icl_spec", "make_implicit_spec", "make_sft_spec", "run_arm"]
