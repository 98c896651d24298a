"""The implicit suite's results table (the study's Table: base, ICL best-of-K, each fine-tuned method)."""

from __future__ import annotations

import pandas as pd

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
