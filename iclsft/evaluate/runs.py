"""Metrics over a run directory, from stored scores alone (no model needed)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from iclsft.artifacts import atomic_write_bytes, atomic_write_json, file_digest, file_matches, parquet_bytes
from iclsft.evaluate.metrics import compute_metrics
from iclsft.faults import fault_point
from iclsft.implicit.evaluate import item_metrics
from iclsft.store import RunDir
from iclsft.study import Study, of_run
from iclsft.versions import version_mix

KEY_COLUMNS = ["task", "angle", "method", "shots", "seed", "checkpoint", "order", "model", "dtype", "condition"]
IMPLICIT_KEY_COLUMNS = ["task", "variant", "method", "shots", "seed", "train_size", "eval_size", "model", "dtype",
                        "faithful", "condition", "recipe"]
logger = logging.getLogger(__name__)


def condition_metrics(scores: pd.DataFrame, record: dict) -> dict:
    """One metrics row of a 2D condition: its key columns, then every metric of SPEC §5 (the task decides
    whether angles exist; the order pattern and K place the query in the exemplar stream)."""
    row = {"checkpoint": None, **record}
    metrics = compute_metrics(scores, angle=row["angle"], task=row["task"], order=row["order"],
                              shots=int(row["shots"]))
    return {**{k: row[k] for k in KEY_COLUMNS}, **metrics}


def implicit_metrics_row(scores: pd.DataFrame, record: dict) -> dict:
    """One metrics row of an implicit-suite condition: its key columns, then the suite's metrics."""
    answers = record.get("answers") if any(c.startswith("lp_") for c in scores.columns) else None
    return {**{k: record.get(k) for k in IMPLICIT_KEY_COLUMNS}, "recipe": record.get("recipe", "ours"),
            **item_metrics(scores, answers)}


def study_of(run: RunDir) -> Study:
    """The study whose arms `run` holds (iclsft.study); one line when `run` is no run directory
    (FileNotFoundError) or its spec.json cannot be read (ValueError)."""
    study = of_run(run.path)
    if study is None and (run.path / "spec.json").is_file():
        raise ValueError(f"{run.path}/spec.json is not a run's spec (not JSON, or no arms): use a run directory")
    if study is None:
        raise FileNotFoundError(f"{str(run.path)!r} is not a run directory (no spec.json); a sweep's runs are "
                                "its OUT/<model>/ and OUT/<model>/implicit/ folders")
    return study


def recompute_metrics(run: str | Path, *, verify: bool = True, skip_damaged: bool = False) -> pd.DataFrame:
    """Recompute metrics of every finished condition of the run's study from its scores (the study's
    `metrics_row`); write RUN/metrics.parquet, then RUN/metrics.json with its size and sha256 (what
    `read_metrics` checks).

    A condition whose files no longer match its record raises ValueError; with `skip_damaged` it is
    left out and named in a warning instead: an arm finishing its own conditions must not fail on
    another arm's damaged file, which that arm recomputes when it runs."""
    rundir = RunDir(run)
    study = study_of(rundir)
    rows, records = [], []
    for cdir, cond, record in rundir.finished():
        if not study.owns(cond):
            continue
        records.append(record)
        if verify:
            try:
                rundir.verify(cdir, record)
            except (ValueError, OSError) as e:
                if not skip_damaged:
                    raise
                logger.warning("left out of the metrics table: %s", e)
                continue
        rows.append(study.metrics_row(pd.read_parquet(cdir / "scores.parquet"), record))
    mix = version_mix(records)
    if mix:
        logger.warning("%s: %s", rundir.path, mix)
    table = pd.DataFrame(rows, columns=[*study.key_columns, *study.metric_columns])
    table = table.sort_values(list(study.sort_by), na_position="first").reset_index(drop=True)
    write_metrics(rundir.path, table)
    return table


def write_metrics(run: str | Path, table: pd.DataFrame) -> None:
    """RUN/metrics.parquet, then RUN/metrics.json with its size and sha256 (what `read_metrics` checks)."""
    path = Path(run)
    fault_point("metrics")
    atomic_write_bytes(path / "metrics.parquet", parquet_bytes(table))
    atomic_write_json(path / "metrics.json",
                      {"files": {"metrics.parquet": file_digest(path / "metrics.parquet")},
                       "conditions": len(table)})


def read_metrics(run: str | Path, columns: Sequence[str] = ()) -> pd.DataFrame | None:
    """RUN/metrics.parquet if it matches the size and sha256 in RUN/metrics.json, else None (missing,
    cut short, altered, or written by a run killed before metrics.json). With `columns`, a table
    lacking any of them (written by an older version) is outdated: None too, so callers recompute."""
    path = Path(run)
    try:
        info = json.loads((path / "metrics.json").read_text())["files"]["metrics.parquet"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not file_matches(path / "metrics.parquet", info):
        return None
    table = pd.read_parquet(path / "metrics.parquet")
    return table if set(columns) <= set(table.columns) else None


def compare_linear2d(table: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """ICL against SFT, side by side, in a 2D run: final checkpoints, one row per (task, angle, order, seed,
    K), one column per (metric, method), ICL first."""
    metrics = _metrics(table, metrics or ("accuracy", "holdout_accuracy", "auc", "cal_accuracy", "confidence"),
                       KEY_COLUMNS)
    final = table[table["checkpoint"].isna() | (table["checkpoint"] == 1.0)]
    wide = final.pivot_table(index=["task", "angle", "order", "seed", "shots"], columns="method", values=metrics)
    methods = sorted(final["method"].unique(), key=lambda m: (m != "icl", m))
    return wide.reindex(columns=pd.MultiIndex.from_product([metrics, methods]))


def compare_implicit(table: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """ICL against fine-tuning in an implicit-suite run: one row per (task, variant, seed), one column per
    (metric, ICL at each K, then each fine-tuned method)."""
    metrics = _metrics(table, metrics or ("accuracy", "shortcut_rate", "gold_prob"), IMPLICIT_KEY_COLUMNS)
    icl = table["method"] == "icl"
    arm = table["method"].where(~icl, "icl K=" + table["shots"].astype(str))
    order = sorted(arm.unique(), key=lambda a: (not a.startswith("icl K="), int(a[6:]) if a.startswith("icl K=")
                                                else 0, a))
    wide = table.assign(arm=arm).pivot_table(index=["task", "variant", "seed"], columns="arm", values=metrics)
    return wide.reindex(columns=pd.MultiIndex.from_product([metrics, order]))


def _metrics(table: pd.DataFrame, metrics: Sequence[str], keys: Sequence[str]) -> list[str]:
    allowed = [c for c in table.columns if c not in keys]
    unknown = [m for m in metrics if m not in allowed]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(allowed)}")
    return list(metrics)


def linear2d_columns(table: pd.DataFrame) -> list[str]:
    """The columns a 2D metrics table shows in the terminal: task and order only where a table mixes
    several (sweeps), what order probes measure where there are any."""
    columns = ["angle", "method", "shots", "seed", "checkpoint", "accuracy", "holdout_accuracy", "auc",
               "cal_accuracy", "confidence", "cal_confidence", "label_mass", "smoothness_rel", "angle_error"]
    columns = [c for c in ("task", "order") if c in table and table[c].nunique() > 1] + columns
    if "order" in table and (table["order"] != "random").any():
        columns += ["label_share", "pattern_following"]
    return columns


IMPLICIT_COLUMNS = ("task", "variant", "method", "shots", "seed", "accuracy", "shortcut_rate", "gold_prob", "n_items")


def format_table(table: pd.DataFrame, columns: Sequence[str] | None = None, study: Study | None = None) -> str:
    """A compact text table for the terminal: `columns`, else those `study` shows (`Study.columns`), else
    every column."""
    if columns is None:
        columns = study.columns(table) if study is not None and study.columns is not None else list(table.columns)
    shown = table[[c for c in columns if c in table.columns]].copy()
    if "checkpoint" in shown:  # ICL has no training checkpoint: show a blank, not None/NaN
        shown["checkpoint"] = [("" if pd.isna(v) else f"{v:g}") for v in shown["checkpoint"]]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")


RISE = 0.05  # accuracy change from the smallest to the largest K that counts as learning (or unlearning)


def learning_summary(table: pd.DataFrame) -> list[str]:
    """One line per learning curve of a 2D table (method, task, angle, order; final checkpoints; mean
    over seeds, with at least two K): what the numbers show, e.g. "ICL θ=0°: accuracy rises with K,
    0.52 (K=1) → 0.84 (K=25); AUC 0.50 → 0.96 (1 seed)"."""
    if "angle" not in table or table.empty:  # not a 2D table (or an empty one): nothing to say
        return []
    t = table
    if "checkpoint" in t:
        cp = pd.to_numeric(t["checkpoint"], errors="coerce")
        t = t[cp.isna() | (cp == 1.0)]
    keys = [k for k in ("method", "task", "angle", "order") if k in t]
    lines = []
    for key, g in t.groupby(keys, sort=True):
        curve = g.groupby("shots")[["accuracy", "auc"]].mean()
        if len(curve) < 2:
            continue
        first, last = curve.iloc[0], curve.iloc[-1]
        change = last["accuracy"] - first["accuracy"]
        trend = "rises" if change >= RISE else "falls" if change <= -RISE else "stays flat"
        named = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        where = [f"θ={named['angle']:g}°"] + [f"{k} {named[k]}" for k in ("task", "order")
                                               if k in named and t[k].nunique() > 1]
        seeds = g["seed"].nunique() if "seed" in g else 1
        lines.append(f"{named['method'].upper() if named['method'] == 'icl' else named['method']} {', '.join(where)}: "
                     f"accuracy {trend} with K, {first['accuracy']:.2f} (K={curve.index[0]}) → "
                     f"{last['accuracy']:.2f} (K={curve.index[-1]}); AUC {first['auc']:.2f} → {last['auc']:.2f} "
                     f"({seeds} seed{'s' if seeds != 1 else ''})")
    return lines
