"""The report's behavioural figures: metrics against K (per method, per order pattern, along SFT
training) or θ, and inferred against true angle; decision fields are in iclsft.report.fields.

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot, so building a report
neither needs nor changes a global backend (PNGs are rendered by Agg). Each drawing function counts
what it drew and `FigureWriter.save` refuses a figure without data: callers decide beforehand what
to omit, and a mistake there fails loudly instead of shipping an empty plot.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

try:
    from matplotlib import colormaps
    from matplotlib.figure import Figure
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the report needs matplotlib: pip install matplotlib") from e

from iclsft.artifacts import atomic_write_bytes
from iclsft.faults import fault_point

DPI = 100
WRAP = 3  # metric panels per row in figures without row facets

# (metric, axis label, reference line or None). A metric the run's table lacks (an older metrics
# version) or that is NaN throughout (angle metrics of xor) gets no panel: see available_metrics.
METRIC_AXES: dict[str, tuple[str, str, float | None]] = {m[0]: m for m in (
    ("accuracy", "accuracy", 0.5),
    ("holdout_accuracy", "hold-out accuracy", 0.5),
    ("train_accuracy", "train accuracy", 0.5),
    ("auc", "ROC AUC", 0.5),
    ("cal_accuracy", "calibrated accuracy", 0.5),
    ("cal_holdout_accuracy", "calibrated hold-out accuracy", 0.5),
    ("confidence", "confidence", 0.5),
    ("cal_confidence", "prior-corrected confidence", 0.5),
    ("smoothness", "smoothness", None),
    ("smoothness_rel", "smoothness / perfect", 1.0),
    ("angle_error", "angle error (°)", 0.0),
    ("abs_angle_error", "|angle error| (°)", 0.0),
    ("pattern_following", "pattern following", 0.5),
    ("label_share", "share of first label", 0.5),
)}


def _axes(*names: str) -> tuple[tuple[str, str, float | None], ...]:
    return tuple(METRIC_AXES[n] for n in names)


CURVE_METRICS = _axes("accuracy", "holdout_accuracy", "train_accuracy", "auc", "cal_accuracy", "confidence",
                      "cal_confidence", "smoothness", "smoothness_rel", "angle_error", "abs_angle_error")
ORDER_METRICS = _axes("accuracy", "cal_accuracy", "auc", "smoothness", "pattern_following", "label_share")
DYNAMICS_METRICS = _axes("accuracy", "train_accuracy", "cal_accuracy", "confidence", "smoothness")
THETA_METRICS = _axes("accuracy", "holdout_accuracy", "cal_holdout_accuracy")

# How an interval is named when the summary has no ci_method column (a table from elsewhere): honestly unknown.
DEFAULT_CI_METHOD = "95% interval over seeds (method not recorded)"


def slug(*parts: object) -> str:
    """A file-name-safe name from parts: fig-fields-linear2d-a45.png."""
    text = "-".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def fmt_angle(angle: float) -> str:
    return f"{angle:g}°"


class FigureWriter:
    """Saves figures as PNGs into one folder and remembers their names."""

    PREFIX = "fig-"

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.written: list[str] = []

    def save(self, fig: Figure, name: str, n_data: int) -> str:
        if n_data <= 0:  # not `assert`: it must hold under python -O too
            raise AssertionError(f"figure {name!r} has no data: it should have been omitted")
        name = f"{self.PREFIX}{name}.png"
        if name in self.written:
            raise AssertionError(f"figure {name!r} written twice")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        atomic_write_bytes(self.out_dir / name, buf.getvalue())
        self.written.append(name)
        return name

    def publish(self, markup: str) -> Path:
        """Write the page as index.html beside its figures, after checking that every PNG written is
        shown and every image shown exists; then remove the figures of an earlier page in this folder
        that this one no longer draws (only now, so a failed build leaves the previous page whole)."""
        shown = re.findall(r'<img src="([^"]+)"', markup)
        if sorted(shown) != sorted(self.written) or not all((self.out_dir / n).is_file() for n in shown):
            raise AssertionError(f"report figures out of step: shown {sorted(shown)}, written {sorted(self.written)}")
        fault_point("report")
        index = self.out_dir / "index.html"
        atomic_write_bytes(index, markup.encode("utf-8"))
        for old in set(self.out_dir.glob(f"{self.PREFIX}*.png")) - {self.out_dir / n for n in self.written}:
            old.unlink()
        return index


def panel_axes(ax, r: int, c: int, n_rows: int, title: str, ylabel: str, xlabel: str) -> None:
    """Grid and labels of panel (r, c) of a grid figure: the title on the top row, the y label on the
    first column, the x label on the bottom row."""
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    if r == 0:
        ax.set_title(title, fontsize=10)
    if c == 0:
        ax.set_ylabel(ylabel, fontsize=9)
    if r == n_rows - 1:
        ax.set_xlabel(xlabel, fontsize=9)


def new_figure(n_rows: int, n_cols: int, panel: tuple[float, float], **kw):
    fig = Figure(figsize=(max(4.0, panel[0] * n_cols + 1.6), panel[1] * n_rows + 0.8), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, **kw)
    return fig, axes


def k_colors(shots: Sequence[int]) -> dict[int, tuple]:
    cmap = colormaps["viridis"]
    ks = sorted(set(int(k) for k in shots))
    return {k: cmap(i / max(1, len(ks) - 1) * 0.9) for i, k in enumerate(ks)}


def interval_note(summary: pd.DataFrame, what: str = "band", metrics: Sequence[tuple] | None = None) -> str:
    """How the intervals drawn from `summary` (its rows of `metrics`, default all) were made and over
    how many seeds, for a caption: "band: 95% t over seeds, n = 3"; metrics with another method are
    named in brackets; "one seed: no interval" where no value has two seeds (nothing drawn then)."""
    if metrics is not None:
        summary = summary[summary["metric"].isin([m[0] for m in metrics])]
    finite = summary[np.isfinite(summary["mean"]) & (pd.to_numeric(summary["n_seeds"]) > 0)]
    n = pd.to_numeric(finite["n_seeds"]).astype(int)
    if n.empty or n.max() <= 1:
        return "one seed: no interval"
    text = DEFAULT_CI_METHOD
    if "ci_method" in finite:
        by_method = finite[n > 1].groupby("ci_method", sort=False)["metric" if "metric" in finite else "mean"]
        ranked = sorted(by_method, key=lambda item: -len(item[1]))  # the most common method first, unqualified
        others = [f"{', '.join(dict.fromkeys(map(str, rows)))}: {method}" for method, rows in ranked[1:]]
        text = str(ranked[0][0]) + (f" [{'; '.join(others)}]" if others else "")
    if n.min() == n.max():
        return f"{what}: {text}, n = {n.max()}"
    if n.min() > 1:
        return f"{what}: {text}, n = {n.min()}–{n.max()}"
    return f"{what}: {text}, n = 2–{n.max()} (where one seed: no interval)"


# -- lines over K / checkpoints ---------------------------------------------------------------------

def available_metrics(summary: pd.DataFrame, metrics: Sequence[tuple]) -> list[tuple]:
    """The metrics with at least one finite mean in `summary` (a panel per metric, never empty)."""
    finite = summary[np.isfinite(summary["mean"])]
    return [m for m in metrics if (finite["metric"] == m[0]).any()]


def draw_lines(writer: FigureWriter, name: str, title: str, summary: pd.DataFrame, *, x: str, series: str,
               metrics: Sequence[tuple], colors: Mapping, labels: Mapping | None = None, rows: str | None = None,
               row_values: Sequence | None = None, row_labels: Mapping | None = None, logx: bool = False,
               xlabel: str = "", xticks: Sequence | None = None) -> str:
    """One panel per (row, metric); in each, a line per value of `series` with its interval band
    (`lo`..`hi` of the summary; none where they are NaN, e.g. one seed).

    `summary` is the long output of `iclsft.evaluate.stats.summarize` restricted to what this figure
    shows; `series` values are drawn in the order of `colors`; `row_labels` names the row facets.
    """
    metrics = available_metrics(summary, metrics)
    row_values = list(row_values) if rows else [None]
    # Without row facets the metrics wrap into rows of three; with them, a row holds one facet.
    n_cols = len(metrics) if rows else min(WRAP, len(metrics))
    panels = [(row, m) for row in row_values for m in metrics]
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = new_figure(n_rows, n_cols, (3.1, 2.4), sharex=True)
    fig.suptitle(title)
    n_data = 0
    handles = {}
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for i, (row, (metric, ylabel, ref)) in enumerate(panels):
        ax = axes.flat[i]
        sel = summary if rows is None else summary[summary[rows] == row]
        sel = sel[(sel["metric"] == metric) & np.isfinite(sel["mean"])]
        for value, color in colors.items():
            line = sel[sel[series] == value].sort_values(x)
            if line.empty:
                continue
            label = (labels or {}).get(value, str(value))
            (h,) = ax.plot(line[x], line["mean"], marker="o", ms=3.5, color=color, label=label)
            ax.fill_between(line[x], line["lo"], line["hi"], color=color, alpha=0.18, lw=0)
            handles[label] = h
            n_data += len(line)
        if ref is not None:
            ax.axhline(ref, color="grey", lw=0.8, ls=":")
        if logx:
            ax.set_xscale("log")
        if xticks is not None:  # plain values (1, 2, 5, …) rather than powers of ten
            ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
            ax.minorticks_off()
        ax.set_ylabel(ylabel if rows is None else f"{(row_labels or {}).get(row, row)}\n{ylabel}", fontsize=9)
        ax.tick_params(labelsize=8, labelbottom=True)
        ax.grid(alpha=0.3)
        if i + n_cols >= len(panels):  # nothing below this panel
            ax.set_xlabel(xlabel, fontsize=9)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    return writer.save(fig, name, n_data)


# -- inferred vs true angle --------------------------------------------------------------------------

ANGLE_ROWS = (  # (metric, axis label, drawn as inferred angle θ + error, or as the error itself)
    ("angle_error", "inferred angle (°)", True),
    ("abs_angle_error", "mean |angle error| (°)", False),
    ("cal_angle_error", "calibrated inferred angle (°)", True),
    ("cal_abs_angle_error", "calibrated mean |angle error| (°)", False),
)


def _bars(line: pd.DataFrame) -> np.ndarray:
    """(2, n) error-bar lengths from lo/hi; 0 where the interval is NaN (one seed: a bare point)."""
    err = np.vstack([line["mean"] - line["lo"], line["hi"] - line["mean"]])
    return np.nan_to_num(np.maximum(err, 0.0), nan=0.0)


def draw_angles(writer: FigureWriter, name: str, title: str, summary: pd.DataFrame, methods: Sequence[str]) -> str:
    """Against the true angle, one panel per (row, method), a line per K: the inferred angle (raw, then
    calibrated) and, where the summary has it, the mean absolute angle error beside it.

    The inferred angle is drawn as θ + mean angle error (the error is wrapped into (−90°, 90°] and
    averaged as the stats module does, so the mean means something where the inferred angle wraps
    around 0°/180°); bars are the summary's interval across seeds. The dashed diagonal is a perfect
    learner; the mean |error| shows a spread that signed errors of opposite sign would cancel.
    """
    kinds = [row for row in ANGLE_ROWS if np.isfinite(summary.loc[summary["metric"] == row[0], "mean"]).any()]
    colors = k_colors(summary["shots"])
    fig, axes = new_figure(len(kinds), len(methods), (3.0, 2.9))
    fig.suptitle(title)
    n_data = 0
    handles = {}
    y_range = [-10.0, 190.0]
    for r, (metric, ylabel, inferred) in enumerate(kinds):
        for c, method in enumerate(methods):
            ax = axes[r, c]
            sel = summary[(summary["metric"] == metric) & (summary["method"] == method) & np.isfinite(summary["mean"])]
            for k, color in colors.items():
                line = sel[sel["shots"] == k].sort_values("angle")
                if line.empty:
                    continue
                y = line["angle"] + line["mean"] if inferred else line["mean"]
                err = _bars(line)
                h = ax.errorbar(line["angle"], y, yerr=err, marker="o", ms=4, capsize=2, color=color, label=f"K={k}")
                handles[f"K={k}"] = h
                n_data += len(line)
                if inferred:
                    y_range = [min(y_range[0], float((y - err[0]).min()) - 5),
                               max(y_range[1], float((y + err[1]).max()) + 5)]
            if inferred:
                ax.plot([0, 180], [0, 180], color="k", lw=0.8, ls="--")
                ax.set_yticks([0, 45, 90, 135, 180])
            else:
                ax.axhline(0.0, color="k", lw=0.8, ls="--")
            ax.set_xlim(-8, 188)
            ax.set_xticks([0, 45, 90, 135, 180])
            panel_axes(ax, r, c, len(kinds), method, ylabel, "true angle θ (°)")
    for r, (_, _, inferred) in enumerate(kinds):
        top = max(ax.get_ylim()[1] for ax in axes[r])  # one scale per row, so methods compare
        for ax in axes[r]:
            ax.set_ylim(*(y_range if inferred else (0.0, top)))
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    return writer.save(fig, name, n_data)
