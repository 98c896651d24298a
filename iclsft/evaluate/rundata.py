"""A run directory as the reports and the claims read it: the arms' specs, the run record, the metrics table and
an index of finished conditions (where their fields and RSA arrays are)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from iclsft.evaluate.metrics import METRIC_NAMES
from iclsft.evaluate.runs import read_metrics, recompute_metrics
from iclsft.store import RunDir

METHOD_ORDER = ("icl", "lora", "full", "full-frozen-unembed")
METHOD_COLORS = {"icl": "#1f77b4", "lora": "#ff7f0e", "full": "#2ca02c", "full-frozen-unembed": "#d62728"}
EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
RANDOM_ORDER = "random"

CONDITION_COLUMNS = ["condition", "task", "angle", "method", "shots", "seed", "order", "checkpoint",
                     "grid_step", "dir", "rsa"]


def method_key(method: str) -> tuple[int, str]:
    """Sort key: ICL first, then the SFT methods in SPEC §6 order, then anything else by name."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return EXTRA_COLORS[sum(map(ord, method)) % len(EXTRA_COLORS)]


def is_final(checkpoint: pd.Series) -> pd.Series:
    """ICL rows (no checkpoint) and SFT rows at the end of training."""
    c = pd.to_numeric(checkpoint).astype(np.float64)
    return c.isna() | (c == 1.0)


def _has_rsa(cdir: Path) -> bool:
    """RSA arrays count only once their record says ok (they are written by a separate pass)."""
    if not (cdir / "rsa.npz").is_file():
        return False
    try:
        return json.loads((cdir / "rsa.json").read_text()).get("status") == "ok"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


@dataclass(frozen=True)
class RunData:
    path: Path
    arms: dict[str, dict]
    record: dict  # each arm's run record (store.RunDir.arm_records)
    metrics: pd.DataFrame
    conditions: pd.DataFrame

    @property
    def methods(self) -> list[str]:
        return sorted(self.metrics["method"].unique(), key=method_key)

    @property
    def main_order(self) -> str:
        """The order the main figures use: random where the run has it, else its most common pattern."""
        orders = self.metrics["order"]
        return RANDOM_ORDER if (orders == RANDOM_ORDER).any() else str(orders.mode().iloc[0])

    @property
    def orders(self) -> list[str]:
        main = self.main_order
        return [main, *sorted(o for o in self.metrics["order"].unique() if o != main)]

    @property
    def first_label(self) -> str:
        """The label whose probability the decision fields show (shared by the arms of a run)."""
        for arm in self.arms.values():
            for task in arm.get("tasks", ()):
                return str(task.get("labels", (" Baz",))[0])
        return " Baz"

    @property
    def panels(self) -> list[tuple[str, float]]:
        """(task, angle) pairs of the run, sorted."""
        keys = self.metrics[["task", "angle"]].drop_duplicates().itertuples(index=False)
        return sorted((str(t), float(a)) for t, a in keys)


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory. The metrics table is recomputed from the stored scores (and rewritten)
    when it is missing, outdated (lacks a current metric column) or does not list exactly the
    finished conditions."""
    rundir = RunDir(run_dir)
    if not (rundir.path / "spec.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no spec.json)")
    rows = []
    for cdir, cond, record in rundir.finished():
        rundir.verify(cdir, record)  # the figures read fields and exemplars: never from a damaged file
        task = cond["task"]
        rows.append({"condition": cond["id"], "task": task["name"], "angle": float(task["angle"]),
                     "method": cond["method"], "shots": int(cond["shots"]), "seed": int(cond["seed"]),
                     "order": cond["order"], "checkpoint": cond.get("checkpoint"),
                     "grid_step": int(task.get("grid_step", 1)), "dir": cdir, "rsa": _has_rsa(cdir)})
    conditions = pd.DataFrame(rows, columns=CONDITION_COLUMNS)
    conditions["checkpoint"] = pd.to_numeric(conditions["checkpoint"]).astype(np.float64)
    if conditions.empty:
        raise ValueError(f"{rundir.path} has no finished conditions: nothing to report")

    # None unless it matches the checksum in metrics.json and has every current metric column
    metrics = read_metrics(rundir.path, columns=METRIC_NAMES)
    if metrics is None or set(metrics["condition"]) != set(conditions["condition"]):
        metrics = recompute_metrics(rundir.path)
    metrics = metrics.copy()
    metrics["checkpoint"] = pd.to_numeric(metrics["checkpoint"]).astype(np.float64)

    return RunData(path=rundir.path, arms=rundir.spec_json()["arms"], record=rundir.arm_records(), metrics=metrics,
                   conditions=conditions)
