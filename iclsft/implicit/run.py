"""Running an arm of the implicit-pattern suite into a run directory (resumable, one record per
condition written last, like the 2D arms).

ICL: per (task, seed) one demo stream; the prompt at K is its first K demos; both variants' matched
evaluation sets are scored after it. SFT: per (task, seed) one model trained on `train_size`
pattern-holds items (zero-shot prompt -> answer, loss on the answer tokens), on Ray or locally,
then scored zero-shot on both variants as it arrives. The original recipe: per seed one fully
fine-tuned model on the mixed file of every task's items (bare text, loss on every token), scored on
each task.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from iclsft.artifacts import parquet_bytes
from iclsft.engine.base import close_engine, open_engine
from iclsft.evaluate.runs import write_metrics
from iclsft.icl import ConditionsFailed
from iclsft.implicit.data import (
    TaskPrompts,
    check_prompts,
    demo_stream,
    eval_items,
    mixed_training_examples,
    train_items,
)
from iclsft.implicit.evaluate import METRICS, item_metrics, score_items
from iclsft.implicit.spec import ImplicitCondition, ImplicitSpec
from iclsft.models import ModelRef, resolve_model
from iclsft.spec import EngineSpec, ExecutorSpec, ModelSpec, sft_spec
from iclsft.store import RunDir
from iclsft.tasks.implicit import get_task

Log = Callable[[str], None]
# One pass over hundreds to thousands of items (the study: ~100 steps of batch 16), not the 2D
# arm's 5 epochs over 2K exemplars.
IMPLICIT_SFT_DEFAULTS = {"epochs": 1, "min_steps": 0}
# The study's full fine-tuning (notes/implicit-patterns-facts.md §5): lr 1e-5, effective batch 16,
# 20 warm-up steps of the ~100 it evaluated (here a ratio); one pass over 4 x 400 items = 100 steps.
ORIGINAL_SFT_DEFAULTS = {"lr": 1e-5, "epochs": 1, "min_steps": 0, "batch_size": 16, "warmup_ratio": 0.2}
KEY_COLUMNS = ["task", "variant", "method", "shots", "seed", "train_size", "eval_size", "model", "dtype",
               "faithful", "condition"]


def make_implicit_spec(*, model: str = "smollm2-135m", method: str = "icl", sft: dict | None = None,
                       engine: EngineSpec | None = None, executor: ExecutorSpec | None = None,
                       recipe: str = "ours", **fields) -> tuple[ImplicitSpec, ModelRef]:
    """Validate the inputs, resolve the model, build the frozen spec of one arm (nothing is written).
    recipe="original" (method full only): the study's fine-tuning, ORIGINAL_SFT_DEFAULTS then `sft`."""
    defaults = ORIGINAL_SFT_DEFAULTS if recipe == "original" else IMPLICIT_SFT_DEFAULTS
    settings = sft_spec(method, **{**defaults, **(sft or {})}) if method != "icl" else None
    spec = ImplicitSpec(model=ModelSpec(name=model, fingerprint="unresolved"), method=method, sft=settings,
                        engine=engine or EngineSpec(), executor=executor or ExecutorSpec(), recipe=recipe, **fields)
    for name in spec.tasks:
        get_task(name)
    ref = resolve_model(model)
    return spec.model_copy(update={"model": ModelSpec(name=model, fingerprint=ref.fingerprint)}), ref


def run_implicit(spec: ImplicitSpec, out: str | Path, ref: ModelRef, *, log: Log | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Run (or resume) every condition of the arm `spec` into `out`; return the suite's metrics table."""
    from transformers import AutoTokenizer

    log = log or (lambda _msg: None)
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    prompts = {name: TaskPrompts(tokenizer, get_task(name)) for name in spec.tasks}  # label checks first
    for p in prompts.values():  # prompts == the tokenizer's ids for their text, before anything is written
        check_prompts(p, spec.seeds[0], max(spec.shots) if spec.method == "icl" else 0, spec.faithful)
    run = RunDir(out)
    run.open(spec)
    run.acquire_lock()
    try:
        conds = spec.conditions()
        todo = [c for c in conds if not run.is_done(c)]
        log(f"{len(conds)} conditions, {len(conds) - len(todo)} already finished, {len(todo)} to run")
        started = time.time()
        run.write_run_record("running", arm=spec.arm, conditions=len(conds), todo=len(todo))
        try:
            runner = _run_icl if spec.method == "icl" else _run_sft
            failed = runner(spec, run, ref, prompts, todo, log, progress) if todo else 0
        except BaseException as e:
            run.write_run_record("interrupted", arm=spec.arm, error=f"{type(e).__name__}: {e}",
                                 seconds=round(time.time() - started, 1))
            raise
        table = implicit_metrics(run.path)
        run.write_run_record("ok" if not failed else "error", arm=spec.arm, conditions=len(conds), failed=failed,
                             seconds=round(time.time() - started, 1))
        if failed:
            raise ConditionsFailed(f"{failed} of {len(todo)} conditions failed (their record.json under "
                                   f"{run.path / 'conditions'} holds the error); rerun the same command to retry them")
        return table
    finally:
        run.release_lock()


def _score(run: RunDir, cond: ImplicitCondition, engine, prompts: TaskPrompts, prefix, adapter=None,
           **record) -> dict:
    t0 = time.time()
    task = prompts.task
    items = eval_items(task, cond.variant, cond.seed, cond.eval_size, cond.train_size, cond.faithful)
    table = score_items(engine, prompts, prefix, items, adapter=adapter)
    metrics = item_metrics(table, prompts.answers)
    run.write_condition(cond, {"scores.parquet": parquet_bytes(table)}, seconds=round(time.time() - t0, 2),
                        prefix_tokens=len(prefix), answers=prompts.answers, metrics=metrics, **record)
    return metrics


def _run_icl(spec: ImplicitSpec, run: RunDir, ref: ModelRef, prompts: dict, todo: list, log: Log,
             progress: bool) -> int:
    engine = open_engine(spec.engine, ref.path, spec.dtype, progress=progress)
    failed = 0
    try:
        # by task and seed, K ascending: each prompt extends the last, whose KV the hf engine keeps
        for i, cond in enumerate(sorted(todo, key=lambda c: (c.task, c.seed, c.shots, c.variant)), 1):
            p = prompts[cond.task]
            try:
                prefix = p.prefix(demo_stream(p.task, cond.seed, cond.faithful)[: cond.shots])
                m = _score(run, cond, engine, p, prefix)
            except (RuntimeError, ValueError, MemoryError) as e:
                failed += 1
                run.write_condition_error(cond, f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                log(f"[{i}/{len(todo)}] {cond.dirname}: FAILED {type(e).__name__}: {e}")
                continue
            log(f"[{i}/{len(todo)}] {cond.task} {cond.variant} K={cond.shots} seed {cond.seed}: "
                f"accuracy {m['accuracy']:.3f}, shortcut {m['shortcut_rate']:.3f}")
    finally:
        close_engine(engine)
    return failed


def _run_sft(spec: ImplicitSpec, run: RunDir, ref: ModelRef, prompts: dict, todo: list, log: Log,
             progress: bool) -> int:
    from iclsft.sft.adapters import resume_dir, stream_order_key, training_key
    from iclsft.sft.runner import execute_jobs
    from iclsft.sft.train import TrainJob

    groups: dict[tuple, list[ImplicitCondition]] = {}
    for cond in todo:
        groups.setdefault(cond.training_group, []).append(cond)
    jobs = []
    for (what, seed), conds in groups.items():
        if spec.recipe == "original":  # `what` is the mixture: one model for every task
            examples = mixed_training_examples(prompts, what, seed, spec.train_size, spec.faithful)
            loss, meta = "all", {"task": "mixture", "mixture": list(what), "recipe": spec.recipe}
        else:
            p = prompts[what]
            examples = p.training_examples(train_items(p.task, seed, spec.train_size, spec.faithful))
            loss, meta = "label", {"task": what}
        # the loss mask enters the key; a checkpoint an earlier version named by stream order is still used
        key, ckpt = resume_dir(run.path, training_key(ref.fingerprint, examples, spec.sft, seed, loss),
                               stream_order_key(ref.fingerprint, examples, spec.sft, seed, loss), 1.0)
        jobs.append(TrainJob(key=key, base_path=str(ref.path), examples=examples, sft=spec.sft, seed=seed,
                             checkpoints=[(1.0, str(ckpt))],
                             threads=spec.executor.cpus_per_task, loss=loss,
                             meta={"conditions": [c.id for c in conds], **meta}))
    by_id = {c.id: c for c in todo}
    failed = 0
    engine = None
    try:
        for job, result, error in execute_jobs(jobs, spec.executor, log):
            ckpt = job.checkpoints[0][1]
            for cond in (by_id[i] for i in job.meta["conditions"]):
                if error is not None:
                    failed += 1
                    run.write_condition_error(cond, error.splitlines()[-1], traceback=error)
                    log(f"training for {cond.dirname} FAILED: {error.splitlines()[-1]}")
                    continue
                p = prompts[cond.task]
                record = {"checkpoint_dir": Path(ckpt).name, "train_seconds": result.get("seconds"),
                          "trained_now": bool(result.get("trained")), "train_examples": len(job.examples),
                          "loss_on": job.loss, **({"mixture": cond.mixture} if cond.mixture else {})}
                try:
                    if spec.method == "lora":
                        if engine is None:
                            engine = open_engine(spec.engine, ref.path, spec.dtype, progress=progress,
                                                 lora_rank=spec.sft.lora_r)
                        m = _score(run, cond, engine, p, p.start, adapter=ckpt, **record)
                    else:
                        full = open_engine(spec.engine, ckpt, spec.dtype, progress=progress)
                        try:
                            m = _score(run, cond, full, p, p.start, **record)
                        finally:
                            close_engine(full)
                except (RuntimeError, ValueError, MemoryError, OSError) as e:
                    failed += 1
                    run.write_condition_error(cond, f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                    log(f"scoring {cond.dirname} FAILED: {type(e).__name__}: {e}")
                    continue
                log(f"{cond.task} {cond.variant} {cond.method} seed {cond.seed}: trained "
                    f"{result.get('seconds', 0):.0f} s, accuracy {m['accuracy']:.3f}, "
                    f"shortcut {m['shortcut_rate']:.3f}")
            if engine is not None:
                engine.release(ckpt)
    finally:
        if engine is not None:
            close_engine(engine)
    return failed


def implicit_metrics(path: str | Path, *, verify: bool = True) -> pd.DataFrame:
    """Metrics of every finished condition, recomputed from its scores; written to RUN/metrics.parquet
    with its checksum in RUN/metrics.json."""
    run = RunDir(path)
    rows = []
    for cdir, cond, record in run.finished():
        if cond.get("suite") != "implicit":
            continue
        if verify:
            run.verify(cdir, record)
        table = pd.read_parquet(cdir / "scores.parquet")
        answers = [c for c in table.columns if c.startswith("lp_")]
        rows.append({**{k: record[k] for k in KEY_COLUMNS}, "recipe": record.get("recipe", "ours"),
                     **item_metrics(table, record.get("answers") if answers else None)})
    table = pd.DataFrame(rows, columns=KEY_COLUMNS + ["recipe"] + list(METRICS))
    table = table.sort_values(["task", "variant", "method", "seed", "shots"]).reset_index(drop=True)
    write_metrics(run.path, table)
    return table


BEST_OF = (1, 2, 4, 8, 16)  # the study's ICL number: the best accuracy over these K


def results_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """The study's table: per task × variant, the base model (ICL at K=0), ICL (best of K in 1..16, and
    the K it took), and each fine-tuned method; accuracy averaged over seeds."""
    rows = []
    for (task, variant), g in metrics.groupby(["task", "variant"], sort=True):
        mean = g.groupby(["method", "shots"])["accuracy"].mean()
        row = {"task": task, "variant": variant}
        icl = mean.get("icl")
        if icl is not None:
            row["base (K=0)"] = icl.get(0, float("nan"))
            best = icl[[k for k in icl.index if k in BEST_OF]]
            if len(best):
                row["ICL best-of-K"] = best.max()
                row["best K"] = int(best.idxmax())
            row["ICL max K"] = icl.iloc[-1]
        for method in sorted(m for m in mean.index.get_level_values(0).unique() if m != "icl"):
            row[f"SFT {method}"] = mean[method].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)
