"""What each role of a sweep's work graph gets (`resources:` in the config) and how many of each fit.

    resources: {scorers: 2, scorer_gpus: 1, trainer_gpus: 0.25}   # four small-model trainings per GPU

Scorers are long-lived actors, each holding one engine with the base model loaded once; trainers are
tasks. Unset fields are chosen from the machine or cluster. With two GPUs or more: one GPU per scorer
and per trainer, and the scorers' share of the GPUs that of scoring in the sweep's work (`scoring_share`,
from the planner: seconds of scoring and RSA over all seconds; SCORING_SHARE when not known), at least
one scorer and one trainer. With one GPU, the scorer and the trainer each take half of it (nothing else
lets both run). Without GPUs: one CPU per scorer and per trainer, the same share of the CPUs scoring.
A scorer's GPU is never given to a trainer: Ray holds a whole GPU for an actor that asks for one, and
shares a GPU only between works that each ask for a fraction of it.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from iclsft.spec import Frozen

SCORING_SHARE = 0.5  # of the GPUs (or CPUs), when `scorers` is not set and the planner gave no share


class Resources(Frozen):
    scorers: int | None = Field(default=None, ge=1)
    scorer_gpus: float | None = Field(default=None, ge=0)
    scorer_cpus: float = Field(default=1, gt=0)
    trainer_gpus: float | None = Field(default=None, ge=0)
    trainer_cpus: float = Field(default=1, gt=0)
    # base models a scorer keeps loaded at once (engine and hooks' model); beyond that the one it used
    # least recently is closed. Scorers keep to one model while it has work (schedule.py), so 1 suits a
    # sweep over several large models; more avoid reloads when small models' arms overlap.
    models_per_scorer: int = Field(default=1, ge=1)
    # full fine-tunes' checkpoints in flight at once (trained and still needed by a scoring, RSA or circuit
    # work): a training that would exceed it waits (one always may run). None: no bound. With
    # checkpoints_keep final/none this bounds the run's disk as well as Ray's object store.
    checkpoints_in_flight: int | None = Field(default=None, ge=1)

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


def resolve(resources: Resources, cpus: float, gpus: float, scoring_share: float | None = None) -> Slots:
    """Fill the unset fields from a cluster of `cpus` CPUs and `gpus` GPUs; `scoring_share` (0..1): the
    part of the sweep's work that scorers do, which sets how many scorers there are when `scorers` is not
    given. Raises ValueError (one line, naming the values) when the scorers leave no room for one trainer."""
    r = resources
    if scoring_share is not None and not 0 <= scoring_share <= 1:
        raise ValueError(f"scoring share {scoring_share!r} must lie in [0, 1]")
    share = SCORING_SHARE if scoring_share is None else scoring_share
    one_gpu = 1 <= gpus < 2  # one whole GPU: scorer and trainer share it, unless the config says otherwise
    default_gpus = (0.5 if one_gpu else 1.0) if gpus >= 1 else 0.0
    scorer_gpus = r.scorer_gpus if r.scorer_gpus is not None else default_gpus
    trainer_gpus = r.trainer_gpus if r.trainer_gpus is not None else default_gpus
    if scorer_gpus > gpus or trainer_gpus > gpus:
        raise ValueError(f"resources: scorer_gpus {_num(scorer_gpus)} and trainer_gpus {_num(trainer_gpus)} must "
                         f"fit the cluster's {_num(gpus)} GPUs")
    scorers = r.scorers
    if scorers is None:
        # the split that finishes both roles' shares of the work soonest: scoring / scorers against
        # training / trainers (at least one scorer; fewer scorers on a tie)
        room = min((gpus - trainer_gpus) / scorer_gpus if scorer_gpus else math.inf,
                   (cpus - r.trainer_cpus) / r.scorer_cpus)
        def finish(n: int) -> float:  # when the later role ends, in units of the whole work
            return max(share / n, (1 - share) / max(_trainers(r, n, scorer_gpus, trainer_gpus, cpus, gpus), 1e-9))

        scorers = min(range(1, max(1, math.floor(room + 1e-9)) + 1), key=finish)
    free_gpus = gpus - scorers * scorer_gpus
    free_cpus = cpus - scorers * r.scorer_cpus
    trainers = _trainers(r, scorers, scorer_gpus, trainer_gpus, cpus, gpus)
    if free_gpus < -1e-9 or free_cpus < -1e-9 or trainers < 1:
        raise ValueError(
            f"resources: {scorers} scorers x ({_num(scorer_gpus)} GPU, {_num(r.scorer_cpus)} CPU) leave no room for "
            f"one trainer ({_num(trainer_gpus)} GPU, {_num(r.trainer_cpus)} CPU) on {_num(cpus)} CPUs and "
            f"{_num(gpus)} GPUs; lower resources.scorers or the per-role amounts")
    return Slots(scorers=scorers, scorer_gpus=scorer_gpus, scorer_cpus=r.scorer_cpus, trainer_gpus=trainer_gpus,
                 trainer_cpus=r.trainer_cpus, trainers=trainers, cpus=cpus, gpus=gpus)


def _trainers(r: Resources, scorers: int, scorer_gpus: float, trainer_gpus: float, cpus: float, gpus: float) -> int:
    """Trainers that fit beside `scorers`."""
    fits = [math.floor((cpus - scorers * r.scorer_cpus) / r.trainer_cpus + 1e-9)]
    if trainer_gpus:
        fits.append(math.floor((gpus - scorers * scorer_gpus) / trainer_gpus + 1e-9))
    return min(fits)


def _num(x: float) -> str:
    return f"{x:g}"
