"""Scoring one condition's evaluation items, and the metrics of its scores.

Closed label sets (expression 0..10, True/False) are scored as exact label log-likelihoods by any
engine; the prediction is the most likely label. Open answers (code) are greedy generations by the
same engine (`Engine.generate`), compared by exact match. Either way the stored scores say, per item,
the gold answer, the answer the shortcut predicts, and the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from iclsft.engine.contract import Engine
from iclsft.implicit.data import TaskPrompts
from iclsft.tasks.implicit import Item

MAX_NEW_TOKENS = 8  # code answers are at most a few digits and a sign


def score_items(engine: Engine, prompts: TaskPrompts, prefix: Sequence[int], items: Sequence[Item],
                adapter: str | None = None) -> pd.DataFrame:
    """One row per item: question, answer, shortcut, prediction, and (closed sets) each label's log-prob."""
    task = prompts.task
    table = pd.DataFrame({
        "question": [it.question for it in items],
        "answer": [it.answer for it in items],
        "shortcut": [it.shortcut for it in items],
    })
    queries = prompts.queries(items)  # each as it follows the prefix (a demo or the instruction)
    if prompts.label_ids is not None:
        logprobs = engine.score(prefix, queries, prompts.label_ids, adapter=adapter)
        if not np.isfinite(logprobs).all():
            raise RuntimeError(f"engine returned non-finite log-probs for task {task.name!r}")
        for j in range(logprobs.shape[1]):
            table[f"lp_{j}"] = logprobs[:, j]
        table["prediction"] = [prompts.answers[j] for j in logprobs.argmax(axis=1)]
    else:
        generated = engine.generate(prefix, queries, stop_ids=prompts.stop_ids(), max_new_tokens=MAX_NEW_TOKENS,
                                    adapter=adapter)
        table["prediction"] = [prompts.tokenizer.decode(ids).strip() for ids in generated]
    return table


def item_metrics(table: pd.DataFrame, answers: Sequence[str] | None) -> dict:
    """Accuracy (exact), how often the prediction is the shortcut's answer, and for closed sets the
    mean log-prob of the gold label and the probability mass on the label set."""
    correct = (table["prediction"] == table["answer"]).to_numpy()
    follows = (table["prediction"] == table["shortcut"]).to_numpy()
    out = {"n_items": int(len(table)), "accuracy": float(correct.mean()), "shortcut_rate": float(follows.mean())}
    if answers is not None:
        lp = table[[f"lp_{j}" for j in range(len(answers))]].to_numpy()
        # faithful broken items may have answers outside the closed set: they count as wrong, and
        # the gold-label statistics are over the items whose answer is a label
        inside = table["answer"].isin(list(answers)).to_numpy()
        gold = np.array([list(answers).index(a) for a in table["answer"][inside]], dtype=int)
        rows = np.flatnonzero(inside)
        norm = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)
        out["gold_logprob"] = float(lp[rows, gold].mean()) if len(rows) else float("nan")
        out["gold_prob"] = float(np.exp(norm[rows, gold]).mean()) if len(rows) else float("nan")
        out["label_mass"] = float(np.exp(np.logaddexp.reduce(lp, axis=1)).mean())
    else:
        out["gold_logprob"] = out["gold_prob"] = out["label_mass"] = float("nan")
    return out


METRICS = ("accuracy", "shortcut_rate", "gold_prob", "gold_logprob", "label_mass", "n_items")
