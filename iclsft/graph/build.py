"""The works of a sweep's arms, built by one builder for the real graph (`iclsft.graph.run.GraphRun`) and the
simulator (`iclsft.graph.simulate`).

An arm comes as `ArmWorks`: its conditions left and, when it trains, its `Training`s (the checkpoints each
still has to make, and which condition is scored with which checkpoint). The real graph has them from the
arm's tokenized training jobs, the simulator from `Study.trainings` (no tokenizer). `Builder.add_arm` makes
one training work per training with a checkpoint to make; one scoring work per ICL chain (one task, seed and
order, K ascending) or per checkpoint (every condition scored with it); with RSA, one RSA work after each
scoring unit (and its training), and one per group of finished conditions whose RSA is not current.
`Builder.add_circuits` makes one work per circuit state of the implicit suite not stored yet, after the
training of its model. Ids, needs, labels and estimated costs (costs.py) are the builder's; what a work
carries (a `Part`: payload, setups, seconds on top) comes from the subclass: the tasks GraphRun's workers
run, or the simulator's timed stand-ins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from iclsft.graph.costs import load_seconds, prefix_tokens, rsa_seconds, score_seconds, train_seconds
from iclsft.graph.work import Work, icl_chains, unit_label
from iclsft.implicit.circuits import CIRCUITS_DIR, circuit_states, state_key, stored_scores
from iclsft.rsa.run import rsa_is_current
from iclsft.sft.adapters import ADAPTERS_DIR
from iclsft.store import RunDir


@dataclass(frozen=True)
class Training:
    """One training of an arm: `reads` the (condition left, checkpoint) pairs of the conditions scored with
    its checkpoints, in the arm's order; `missing` the checkpoints it still has to make (none: it is not
    run, its checkpoints are read as they are); `job` what a trainer runs (None in the simulator)."""

    key: str  # unique in its arm: the training's hash (the simulator's: its index)
    method: str  # lora, full
    steps: int
    reads: tuple[tuple[Any, str], ...]
    missing: tuple[str, ...] = ()
    job: Any = None


@dataclass(frozen=True)
class ArmWorks:
    """What the builder needs of one arm."""

    key: str  # its works' ids start with it; unique in the graph
    spec: Any
    study: str  # the study's name (its examples' length prices a training step)
    todo: Sequence  # its conditions left
    affinity: str  # the base model its scorings need (a scorer keeps to one while it has work)
    scale: dict  # its model's cost against the reference model (costs.model_scale)
    method: str = "icl"
    trainings: tuple[Training, ...] | None = None  # None: scored on the base model
    rsa: bool = False
    # with `rsa`: its finished conditions whose RSA is not current, by the checkpoint they were scored
    # with (None: the base model)
    stale: dict[str | None, list] = field(default_factory=dict)


@dataclass(frozen=True)
class Circuits:
    """The implicit suite's circuit states of one run directory (`iclsft.implicit.circuits`): per task, the
    base model, ICL at `shots`, and each fine-tuned model of `seed`."""

    key: str
    run: RunDir
    tasks: tuple[str, ...]
    seed: int
    shots: int
    pairs: int
    model: str  # the base model's name
    affinity: str
    scale: dict


@dataclass(frozen=True)
class Part:
    """A subclass's share of one work: what it runs, the setups its slot must have open, and seconds it
    costs beyond the builder's estimate (e.g. swapping a checkpoint's weights in)."""

    payload: Any
    setup: tuple[tuple[str, float], ...] = ()
    extra: float = 0.0


def train_id(arm: ArmWorks, training: Training) -> str:
    return f"{arm.key}|train|{training.key}"


def stale_rsa(run: RunDir, spec, todo: Sequence, dtype: str, subset: str) -> dict[str | None, list]:
    """`spec`'s finished conditions (not in `todo`) whose rsa.npz is not current for (`dtype`, `subset`), by
    the checkpoint directory they were scored with (None: the base model)."""
    left = {c.id for c in todo}
    conds = {c.id: c for c in spec.conditions() if c.id not in left}
    by_ckpt: dict[str | None, list] = {}
    for cdir, _, record in run.finished():
        cond = conds.get(record["condition"])
        if cond is None or rsa_is_current(cdir, cond.id, dtype, subset):
            continue
        ckpt = str(run.path / ADAPTERS_DIR / record["checkpoint_dir"]) if record.get("checkpoint_dir") else None
        by_ckpt.setdefault(ckpt, []).append(cond)
    return by_ckpt


class Builder:
    """Builds `works` arm by arm; subclasses give each work its `Part`. `split`: each condition of a scoring
    unit is a work of its own (in order: each written as soon as it is scored)."""

    def __init__(self, device: str, *, split: bool = False):
        self.device, self.split = device, split
        self.works: list[Work] = []

    def train_part(self, arm: ArmWorks, training: Training) -> Part:
        raise NotImplementedError

    def score_part(self, arm: ArmWorks, conds: list, ckpt: str | None, trained: bool) -> Part:
        """`conds` scored on the base model (`ckpt` None) or with the checkpoint `ckpt`, `trained` in this graph."""
        raise NotImplementedError

    def rsa_part(self, arm: ArmWorks, conds: list, ckpt: str | None, trained: bool) -> Part:
        raise NotImplementedError

    def circuit_part(self, circuits: Circuits, work_id: str, task: str, state: str, ckpt, trained: bool,
                     key: dict) -> Part:
        """One circuit state (`key`: what its circuits.json entry holds) of the fine-tuned model `ckpt`, or
        None: the base model."""
        raise NotImplementedError

    def add_arm(self, arm: ArmWorks) -> None:
        if arm.rsa:
            for ckpt, finished in arm.stale.items():
                for unit in icl_chains(finished) if ckpt is None else [finished]:
                    for conds in self._units(unit):
                        self._rsa(arm, conds, (), ckpt, False)
        if arm.trainings is None:
            for chain in icl_chains(arm.todo):
                for conds in self._units(chain):
                    scored = self._score(arm, conds, None, ())
                    if arm.rsa:
                        self._rsa(arm, conds, (scored,), None, False)
            return
        for training in arm.trainings:
            tid = self._train(arm, training) if training.missing else None
            by_ckpt: dict[str, list] = {}
            for cond, ckpt in training.reads:
                by_ckpt.setdefault(ckpt, []).append(cond)
            for ckpt, group in by_ckpt.items():
                needs = (tid,) if ckpt in training.missing else ()
                for conds in self._units(group):
                    scored = self._score(arm, conds, ckpt, needs)
                    if arm.rsa:
                        self._rsa(arm, conds, (scored, *needs), ckpt, bool(needs))

    def add_circuits(self, circuits: Circuits, arms: Sequence[ArmWorks], index: dict) -> None:
        """A work per circuit state of `circuits` that `index` (its circuits.json) does not hold; a model
        that `arms` train in this graph is read after its training."""
        now: dict[str, dict[str, str]] = {}  # task -> {method: checkpoint} of the models of `arms`
        training: dict[str, str] = {}  # checkpoint -> the work that trains it
        for arm in arms:
            for t in arm.trainings or ():
                for cond, ckpt in t.reads:
                    if cond.seed == circuits.seed:
                        now.setdefault(cond.task, {})[cond.method] = ckpt
                        if ckpt in t.missing:
                            training[ckpt] = train_id(arm, t)
        out = circuits.run.path / CIRCUITS_DIR
        for task in circuits.tasks:
            for state, ckpt in circuit_states(circuits.run, task, circuits.seed, circuits.shots,
                                              now.get(task)).items():
                name, key = state_key(task, state, ckpt, circuits.pairs, circuits.seed)
                if stored_scores(out, name, index, key) is not None:
                    continue
                needs = (training[str(ckpt)],) if ckpt is not None and str(ckpt) in training else ()
                work_id = f"{circuits.key}|circuits|{name}"
                part = self.circuit_part(circuits, work_id, task, state, ckpt, bool(needs), key)
                self.works.append(Work(work_id, "scorer", f"circuits {task} {state}",
                                       score_seconds(3 * circuits.pairs, 0, self.device, circuits.scale) + part.extra,
                                       needs=needs, payload=part.payload, arm=f"{circuits.key}|circuits",
                                       affinity=circuits.affinity, setup=part.setup))

    def _train(self, arm: ArmWorks, t: Training) -> str:
        part = self.train_part(arm, t)
        work = Work(train_id(arm, t), "trainer", f"model {t.key[:12]} ({t.method}, {t.steps} steps)",
                    train_seconds(t.steps, t.method, self.device, arm.scale, arm.study) + part.extra, arm=arm.key,
                    payload=part.payload, holds=0 if t.method == "lora" else len(t.missing), setup=part.setup)
        self.works.append(work)
        return work.id

    def _score(self, arm: ArmWorks, conds: list, ckpt: str | None, needs: tuple) -> str:
        part = self.score_part(arm, conds, ckpt, bool(needs))
        work = Work(f"{arm.key}|{conds[0].id}", "scorer", unit_label(conds),
                    sum(score_seconds(c.queries, prefix_tokens(c), self.device, arm.scale) for c in conds) + part.extra,
                    needs=needs, payload=part.payload, arm=arm.key, affinity=arm.affinity, setup=part.setup)
        self.works.append(work)
        return work.id

    def _rsa(self, arm: ArmWorks, conds: list, needs: tuple, ckpt: str | None, trained: bool) -> None:
        """RSA of a unit's conditions (their checkpoint loaded once: a full fine-tune's is a model load; a LoRA
        adapter attaches to the base model), after their scoring and their checkpoint's training."""
        part = self.rsa_part(arm, conds, ckpt, trained)
        load = load_seconds(self.device, arm.scale) if ckpt and arm.method != "lora" else 0.0
        self.works.append(Work(
            f"{arm.key}|rsa|{conds[0].id}", "scorer", f"RSA {unit_label(conds)}",
            sum(rsa_seconds(c.queries, prefix_tokens(c), self.device, arm.scale) for c in conds) + load + part.extra,
            needs=needs, payload=part.payload, arm=arm.key, affinity=arm.affinity, setup=part.setup))

    def _units(self, conds: Sequence) -> list[list]:
        """The scoring works of conditions that share an engine state (an ICL chain, a checkpoint): one, or
        with `split` one per condition."""
        return [[c] for c in conds] if self.split else [list(conds)]
