"""The ICL arm: for each task, seed and shot count K, one prompt of K exemplars per class, then
every grid query scored with both labels."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from iclsft.engine.base import close_engine, open_engine
from iclsft.evaluate.runs import recompute_metrics
from iclsft.models import ModelRef
from iclsft.prompts import builder_key, prompt_builders
from iclsft.runspec import make_spec
from iclsft.scoring import score_condition
from iclsft.spec import IclRunSpec
from iclsft.store import RunDir
from iclsft.tasks import linear2d
from iclsft.tokenizers_check import check_run

Log = Callable[[str], None]


class ConditionsFailed(RuntimeError):
    """Some conditions of a run failed; each has an error record, the others finished."""


def make_icl_spec(**inputs) -> tuple[IclRunSpec, ModelRef]:
    """Validate the inputs (see `iclsft.runspec.make_spec`), resolve the model, build the ICL spec."""
    return make_spec(IclRunSpec, **inputs)


def run_icl(spec: IclRunSpec, out: str | Path, ref: ModelRef, *, log: Log | None = None,
            progress: bool = True) -> pd.DataFrame:
    """Run (or resume) every ICL condition of `spec` into the run directory `out`; return metrics."""
    from transformers import AutoTokenizer

    log = log or (lambda _msg: None)
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    builders = prompt_builders(tokenizer, spec.template, spec.tasks)
    spec = check_run(spec, builders, log)  # prompts == the tokenizer's ids for their text; token counts
    run = RunDir(out)
    run.open(spec)  # only now, with every input checked, does anything get written
    run.acquire_lock()  # one process per run directory (store.RunDir.acquire_lock)
    try:
        conditions = spec.conditions()
        todo = [c for c in conditions if not run.is_done(c)]
        log(f"{len(conditions)} conditions, {len(conditions) - len(todo)} already finished, {len(todo)} to run")
        started = time.time()
        run.write_run_record("running", conditions=len(conditions), todo=len(todo))
        failed, first_error = 0, ""
        engine = None
        try:
            if todo:
                engine = _make_engine(spec, ref, progress)
                for i, cond in enumerate(todo, 1):
                    t0 = time.time()
                    try:
                        builder = builders[builder_key(cond.task)]
                        exemplars = linear2d.exemplars(cond.task, cond.seed, cond.shots, cond.order)
                        prefix = builder.prefix(exemplars.n1, exemplars.n2, exemplars.truth)
                        metrics = score_condition(run, cond, builder, engine, prefix, exemplars)
                    except (RuntimeError, ValueError, MemoryError) as e:
                        failed += 1
                        first_error = first_error or f"{type(e).__name__}: {e}"
                        run.write_condition_error(cond, f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                        log(f"[{i}/{len(todo)}] {cond.dirname}: FAILED {type(e).__name__}: {e}")
                        continue
                    seconds = time.time() - t0
                    log(
                        f"[{i}/{len(todo)}] angle {cond.task.angle:g} K={cond.shots} seed {cond.seed}: "
                        f"{metrics['n_points']} queries in {seconds:.1f} s ({metrics['n_points'] / seconds:.0f} q/s), "
                        f"accuracy {metrics['accuracy']:.3f}, auc {metrics['auc']:.3f}"
                    )
        except BaseException as e:
            run.write_run_record("interrupted", error=f"{type(e).__name__}: {e}", seconds=time.time() - started)
            raise
        finally:
            if engine is not None:
                close_engine(engine)
        table = recompute_metrics(run.path, skip_damaged=log)  # another arm's damaged file: named, not fatal
        status = "ok" if not failed else "error"
        run.write_run_record(status, conditions=len(conditions), failed=failed, seconds=round(time.time() - started, 1))
        if failed:
            raise ConditionsFailed(
                f"{failed} of {len(todo)} conditions failed (first: {first_error}; their record.json under "
                f"{run.path / 'conditions'} holds the error); rerun the same command to retry them"
            )
        return table
    finally:
        run.release_lock()


def _make_engine(spec: IclRunSpec, ref: ModelRef, progress: bool = True):

    engine = open_engine(spec.engine, ref.path, spec.dtype, progress=progress)
    if hasattr(engine, "check_model"):
        engine.check_model(ref.path, ref.fingerprint)
    return engine
