"""What each role of a sweep's work graph gets (`resources:` in the config) and how many of each fit.

    resources: {scorers: 2, scorer_gpus: 1, trainer_gpus: 0.25}   # four small-model trainings per GPU

Scorers are long-lived actors, each holding one engine with the base model loaded once; trainers are
tasks. Unset fields are chosen from the machine or cluster: with GPUs, one GPU per scorer and per
trainer and a quarter of the GPUs (at least one) scoring; without, one CPU per scorer and per trainer
and one scorer. A scorer's GPU is never given to a trainer: Ray holds a whole GPU for an actor that
asks for one, and shares a GPU only between works that each ask for a fraction of it.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from iclsft.spec import Frozen

SCORING_SHARE = 0.25  # of the GPUs, when `scorers` is not set


class Resources(Frozen):
    scorers: int | None = Field(default=None, ge=1)
    scorer_gpus: float | None = Field(default=None, ge=0)
    scorer_cpus: float = Field(default=1, gt=0)
    trainer_gpus: float | None = Field(default=None, ge=0)
    trainer_cpus: float = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _fractions(self):
        for name in ("scorer_gpus", "trainer_gpus"):
            v = getattr(self, name)
            if v is not None and v > 1 and v != int(v):
                raise ValueError(f"{name} {v}: a fraction of one GPU (0 < x <= 1) or a whole number of GPUs")
        return self


class Slots(Frozen):
    """Resolved resources: every field set, and how many trainings run at once beside the scorers."""

    scorers: int
    scorer_gpus: float
    scorer_cpus: float
    trainer_gpus: float
    trainer_cpus: float
    trainers: int
    cpus: float  # the cluster's, for the summary
    gpus: float

    def describe(self) -> str:
        def each(n, gpus, cpus):
            return f"{n} x ({_num(gpus)} GPU, {_num(cpus)} CPU)" if gpus else f"{n} x {_num(cpus)} CPU"

        return (f"{each(self.scorers, self.scorer_gpus, self.scorer_cpus)} scoring, "
                f"{each(self.trainers, self.trainer_gpus, self.trainer_cpus)} training "
                f"(of {_num(self.cpus)} CPUs, {_num(self.gpus)} GPUs)")


def resolve(resources: Resources, cpus: float, gpus: float) -> Slots:
    """Fill the unset fields from a cluster of `cpus` CPUs and `gpus` GPUs; raise ValueError (one line,
    naming the values) when the scorers leave no room for one trainer."""
    r = resources
    scorer_gpus = r.scorer_gpus if r.scorer_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    trainer_gpus = r.trainer_gpus if r.trainer_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if scorer_gpus > gpus or trainer_gpus > gpus:
        raise ValueError(f"resources: scorer_gpus {_num(scorer_gpus)} and trainer_gpus {_num(trainer_gpus)} must "
                         f"fit the cluster's {_num(gpus)} GPUs")
    scorers = r.scorers
    if scorers is None:
        scorers = max(1, round(SCORING_SHARE * gpus / scorer_gpus)) if scorer_gpus else 1
    free_gpus = gpus - scorers * scorer_gpus
    free_cpus = cpus - scorers * r.scorer_cpus
    fits = [math.floor(free_cpus / r.trainer_cpus + 1e-9)]
    if trainer_gpus:
        fits.append(math.floor(free_gpus / trainer_gpus + 1e-9))
    trainers = min(fits)
    if free_gpus < -1e-9 or free_cpus < -1e-9 or trainers < 1:
        raise ValueError(
            f"resources: {scorers} scorers x ({_num(scorer_gpus)} GPU, {_num(r.scorer_cpus)} CPU) leave no room for "
            f"one trainer ({_num(trainer_gpus)} GPU, {_num(r.trainer_cpus)} CPU) on {_num(cpus)} CPUs and "
            f"{_num(gpus)} GPUs; lower resources.scorers or the per-role amounts")
    return Slots(scorers=scorers, scorer_gpus=scorer_gpus, scorer_cpus=r.scorer_cpus, trainer_gpus=trainer_gpus,
                 trainer_cpus=r.trainer_cpus, trainers=trainers, cpus=cpus, gpus=gpus)


def _num(x: float) -> str:
    return f"{x:g}"
