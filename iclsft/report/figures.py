"""The report's behavioural figures: decision fields, metrics against K (per method, per order
pattern, along SFT training) and inferred against true angle.

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

from iclsft.store import atomic_write_bytes

DPI = 100
FIELD_CMAP = "RdBu_r"  # p(first label): 1 red, 0 blue, 0.5 white
CENTRE = 49.5
WRAP = 3  # metric panels per row in figures without row facets

# (metric, axis label, reference line or None)
CURVE_METRICS = (
    ("accuracy", "accuracy", 0.5),
    ("auc", "ROC AUC", 0.5),
    ("cal_accuracy", "calibrated accuracy", 0.5),
    ("confidence", "confidence", 0.5),
    ("smoothness", "smoothness", None),
    ("angle_error", "angle error (°)", 0.0),
)
ORDER_METRICS = (CURVE_METRICS[0], CURVE_METRICS[2], CURVE_METRICS[1], CURVE_METRICS[4])
DYNAMICS_METRICS = (CURVE_METRICS[0], CURVE_METRICS[2], CURVE_METRICS[3], CURVE_METRICS[4])


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


def new_figure(n_rows: int, n_cols: int, panel: tuple[float, float], **kw):
    fig = Figure(figsize=(max(4.0, panel[0] * n_cols + 1.6), panel[1] * n_rows + 0.8), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, **kw)
    return fig, axes


def k_colors(shots: Sequence[int]) -> dict[int, tuple]:
    cmap = colormaps["viridis"]
    ks = sorted(set(int(k) for k in shots))
    return {k: cmap(i / max(1, len(ks) - 1) * 0.9) for i, k in enumerate(ks)}


# -- decision fields ---------------------------------------------------------------------------------

def _boundary(ax, task: str, angle: float) -> None:
    """The true boundary: the line through the centre at `angle` (and its perpendicular for xor)."""
    for a in (angle, angle + 90.0) if task == "xor" else (angle,):
        t = math.radians(a)
        d = np.array([math.cos(t), math.sin(t)]) * 150.0
        ax.plot([CENTRE - d[0], CENTRE + d[0]], [CENTRE - d[1], CENTRE + d[1]], color="k", lw=1.2, ls="--")


def load_field(cond: pd.Series) -> np.ndarray:
    field = np.load(Path(cond["dir"]) / "field.npy", allow_pickle=False)
    n = len(range(0, 100, int(cond["grid_step"])))
    if field.shape != (n, n):
        raise ValueError(f"{cond['dir']}/field.npy has shape {field.shape}; its lattice (grid_step "
                         f"{cond['grid_step']}) needs ({n}, {n})")
    return field


def draw_fields(writer: FigureWriter, name: str, title: str, grid: Mapping[str, Mapping[int, pd.Series]],
                task: str, angle: float, label: str) -> str:
    """A grid of decision fields: one row per entry of `grid` (label → {K: condition}), one column
    per K; exemplars drawn as dots (white: first label, black: second), true boundary dashed."""
    shots = sorted({k for row in grid.values() for k in row})
    fig, axes = new_figure(len(grid), len(shots), (1.75, 1.75))
    fig.suptitle(title)
    image = None
    n_data = 0
    for r, (row_label, cells) in enumerate(grid.items()):
        for c, k in enumerate(shots):
            ax = axes[r, c]
            ax.set_aspect("equal")
            if r == 0:
                ax.set_title(f"K={k}", fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{row_label}\nn2", fontsize=9)
            if k not in cells:
                ax.set_axis_off()
                continue
            cond = cells[k]
            field = load_field(cond)
            step = int(cond["grid_step"])
            lo, hi = -step / 2, (field.shape[0] - 1) * step + step / 2
            # field[i, j] is (n1_i, n2_j): transpose so that n1 runs along x, n2 up the y axis.
            image = ax.imshow(field.T, origin="lower", extent=(lo, hi, lo, hi), cmap=FIELD_CMAP, vmin=0, vmax=1,
                              interpolation="nearest")
            ex = pd.read_parquet(Path(cond["dir"]) / "exemplars.parquet")
            for cls, face, edge in ((0, "white", "black"), (1, "black", "white")):
                pts = ex[ex["truth"] == cls]
                ax.scatter(pts["n1"], pts["n2"], s=9, c=face, edgecolors=edge, linewidths=0.5, zorder=3)
            _boundary(ax, task, angle)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xticks([0, 50, 99])
            ax.set_yticks([0, 50, 99])
            ax.tick_params(labelsize=7)
            if r == len(grid) - 1:
                ax.set_xlabel("n1", fontsize=9)
            n_data += 1
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label=f"p({label.strip()})")
    return writer.save(fig, name, n_data)


# -- lines over K / checkpoints ---------------------------------------------------------------------

def available_metrics(summary: pd.DataFrame, metrics: Sequence[tuple]) -> list[tuple]:
    """The metrics with at least one finite mean in `summary` (a panel per metric, never empty)."""
    finite = summary[np.isfinite(summary["mean"])]
    return [m for m in metrics if (finite["metric"] == m[0]).any()]


def draw_lines(writer: FigureWriter, name: str, title: str, summary: pd.DataFrame, *, x: str, series: str,
               metrics: Sequence[tuple], colors: Mapping, labels: Mapping | None = None, rows: str | None = None,
               row_values: Sequence | None = None, logx: bool = False, xlabel: str = "",
               xticks: Sequence | None = None) -> str:
    """One panel per (row, metric); in each, a line per value of `series` with its bootstrap band.

    `summary` is the long output of `iclsft.evaluate.stats.summarize` restricted to what this figure
    shows; `series` values are drawn in the order of `colors`.
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
        ax.set_ylabel(ylabel if rows is None else f"{row}\n{ylabel}", fontsize=9)
        ax.tick_params(labelsize=8, labelbottom=True)
        ax.grid(alpha=0.3)
        if i + n_cols >= len(panels):  # nothing below this panel
            ax.set_xlabel(xlabel, fontsize=9)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    return writer.save(fig, name, n_data)


# -- inferred vs true angle --------------------------------------------------------------------------

def draw_angles(writer: FigureWriter, name: str, title: str, summary: pd.DataFrame, methods: Sequence[str]) -> str:
    """Inferred against true angle, one panel per (raw/calibrated, method), a line per K.

    The inferred angle is drawn as θ + mean angle error (the error is wrapped into (−90°, 90°], so
    its mean is meaningful where the inferred angle itself wraps around 0°/180°); bars are the
    bootstrap interval across seeds. The dashed diagonal is a perfect learner.
    """
    kinds = [(m, lab) for m, lab in (("angle_error", "inferred angle (°)"),
                                     ("cal_angle_error", "calibrated inferred angle (°)"))
             if np.isfinite(summary.loc[summary["metric"] == m, "mean"]).any()]
    colors = k_colors(summary["shots"])
    fig, axes = new_figure(len(kinds), len(methods), (3.0, 2.9))
    fig.suptitle(title)
    n_data = 0
    handles = {}
    y_range = [-10.0, 190.0]
    for r, (metric, ylabel) in enumerate(kinds):
        for c, method in enumerate(methods):
            ax = axes[r, c]
            sel = summary[(summary["metric"] == metric) & (summary["method"] == method) & np.isfinite(summary["mean"])]
            for k, color in colors.items():
                line = sel[sel["shots"] == k].sort_values("angle")
                if line.empty:
                    continue
                y = line["angle"] + line["mean"]
                err = np.vstack([line["mean"] - line["lo"], line["hi"] - line["mean"]])
                h = ax.errorbar(line["angle"], y, yerr=err, marker="o", ms=4, capsize=2, color=color, label=f"K={k}")
                handles[f"K={k}"] = h
                n_data += len(line)
                y_range = [min(y_range[0], float((y - err[0]).min()) - 5),
                           max(y_range[1], float((y + err[1]).max()) + 5)]
            ax.plot([0, 180], [0, 180], color="k", lw=0.8, ls="--")
            ax.set_xlim(-8, 188)
            ax.set_xticks([0, 45, 90, 135, 180])
            ax.set_yticks([0, 45, 90, 135, 180])
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(method, fontsize=10)
            if c == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if r == len(kinds) - 1:
                ax.set_xlabel("true angle θ (°)", fontsize=9)
    for ax in axes.flat:
        ax.set_ylim(*y_range)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    return writer.save(fig, name, n_data)
