"""The report's tables: what the run is (its arms' specs, record and conditions) and its statistics
(means with bootstrap intervals, paired ICL − SFT differences), also written as CSV beside the page."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from iclsft.report.data import RunData, is_final, method_key
from iclsft.report.html import Section, details, esc, interval, table
from iclsft.store import atomic_write_bytes

# (metric, header, digits)
TABLE_METRICS = (
    ("accuracy", "accuracy", 3),
    ("holdout_accuracy", "hold-out acc.", 3),
    ("auc", "AUC", 3),
    ("cal_accuracy", "cal. accuracy", 3),
    ("confidence", "confidence", 3),
    ("smoothness", "smoothness", 3),
    ("angle_error", "angle error (°)", 1),
)
# A difference of signed angle errors mixes over- and under-estimates; the table leaves it out.
DIFF_METRICS = TABLE_METRICS[:-1]
SFT_KEYS = ("lr", "epochs", "min_steps", "batch_size", "warmup_ratio", "weight_decay", "lora_r", "lora_alpha")


def _join(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _tasks(arm: dict) -> str:
    by_name: dict[str, list[float]] = {}
    for t in arm.get("tasks", ()):
        by_name.setdefault(t["name"], []).append(float(t["angle"]))
    return "; ".join(f"{name}: {_join(angles)}°" for name, angles in by_name.items())


def _training(arm: dict) -> str:
    sft = arm.get("sft")
    if not sft:
        return "—"
    keys = [k for k in SFT_KEYS if k in sft and (sft.get("method") == "lora" or not k.startswith("lora"))]
    return ", ".join(f"{k}={sft[k]}" for k in keys)


def run_section(data: RunData) -> Section:
    s = Section("Run", "What was computed: one frozen spec per arm (ICL and each SFT method), sharing model and "
                "template, so that every arm saw the same exemplar stream per seed.")
    rows = []
    for name, arm in sorted(data.arms.items(), key=lambda kv: method_key(kv[0].removeprefix("sft-"))):
        task0 = (arm.get("tasks") or [{}])[0]
        orders = arm.get("orders") or [arm.get("order", "random")]
        labels = " / ".join(repr(x) for x in task0.get("labels", ()))
        rows.append([name, arm.get("model", {}).get("name", "?"), _tasks(arm), _join(arm.get("shots", ())),
                     _join(arm.get("seeds", ())), _join(orders), _join(arm.get("checkpoints", ())) or "—",
                     arm.get("dtype", "?"), str(task0.get("grid_step", 1)),
                     labels + (" (swapped)" if task0.get("swap_labels") else ""), (_training(arm), "wrap")])
    s.raw(table(["arm", "model", "tasks: angles", "K", "seeds", "orders", "checkpoints", "dtype", "grid step",
                 "labels", "training"], rows, n_keys=1))
    arm0 = next(iter(data.arms.values()), {})
    tpl, model = arm0.get("template", {}), arm0.get("model", {})
    s.raw(f"<p>Template: header <code>{esc(repr(tpl.get('header', '')))}</code>, exemplar "
          f"<code>{esc(repr(tpl.get('exemplar', '')))}</code>, query <code>{esc(repr(tpl.get('query', '')))}</code>, "
          f"BOS {esc(tpl.get('bos', '?'))}. Model fingerprint <code>{esc(str(model.get('fingerprint', '?'))[:16])}"
          "</code>.</p>")
    record = data.record or {}
    if record:
        failed = f", {esc(record['failed'])} failed" if record.get("failed") else ""
        s.raw(f"<p>Run record: status <b>{esc(record.get('status', '?'))}</b>, last arm "
              f"{esc(record.get('arm', 'icl'))}, {esc(record.get('time', ''))}, "
              f"iclsft {esc(record.get('version', '?'))}{failed}.</p>")
    else:
        s.note("The run has no record.json: it may still be running, or was copied without it.")
    c = data.conditions
    rows = [[m, str(int((c["method"] == m).sum())), str(int(((c["method"] == m) & c["rsa"]).sum()))]
            for m in data.methods]
    s.raw(table(["method", "finished conditions", "with RSA arrays"], rows, n_keys=1))
    return s


def _cell(mean: float, lo: float, hi: float, n: int, digits: int, signed: bool) -> str | tuple[str, str]:
    text = interval(mean, lo, hi, n, digits)
    if not signed or n <= 1 or not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return text
    return (text, "sig pos" if lo > 0 else "sig neg")


def _wide(long: pd.DataFrame, keys: list[str], metrics, value: str, n_col: str, signed: bool) -> list[list]:
    """Rows of `keys` and the largest n, then one formatted interval per metric."""
    cells = {(*(getattr(r, k) for k in keys), r.metric): r for r in long.itertuples(index=False)}
    rows = []
    for key, group in long.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = [f"{k:g}" if isinstance(k, float) else str(k) for k in key] + [str(int(group[n_col].max()))]
        for metric, _, digits in metrics:
            r = cells.get((*key, metric))
            row.append("–" if r is None else _cell(getattr(r, value), r.lo, r.hi, int(getattr(r, n_col)), digits,
                                                    signed))
        rows.append(row)
    return rows


def _ordered(table_: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    t = table_.assign(_m=table_["method"].map(method_key))
    return t.sort_values([k if k != "method" else "_m" for k in keys]).drop(columns="_m")


def _by_task_and_order(long: pd.DataFrame, orders: list[str]):
    """(task, order, rows) with the main order first, then the order probes."""
    for task in sorted(long["task"].unique()):
        for order in orders:
            group = long[(long["task"] == task) & (long["order"] == order)]
            if not group.empty:
                yield task, order, group


def stats_section(data: RunData, summary: pd.DataFrame, diffs: pd.DataFrame, out: Path) -> Section:
    s = Section("Summary statistics", "Means across seeds with 95% percentile-bootstrap intervals (final SFT "
                "checkpoints); with one seed the interval is the point itself (n = 1). Paired differences are "
                "ICL − SFT per seed, averaged; bold cells are intervals that exclude 0 (blue: ICL higher, red: "
                "SFT higher).")
    atomic_write_bytes(out / "stats.csv", summary.to_csv(index=False).encode())
    atomic_write_bytes(out / "paired_differences.csv", diffs.to_csv(index=False).encode())
    s.raw('<p>All groups, metrics and checkpoints: <a href="stats.csv">stats.csv</a>, '
          '<a href="paired_differences.csv">paired_differences.csv</a>.</p>')
    final = summary[is_final(summary["checkpoint"])]
    keys = ["angle", "shots", "method"]
    header = ["θ (°)", "K", "method", "n seeds", *[h for _, h, _ in TABLE_METRICS]]
    s.heading("Means across seeds")
    for task, order, group in _by_task_and_order(final, data.orders):
        rows = _wide(_ordered(group, keys), keys, TABLE_METRICS, "mean", "n_seeds", signed=False)
        s.raw(details(f"{task} · order {order}", table(header, rows, n_keys=3), open_=order == data.main_order))
    s.heading("Paired ICL − SFT differences")
    dfinal = diffs[is_final(diffs["checkpoint"])]
    if dfinal.empty:
        s.note("Omitted: the run has no ICL and SFT conditions sharing task, angle, order, K and seed.")
        return s
    header = ["θ (°)", "K", "SFT method", "n pairs", *[h for _, h, _ in DIFF_METRICS]]
    for task, order, group in _by_task_and_order(dfinal, data.orders):
        rows = _wide(_ordered(group, keys), keys, DIFF_METRICS, "diff", "n_pairs", signed=True)
        s.raw(details(f"{task} · order {order}", table(header, rows, n_keys=3), open_=order == data.main_order))
    return s
