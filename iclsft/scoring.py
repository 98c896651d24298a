"""Scoring one condition and writing its artifacts: shared by the ICL and SFT arms."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from iclsft.artifacts import npy_bytes, parquet_bytes
from iclsft.evaluate.metrics import compute_metrics, decision_field
from iclsft.faults import fault_point, is_out_of_memory, out_of_memory
from iclsft.prompts import PromptBuilder
from iclsft.spec import Condition, TaskSpec
from iclsft.store import RunDir
from iclsft.tasks import linear2d

OOM_SCORING = ("lower --token-budget (tokens per forward pass of the hf engine; sweep: engine_options.token_budget), "
               "or for vllm --gpu-memory-utilization / --kv-cache-gib")


def check_shots(tasks: Sequence[TaskSpec], shots: Sequence[int]) -> None:
    """Every shot count must fit the class pools of every task (before anything is written)."""
    for task in tasks:
        available = linear2d.max_shots(task)
        too_many = [k for k in shots if k > available]
        if too_many:
            raise ValueError(
                f"shot count {too_many[0]} is not allowed at angle {task.angle:g}: each class has "
                f"{available} grid points off the boundary, so shots must be in 1..{available}"
            )


def score_condition(run: RunDir, cond: Condition, builder: PromptBuilder, engine, prefix: Sequence[int],
                    exemplars: pd.DataFrame, adapter: str | None = None, **record: object) -> dict:
    """Score every query of the condition's lattice after `prefix`, then write scores, exemplars,
    decision field and the record (last). Returns the condition's metrics."""
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
    run.write_condition(cond, files, seconds=round(time.time() - t0, 2), prefix_tokens=len(prefix),
                        queries=len(scores), metrics=metrics, **record)
    return metrics
