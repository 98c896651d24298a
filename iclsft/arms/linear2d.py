"""The 2D study's arms (SPEC §3-§6): ICL, one prompt of K exemplars per class then every grid query
scored with both labels; SFT, one model per distinct training on the same exemplars, each query
scored zero-shot. The work graph (`iclsft.graph`) runs both.

SFT planning: one training job per distinct `training_key` (base, recipe, seed and the batches as
multisets of examples), so order probes whose pairs never cross a batch boundary share one model and
say so in their records.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pandas as pd

from iclsft.arms.runner import ArmBase, Outcome, TrainingPlan
from iclsft.arms.scorer import Scorer
from iclsft.arms.trainings import plan_trainings, redo_deleted
from iclsft.artifacts import npy_bytes, parquet_bytes
from iclsft.errors import OOM_SCORING, is_out_of_memory, out_of_memory
from iclsft.evaluate.metrics import compute_metrics, decision_field
from iclsft.faults import fault_point
from iclsft.models import ModelRef
from iclsft.prompts import PromptBuilder, builder_key, prompt_builders
from iclsft.sft.adapters import resume_dir, stream_order_key, training_key
from iclsft.sft.train import TrainJob, batch_indices
from iclsft.spec import IclRunSpec, SftRunSpec, SftSpec, TaskSpec
from iclsft.store import RunDir
from iclsft.tasks import linear2d
from iclsft.tokenizers_check import check_run


def score_condition(cond, builder: PromptBuilder, engine, prefix: Sequence[int], exemplars: pd.DataFrame,
                    adapter: str | None = None, **record: object) -> Outcome:
    """Score every query of the condition's lattice after `prefix`: its scores, exemplars, decision
    field and record fields (metrics among them), for the driver to write."""
    t0 = time.time()
    scores = linear2d.queries(cond.task, exemplars)
    query_ids = builder.queries_after(prefix, scores.n1, scores.n2)  # K=0 (SFT): tokenized after the start
    try:
        logprobs = engine.score(prefix, query_ids, builder.label_ids, adapter=adapter)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(f"scoring {cond.dirname}", OOM_SCORING, e) from e
    fault_point("score")
    if not np.isfinite(logprobs).all():
        raise RuntimeError(f"engine returned non-finite log-probs for {cond.dirname}")
    scores["lp_0"] = logprobs[:, 0]
    scores["lp_1"] = logprobs[:, 1]
    metrics = compute_metrics(scores, angle=cond.task.angle, task=cond.task.name, order=cond.order,
                              shots=cond.shots)
    files = {
        "scores.parquet": parquet_bytes(scores),
        "exemplars.parquet": parquet_bytes(exemplars),
        "field.npy": npy_bytes(decision_field(scores).astype(np.float32)),
    }
    return Outcome(files, dict(seconds=round(time.time() - t0, 2), prefix_tokens=len(prefix), queries=len(scores),
                               metrics=metrics, **record))


class _Linear2dArm(ArmBase):
    """What both 2D arms share: the prompt builders, checked against the tokenizer before anything is
    written, and the progress summary."""

    def __init__(self, spec, ref: ModelRef, *, progress: bool = True, lora_rank: int | None = None,
                 scorer: Scorer | None = None):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ref.path)
        self.builders = prompt_builders(tokenizer, spec.template, spec.tasks)
        self.spec = check_run(spec, self.builders)  # prompts == the tokenizer's ids for their text; token counts
        self.ref = ref
        self.scorer = scorer or Scorer(spec.engine, ref, spec.dtype, progress=progress, lora_rank=lora_rank)

    def builder(self, task: TaskSpec) -> PromptBuilder:
        return self.builders[builder_key(task)]

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"{metrics['n_points']} queries, accuracy {metrics['accuracy']:.3f}, auc {metrics['auc']:.3f}"


class IclArm(_Linear2dArm):
    """ICL: per condition, the prompt of its first K exemplar pairs, then every query."""

    spec: IclRunSpec

    def score(self, cond, engine, adapter: str | None, record: dict) -> Outcome:
        builder = self.builder(cond.task)
        exemplars = linear2d.exemplars(cond.task, cond.seed, cond.shots, cond.order)
        prefix = builder.prefix(exemplars.n1, exemplars.n2, exemplars.truth)
        return score_condition(cond, builder, engine, prefix, exemplars, adapter=adapter, **record)


class SftArm(_Linear2dArm):
    """SFT: train each distinct training once, score each checkpoint as it arrives, zero-shot."""

    spec: SftRunSpec

    trains = True

    def __init__(self, spec: SftRunSpec, ref: ModelRef, *, progress: bool = True, scorer: Scorer | None = None):
        self.lora = spec.sft.method == "lora"
        super().__init__(spec, ref, progress=progress, lora_rank=spec.sft.lora_r if self.lora else None, scorer=scorer)

    def redo(self, run: RunDir) -> int:
        return redo_deleted(self, run)

    def prepare(self, run: RunDir, todo: list) -> str:
        jobs, where = plan_jobs(self.spec, run, self.ref, self.builders, todo)
        shared = sharing(jobs, where)
        self.plan = TrainingPlan(jobs, {cid: (c, ckpt) for cid, (c, ckpt, _) in where.items()}, shared)
        return (plan_trainings(jobs, self.spec.retrain_deleted)
                + (f"; {len(shared)} conditions share their model with another condition (identical training)"
                   if shared else ""))

    def score(self, cond, engine, adapter: str | None, record: dict) -> Outcome:
        builder = self.builder(cond.task)
        exemplars = linear2d.exemplars(cond.task, cond.seed, cond.shots, cond.order)  # as plan_jobs trained on
        return score_condition(cond, builder, engine, builder.start(), exemplars, adapter=adapter, **record)


def plan_jobs(spec: SftRunSpec, run: RunDir, ref: ModelRef, builders: dict, todo: list | None = None
              ) -> tuple[list[TrainJob], dict]:
    """One job per distinct training with unfinished conditions (conditions whose trainings have one
    `training_key` share it); and each condition's (condition, checkpoint dir, exemplars)."""
    if todo is None:
        todo = [c for c in spec.conditions() if not run.is_done(c)]
    groups: dict[tuple, list] = defaultdict(list)
    for cond in todo:
        groups[(cond.task, cond.order, cond.seed, cond.shots)].append(cond)
    merged: dict[str, dict] = {}  # training key -> what its job holds, in planning order
    where = {}
    for (task, order, seed, k), conds in groups.items():
        builder = builders[builder_key(task)]
        exemplars = linear2d.exemplars(task, seed, k, order)
        examples = training_examples(builder, exemplars)
        key = training_key(ref.fingerprint, examples, spec.sft, seed)
        old = stream_order_key(ref.fingerprint, examples, spec.sft, seed)
        for c in conds:
            used, ckpt = resume_dir(run.path, key, old, c.checkpoint)
            job = merged.setdefault(used, {"examples": examples, "seed": seed, "checkpoints": {}, "conditions": [],
                                           "meta": {"task": task.name, "angle": task.angle, "shots": k}})
            job["checkpoints"].setdefault(c.checkpoint, str(ckpt))
            job["conditions"].append(c.id)
            job["meta"].setdefault("orders", [])
            if order not in job["meta"]["orders"]:
                job["meta"]["orders"].append(order)
            where[c.id] = (c, str(ckpt), exemplars)
    jobs = [TrainJob(key=key, base_path=str(ref.path), examples=j["examples"], sft=spec.sft, seed=j["seed"],
                     checkpoints=list(j["checkpoints"].items()), threads=spec.executor.cpus_per_task,
                     meta={"conditions": j["conditions"], **_meta(j["meta"])})
            for key, j in merged.items()]
    return jobs, where


def _meta(meta: dict) -> dict:
    # "orders" only where a training serves several, so a single order's marker stays as it was
    orders = meta.get("orders", [])
    return {k: v for k, v in meta.items() if k != "orders"} | ({"orders": orders} if len(orders) > 1 else {})


def training_groups(conds: Sequence, sft: SftSpec) -> dict[tuple, list]:
    """SFT conditions grouped by training as planning sees it, without a tokenizer: task, seed, shots and
    each batch of one epoch as a multiset of exemplars (n1, n2, truth). An example's token ids depend
    on its exemplar alone, so conditions grouped here share a `training_key` in `plan_jobs`."""
    streams: dict[tuple, list] = {}
    keys: dict[tuple, tuple] = {}  # conditions differ by checkpoint too: one key per training input
    groups: dict[tuple, list] = defaultdict(list)
    for c in conds:
        what = (c.task, c.order, c.seed, c.shots)
        if what not in keys:
            if (c.task, c.seed, c.order) not in streams:
                s = linear2d.exemplar_stream(c.task, c.seed, c.order)
                streams[(c.task, c.seed, c.order)] = list(zip(s.n1.tolist(), s.n2.tolist(), s.truth.tolist()))
            rows = streams[(c.task, c.seed, c.order)][: 2 * c.shots]  # linear2d.exemplars: the first K pairs
            batches = tuple(tuple(sorted(rows[i] for i in batch_indices(s, len(rows), sft.batch_size)))
                            for s in range(math.ceil(len(rows) / sft.batch_size)))
            keys[what] = (c.task, c.seed, c.shots, batches)
        groups[keys[what]].append(c)
    return dict(groups)


def sharing(jobs: Sequence[TrainJob], where: dict) -> dict[str, list[str]]:
    """Condition id -> the directory names of the other conditions scored with the same checkpoint (one
    training serving several conditions, e.g. order probes); conditions that share nothing are left out."""
    by_dir: dict[str, list] = defaultdict(list)
    for job in jobs:
        for cond_id in job.meta["conditions"]:
            cond, ckpt, _ = where[cond_id]
            by_dir[ckpt].append(cond)
    return {c.id: [o.dirname for o in conds if o.id != c.id]
            for conds in by_dir.values() if len(conds) > 1 for c in conds}


def training_examples(builder: PromptBuilder, exemplars: pd.DataFrame) -> list[tuple[list[int], list[int]]]:
    """The 2K exemplars as (start + query ids, label ids): the natural tokenization of each example's
    text, so token for token the prompt it is scored with at K=0 and the first exemplar of an ICL prompt."""
    start = builder.start()
    return [(start + builder.query(a, b, first=True), list(builder.label_ids[y]))
            for a, b, y in zip(exemplars.n1, exemplars.n2, exemplars.truth)]
