"""The implicit-pattern suite's arms (SPEC §8), run by the work graph (`iclsft.graph`) like the 2D ones.

ICL: per (task, seed) one demo stream; the prompt at K is its first K demos; both variants' matched
evaluation sets are scored after it. SFT: per (task, seed) one model trained on `train_size`
pattern-holds items (zero-shot prompt -> answer, loss on the answer tokens), on Ray or locally,
then scored zero-shot on both variants as it arrives. The original recipe: per seed one fully
fine-tuned model on the mixed file of every task's items (bare text, loss on every token), scored on
each task.
"""

from __future__ import annotations

import time

from iclsft.arms.runner import ArmBase, Outcome, TrainingPlan
from iclsft.arms.scorer import Scorer
from iclsft.arms.trainings import plan_trainings, redo_deleted
from iclsft.artifacts import parquet_bytes
from iclsft.faults import fault_point
from iclsft.implicit.data import (
    TaskPrompts,
    check_prompts,
    demo_stream,
    eval_items,
    mixed_training_examples,
    train_items,
)
from iclsft.implicit.evaluate import item_metrics, score_items
from iclsft.implicit.spec import ImplicitCondition, ImplicitSpec
from iclsft.models import ModelRef
from iclsft.sft.adapters import resume_dir, stream_order_key, training_key
from iclsft.sft.train import TrainJob
from iclsft.store import RunDir
from iclsft.tasks.implicit import get_task


class _ImplicitArm(ArmBase):
    def __init__(self, spec: ImplicitSpec, ref: ModelRef, *, progress: bool = True, scorer: Scorer | None = None):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ref.path)
        self.prompts = {name: TaskPrompts(tokenizer, get_task(name)) for name in spec.tasks}  # label checks first
        for p in self.prompts.values():  # prompts == the tokenizer's ids for their text, before anything is written
            check_prompts(p, spec.seeds[0], max(spec.shots) if spec.method == "icl" else 0, spec.faithful)
        self.spec, self.ref = spec, ref
        self.lora = spec.method == "lora"
        self.scorer = scorer or Scorer(spec.engine, ref, spec.dtype, progress=progress,
                                       lora_rank=spec.sft.lora_r if self.lora else None)

    def score_items(self, cond: ImplicitCondition, engine, prefix, adapter=None, **record) -> Outcome:
        t0 = time.time()
        prompts = self.prompts[cond.task]
        items = eval_items(prompts.task, cond.variant, cond.seed, cond.eval_size, cond.train_size, cond.faithful)
        table = score_items(engine, prompts, prefix, items, adapter=adapter)
        fault_point("score")
        metrics = item_metrics(table, prompts.answers)
        return Outcome({"scores.parquet": parquet_bytes(table)}, dict(
            seconds=round(time.time() - t0, 2), prefix_tokens=len(prefix), answers=prompts.answers, metrics=metrics,
            **record))

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"accuracy {metrics['accuracy']:.3f}, shortcut {metrics['shortcut_rate']:.3f}"


class ImplicitIclArm(_ImplicitArm):
    def score(self, cond: ImplicitCondition, engine, adapter: str | None, record: dict) -> Outcome:
        p = self.prompts[cond.task]
        prefix = p.prefix(demo_stream(p.task, cond.seed, cond.faithful)[: cond.shots])
        return self.score_items(cond, engine, prefix, adapter=adapter, **record)


class ImplicitSftArm(_ImplicitArm):
    trains = True

    def __init__(self, spec: ImplicitSpec, ref: ModelRef, *, progress: bool = True, scorer: Scorer | None = None):
        super().__init__(spec, ref, progress=progress, scorer=scorer)

    def redo(self, run: RunDir) -> int:
        return redo_deleted(self, run)

    def prepare(self, run: RunDir, todo: list) -> str:
        """One job per (task, seed), or per seed for the original recipe's mixed file."""
        spec = self.spec
        groups: dict[tuple, list[ImplicitCondition]] = {}
        jobs, where = [], {}
        for cond in todo:
            groups.setdefault(cond.training_group, []).append(cond)
        for (what, seed), conds in groups.items():
            if spec.recipe == "original":  # `what` is the mixture: one model for every task
                examples = mixed_training_examples(self.prompts, what, seed, spec.train_size, spec.faithful)
                loss, meta = "all", {"task": "mixture", "mixture": list(what), "recipe": spec.recipe}
            else:
                p = self.prompts[what]
                examples = p.training_examples(train_items(p.task, seed, spec.train_size, spec.faithful))
                loss, meta = "label", {"task": what}
            # the loss mask enters the key; a checkpoint an earlier version named by stream order is still used
            key, ckpt = resume_dir(run.path, training_key(self.ref.fingerprint, examples, spec.sft, seed, loss),
                                   stream_order_key(self.ref.fingerprint, examples, spec.sft, seed, loss), 1.0)
            jobs.append(TrainJob(key=key, base_path=str(self.ref.path), examples=examples, sft=spec.sft,
                                      seed=seed, checkpoints=[(1.0, str(ckpt))], threads=spec.executor.cpus_per_task,
                                      loss=loss, meta={"conditions": [c.id for c in conds], **meta}))
            for c in conds:
                where[c.id] = (c, str(ckpt))
        self.plan = TrainingPlan(jobs, where)
        return plan_trainings(jobs, spec.retrain_deleted)

    def score(self, cond: ImplicitCondition, engine, adapter: str | None, record: dict) -> Outcome:
        return self.score_items(cond, engine, self.prompts[cond.task].start, adapter=adapter, **record,
                                **self.extra(cond))

    def extra(self, cond: ImplicitCondition) -> dict:
        """Record fields of a fine-tuned condition: its training's size, loss mask and mixture."""
        spec = self.spec
        return {"train_examples": spec.examples_per_model, "loss_on": "all" if spec.recipe == "original" else "label",
                **({"mixture": cond.mixture} if cond.mixture else {})}
