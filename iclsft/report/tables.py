"""The report's tables: what the run is (its arms' specs, record and conditions) and its statistics
(means with Student-t intervals over seeds, paired ICL − SFT t-tests with Holm-adjusted p), also
written as CSV beside the page. Every interval names its method and n (iclsft.evaluate.stats)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from iclsft.artifacts import atomic_write_bytes
from iclsft.evaluate.rundata import RunData, is_final, method_key
from iclsft.report.html import Section, details, esc, fmt, interval, table

# (metric, header, digits); a table shows those with at least one finite value (no angles for xor,
# no pattern following in random order).
TABLE_METRICS = (
    ("accuracy", "accuracy", 3),
    ("holdout_accuracy", "hold-out acc.", 3),
    ("auc", "AUC", 3),
    ("cal_accuracy", "cal. accuracy", 3),
    ("confidence", "confidence", 3),
    ("smoothness", "smoothness", 3),
    ("pattern_following", "pattern following", 3),
    ("angle_error", "angle error (°)", 1),
    ("abs_angle_error", "|angle error| (°)", 1),
)
# A difference of signed angle errors mixes over- and under-estimates; the paired table compares the
# absolute errors instead.
DIFF_METRICS = tuple(m for m in TABLE_METRICS if m[0] != "angle_error")
ALPHA = 0.05  # bold where the Holm-adjusted p is below this
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
    for counts in arm0.get("tokens") or []:  # one line per way of writing values (tokenizers_check.split_warning)
        if counts.get("integer_max", 1) > 1:
            s.note(f"Integers take {counts['integer_min']}-{counts['integer_max']} tokens with this tokenizer (mean "
                   f"{counts['integer_mean']:g}{', ' + counts['words'] + ' words' if counts.get('words') else ''}): "
                   "the 2D study assumes one token per integer.")
    for arm, record in (data.record or {}).items():
        failed = f", {esc(record['failed'])} failed" if record.get("failed") else ""
        s.raw(f"<p>Run record of {esc(arm)}: status <b>{esc(record.get('status', '?'))}</b>, "
              f"{esc(record.get('time', ''))}, iclsft {esc(record.get('version', '?'))}{failed}.</p>")
    if not data.record:
        s.note("The run has no record.json: it may still be running, or was copied without it.")
    c = data.conditions
    rows = [[m, str(int((c["method"] == m).sum())), str(int(((c["method"] == m) & c["rsa"]).sum()))]
            for m in data.methods]
    s.raw(table(["method", "finished conditions", "with RSA arrays"], rows, n_keys=1))
    return s


def _mean_cell(r, digits: int, n_row: int) -> str:
    """'0.812 [0.790, 0.830]'; the cell's own n where it differs from the row's (seeds with NaN)."""
    text = interval(r.mean, r.lo, r.hi, int(r.n_seeds), digits)
    return text if int(r.n_seeds) == n_row or text == "–" else f"{text} (n={int(r.n_seeds)})"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else fmt(p, 3)


def _diff_cell(r, digits: int, n_row: int) -> str | tuple[str, str]:
    """'0.120 [0.050, 0.190] p_H 0.030', bold and coloured where the Holm-adjusted p < ALPHA."""
    text = interval(r.diff, r.lo, r.hi, int(r.n_pairs), digits)
    if text == "–":
        return text
    if int(r.n_pairs) != n_row:
        text += f" (n={int(r.n_pairs)})"
    if not math.isfinite(r.p_holm):
        return text
    text += f" p_H {_p(r.p_holm)}"
    if r.p_holm >= ALPHA:
        return text
    return (text, "sig pos" if r.diff > 0 else "sig neg")


def _shown(long: pd.DataFrame, metrics: Sequence[tuple], value: str) -> list[tuple]:
    """The metrics with at least one finite value in `long`."""
    finite = long[np.isfinite(long[value].to_numpy(dtype=np.float64))]
    return [m for m in metrics if (finite["metric"] == m[0]).any()]


def _wide(long: pd.DataFrame, keys: list[str], metrics, n_col: str, cell) -> list[list]:
    """Rows of `keys` and the largest n, then one formatted interval per metric."""
    cells = {(*(getattr(r, k) for k in keys), r.metric): r for r in long.itertuples(index=False)}
    rows = []
    for key, group in long.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        n_row = int(group[n_col].max())
        row = [f"{k:g}" if isinstance(k, float) else str(k) for k in key] + [str(n_row)]
        for metric, _, digits in metrics:
            r = cells.get((*key, metric))
            row.append("–" if r is None else cell(r, digits, n_row))
        rows.append(row)
    return rows


def _methods(long: pd.DataFrame) -> str:
    return "; ".join(sorted(long["ci_method"].dropna().unique())) if "ci_method" in long else "?"


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
    s = Section("Summary statistics", "Means across seeds with 95% Student-t intervals over seeds, mean ± "
                "t(0.975, n − 1)·sd/√n, where n is the number of seeds with a finite value (column n seeds; a "
                "cell whose n differs says so); with one seed the mean alone, as no spread can be estimated. "
                "Signed angle errors are circular means (doubled angles) with the t-interval of the errors "
                "unwrapped around that mean; |angle error| is an ordinary mean. Final SFT checkpoints. "
                "Paired differences are ICL − SFT per seed (both arms saw the same exemplars), tested by a paired "
                "t-test over the n pairs; p_H is the Holm-adjusted p-value, and bold cells (blue: ICL higher, "
                "red: SFT higher) have p_H < 0.05. Holm's family is every cell of the paired-differences table "
                "with the same metric and SFT checkpoint: all tasks, angles, orders, K and SFT methods of this "
                "run together (paired_differences.csv has the unadjusted p too). See docs/statistics.md.")
    atomic_write_bytes(out / "stats.csv", summary.to_csv(index=False).encode())
    atomic_write_bytes(out / "paired_differences.csv", diffs.to_csv(index=False).encode())
    s.raw('<p>All groups, metrics and checkpoints: <a href="stats.csv">stats.csv</a>, '
          '<a href="paired_differences.csv">paired_differences.csv</a>.</p>')
    final = summary[is_final(summary["checkpoint"])]
    keys = ["angle", "shots", "method"]
    s.heading("Means across seeds")
    s.raw(f"<p>Intervals: {esc(_methods(final))}.</p>")
    for task, order, group in _by_task_and_order(final, data.orders):
        metrics = _shown(group, TABLE_METRICS, "mean")
        header = ["θ (°)", "K", "method", "n seeds", *[h for _, h, _ in metrics]]
        rows = _wide(_ordered(group, keys), keys, metrics, "n_seeds", _mean_cell)
        s.raw(details(f"{task} · order {order}", table(header, rows, n_keys=3), open_=order == data.main_order))
    s.heading("Paired ICL − SFT differences")
    dfinal = diffs[is_final(diffs["checkpoint"])]
    if dfinal.empty:
        s.note("Omitted: the run has no ICL and SFT conditions sharing task, angle, order, K and seed.")
        return s
    s.raw(f"<p>Intervals and tests: {esc(_methods(dfinal))}; p_H Holm-adjusted within each metric at the final "
          f"checkpoint ({int(dfinal.groupby('metric')['p'].count().max())} tests per metric); bold: p_H &lt; "
          f"{ALPHA:g}.</p>")
    for task, order, group in _by_task_and_order(dfinal, data.orders):
        metrics = _shown(group, DIFF_METRICS, "diff")
        header = ["θ (°)", "K", "SFT method", "n pairs", *[h for _, h, _ in metrics]]
        rows = _wide(_ordered(group, keys), keys, metrics, "n_pairs", _diff_cell)
        s.raw(details(f"{task} · order {order}", table(header, rows, n_keys=3), open_=order == data.main_order))
    return s
