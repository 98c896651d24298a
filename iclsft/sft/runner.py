"""The SFT arm: train one model per (task, K, seed) on Ray, score each as it arrives.

The driver plans one training job per distinct training (`training_key`: base, recipe, seed and the
batches as multisets of examples, so order probes whose pairs never cross a batch boundary share
one), submits the jobs whose checkpoints are not all finished, and scores every finished checkpoint
with the engine while the other jobs train.
Only the driver writes records. A failed training is retried by Ray (bounded), then recorded as an
error with its traceback for each of its conditions; the other conditions go on.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from iclsft.engine.base import close_engine, open_engine
from iclsft.evaluate.runs import recompute_metrics
from iclsft.icl import ConditionsFailed
from iclsft.models import ModelRef
from iclsft.prompts import PromptBuilder, builder_key, prompt_builders
from iclsft.runspec import make_spec
from iclsft.scoring import score_condition
from iclsft.sft.adapters import (
    is_finished,
    read_marker,
    resume_dir,
    set_aside_damaged,
    stream_order_key,
    training_key,
)
from iclsft.sft.train import TrainJob, batch_indices, in_training_order, train
from iclsft.spec import ExecutorSpec, SftRunSpec, SftSpec
from iclsft.store import RunDir
from iclsft.tasks import linear2d
from iclsft.tokenizers_check import check_run

Log = Callable[[str], None]


def make_sft_spec(*, sft: SftSpec | None = None, checkpoints: Sequence[float] = (1.0,),
                  executor: ExecutorSpec | None = None, **inputs) -> tuple[SftRunSpec, ModelRef]:
    """Validate the inputs (see `iclsft.runspec.make_spec`), resolve the model, build the SFT spec."""
    return make_spec(SftRunSpec, sft=sft, checkpoints=tuple(checkpoints), executor=executor, **inputs)


def plan_jobs(spec: SftRunSpec, run: RunDir, ref: ModelRef, builders: dict) -> tuple[list[TrainJob], dict]:
    """One job per distinct training with unfinished conditions (conditions whose trainings have one
    `training_key` share it); and each condition's (condition, checkpoint dir, exemplars)."""
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


def run_sft(spec: SftRunSpec, out: str | Path, ref: ModelRef, *, log: Log | None = None,
            progress: bool = True) -> pd.DataFrame:
    """Run (or resume) every SFT condition of `spec` into the run directory `out`; return metrics."""
    from transformers import AutoTokenizer

    log = log or (lambda _msg: None)
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    builders = prompt_builders(tokenizer, spec.template, spec.tasks)
    spec = check_run(spec, builders, log)  # prompts == the tokenizer's ids for their text; token counts
    run = RunDir(out)
    run.open(spec)
    run.acquire_lock()  # one process per run directory (store.RunDir.acquire_lock)
    try:
        conditions = spec.conditions()
        jobs, where = plan_jobs(spec, run, ref, builders)
        set_aside_damaged([Path(d) for j in jobs for _, d in j.checkpoints], log)  # trained again, never read
        to_train = [j for j in jobs if not all(is_finished(Path(d)) for _, d in j.checkpoints)]
        shared = sharing(jobs, where)
        log(f"{len(conditions)} conditions, {len(conditions) - len(where)} already finished; "
            f"{len(to_train)} models to train, {len(jobs) - len(to_train)} reused"
            + (f"; {len(shared)} conditions share their model with another condition (identical training)"
               if shared else ""))
        started = time.time()
        run.write_run_record("running", arm=spec.arm, conditions=len(conditions), todo=len(where))
        failed, first_error = 0, ""
        scorer = _Scorer(spec, ref, progress)
        try:
            for job, result, error in execute_jobs(jobs, spec.executor, log):
                for cond_id in job.meta["conditions"]:
                    cond, ckpt, exemplars = where[cond_id]
                    if error is not None:
                        failed += 1
                        first_error = first_error or error.splitlines()[-1]
                        run.write_condition_error(cond, error.splitlines()[-1], traceback=error,
                                                  checkpoint_dir=Path(ckpt).name)
                        log(f"training for {cond.dirname} FAILED: {error.splitlines()[-1]}")
                        continue
                    try:
                        builder = builders[builder_key(cond.task)]
                        others = {"shared_with": shared[cond_id]} if cond_id in shared else {}
                        metrics = scorer.score(run, cond, builder, ckpt, exemplars, result, **others)
                    except (RuntimeError, ValueError, MemoryError, OSError) as e:
                        failed += 1
                        first_error = first_error or f"{type(e).__name__}: {e}"
                        run.write_condition_error(cond, f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                        log(f"scoring {cond.dirname} FAILED: {type(e).__name__}: {e}")
                        continue
                    how = (f"trained {result.get('seconds', 0):.0f} s" if result.get("trained")
                           else "reused a finished checkpoint")
                    if cond_id in shared:
                        how += f", shared with {', '.join(shared[cond_id])}"
                    log(f"angle {cond.task.angle:g} K={cond.shots} seed {cond.seed} order {cond.order} {cond.method} "
                        f"ckpt {cond.checkpoint:g}: {how}, accuracy {metrics['accuracy']:.3f}, "
                        f"auc {metrics['auc']:.3f}")
        except BaseException as e:
            run.write_run_record("interrupted", arm=spec.arm, error=f"{type(e).__name__}: {e}",
                                 seconds=time.time() - started)
            raise
        finally:
            scorer.close()
        table = recompute_metrics(run.path, skip_damaged=log)  # another arm's damaged file: named, not fatal
        run.write_run_record("ok" if not failed else "error", arm=spec.arm, conditions=len(conditions), failed=failed,
                             seconds=round(time.time() - started, 1))
        if failed:
            raise ConditionsFailed(f"{failed} of {len(where)} conditions failed (first: {first_error}; their "
                                   f"record.json under {run.path / 'conditions'} holds the error); rerun the same "
                                   "command to retry them")
        return table
    finally:
        run.release_lock()


class _Scorer:
    """Scores checkpoints with one engine: LoRA adapters on the shared base, full models one by one."""

    def __init__(self, spec: SftRunSpec, ref: ModelRef, progress: bool):
        self.spec, self.ref, self.progress = spec, ref, progress
        self._engine = None

    def score(self, run: RunDir, cond, builder: PromptBuilder, ckpt: str, exemplars, result: dict,
              **extra: object) -> dict:
        marker = read_marker(Path(ckpt))  # this checkpoint's own step, loss and time, trained now or before
        record = {"checkpoint_dir": Path(ckpt).name, "train_seconds": marker.get("seconds"),
                  "train_steps": marker.get("step"), "total_steps": marker.get("total_steps"),
                  "final_loss": marker.get("loss"), "trained_now": bool(result.get("trained")), **extra}
        if self.spec.sft.method == "lora":
            if self._engine is None:
                self._engine = open_engine(self.spec.engine, self.ref.path, self.spec.dtype, progress=self.progress,
                                           lora_rank=self.spec.sft.lora_r)
                if hasattr(self._engine, "check_model"):
                    self._engine.check_model(self.ref.path, self.ref.fingerprint)
            try:
                return score_condition(run, cond, builder, self._engine, builder.start(), exemplars,
                                       adapter=ckpt, **record)
            finally:
                self._engine.release(ckpt)
        if self.spec.engine.name == "vllm-server":
            raise ValueError("the vllm-server engine scores LoRA adapters only; score full fine-tunes with "
                             "--engine hf or vllm")
        engine = open_engine(self.spec.engine, ckpt, self.spec.dtype, progress=self.progress)
        try:
            return score_condition(run, cond, builder, engine, builder.start(), exemplars, **record)
        finally:
            close_engine(engine)

    def close(self) -> None:
        if self._engine is not None:
            close_engine(self._engine)
            self._engine = None


def execute_jobs(jobs: list[TrainJob], executor: ExecutorSpec, log: Log):
    """Yield (job, result, error traceback or None) as trainings finish."""
    if not jobs:
        return
    pending = [j for j in jobs if not all(is_finished(Path(d)) for _, d in j.checkpoints)]
    for job in jobs:  # nothing to train: score at once
        if job not in pending:
            yield job, {"seconds": 0.0, "losses": [], "trained": False}, None
    if not pending:
        return
    if pending[0].sft.workers > 1:  # sharded: each training takes all its Ray Train workers, one at a time
        from iclsft.sft.distributed import train_distributed

        for job in pending:
            try:
                yield job, train_distributed(in_training_order(job), executor), None
            except Exception:
                yield job, {}, traceback.format_exc()
        return
    if executor.name == "local":
        for job in pending:
            try:
                yield job, train(job), None
            except Exception:
                yield job, {}, traceback.format_exc()
        return
    yield from _execute_ray(pending, executor, log)


def _execute_ray(jobs: list[TrainJob], executor: ExecutorSpec, log: Log):
    try:
        import ray
    except ImportError as e:
        raise ImportError("the SFT arm runs trainings on Ray: pip install 'iclsft-eval[sft]' "
                          "(or use --executor local)") from e
    import torch

    started_here = not ray.is_initialized()
    if started_here:
        env = {k: v for k, v in os.environ.items() if k.startswith("ICLSFT_")}
        if executor.ray_address:
            ray.init(address=executor.ray_address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            # keep one core for the driver, which scores finished models while the others train
            cpus = max(1, (os.cpu_count() or 2) - 1)
            ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
        log(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs")
    gpus = 1 if torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) >= 1 else 0
    remote = ray.remote(num_cpus=executor.cpus_per_task, num_gpus=gpus, max_retries=executor.max_retries,
                        retry_exceptions=True)(train)
    refs = {remote.remote(job): job for job in jobs}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            job = refs.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # after Ray's bounded retries
                yield job, {}, "".join(traceback.format_exception(e))
                continue
            yield job, result, None
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
