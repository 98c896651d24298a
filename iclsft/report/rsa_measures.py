"""RSA measures of the study's two findings that need more than one matrix (SPEC §7, issue 18):

- exemplar/test similarity: per layer, the mean cosine within the condition's exemplars, within the
  test points and between the two (off-diagonal pairs of the 400×400 matrix; `within_exemplar_*`,
  `within_test_*`, `exemplar_test_*` of rsa.npz). The study: ICL's in-context exemplars are more
  similar to each other than test points are, regardless of class.
- collapse against training fraction (the SFT dynamics control): the residual-stream collapse index
  averaged over the second half of the layers (L//2 … L−1, where the study sees SFT collapse), per
  SFT checkpoint, a line per SFT method, ICL at the same K as a horizontal reference.

Each value is the mean over seeds with a 95% Student-t interval over seeds (none with one seed); the
tables are returned so that tests and the claims check read the numbers the figures draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from iclsft.evaluate.rundata import method_color
from iclsft.report.figures import FigureWriter, new_figure
from iclsft.report.rsa import BLOCKS, MAX_SHOTS_SHOWN, STREAMS, _read, band_note, layer_axes, seed_band, spread

MEASURES = {"within_exemplar": ("within exemplars", "#d62728", "-"),
            "within_test": ("within test points", "#1f77b4", "-"),
            "exemplar_test": ("exemplar–test", "#7f7f7f", "--")}
LATE_LAYERS = "mean over the second half of the layers (L//2 … L−1)"
TABLE_COLUMNS = ["mean", "lo", "hi", "n"]


def late_collapse(collapse: np.ndarray) -> float:
    """The collapse index of the second half of the layers, averaged (layers L//2 … L−1)."""
    collapse = np.asarray(collapse, dtype=np.float64)
    return float(collapse[len(collapse) // 2 :].mean())


def _interval_rows(values: np.ndarray) -> list[list[float]]:
    mean, lo, hi, n = seed_band(values)
    return [[m, a, b, n] for m, a, b in zip(mean, lo, hi)]


def block_table(conds: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """Per method, stream, measure and layer: mean over the conditions' seeds (rows of `conds`, one K)
    with its t-interval and n. Conditions whose arrays cannot be read are listed in `problems`."""
    keys = [f"{b}_{s}" for b in BLOCKS for s, _ in STREAMS]
    rows = []
    for method, mc in conds.groupby("method", sort=False):
        runs = [a for _, c in mc.iterrows() if (a := _read(c, keys, problems)) is not None]
        if not runs:
            continue
        layers = runs[0]["layers"]
        runs = [a for a in runs if np.array_equal(a["layers"], layers)]
        for stream, _ in STREAMS:
            for block in BLOCKS:
                values = np.stack([a[f"{block}_{stream}"].astype(np.float64) for a in runs])
                for layer, row in zip(layers, _interval_rows(values)):
                    rows.append([method, stream, block, int(layer), *row])
    return pd.DataFrame(rows, columns=["method", "stream", "measure", "layer", *TABLE_COLUMNS])


def draw_block_means(writer: FigureWriter, name: str, title: str, conds: pd.DataFrame, methods: Sequence[str],
                     problems: list[str]) -> tuple[str, str] | None:
    """Within-exemplar, within-test and exemplar–test similarity against layer: a column per method,
    a row per stream. Returns (figure name, band note), or None when nothing could be read or no
    condition has exemplars in its matrix."""
    table = block_table(conds, problems)
    table = table[table["method"].isin(methods)]
    if table.empty or not np.isfinite(table.loc[table["measure"] == "within_exemplar", "mean"]).any():
        return None
    shown = [m for m in methods if (table["method"] == m).any()]
    fig, axes = new_figure(len(STREAMS), len(shown), (2.8, 2.3), sharey="row")
    fig.suptitle(title)
    n_data, handles = 0, {}
    for c, method in enumerate(shown):
        for r, (stream, stream_label) in enumerate(STREAMS):
            ax = axes[r, c]
            for measure, (label, color, style) in MEASURES.items():
                t = table[(table["method"] == method) & (table["stream"] == stream) & (table["measure"] == measure)]
                if not np.isfinite(t["mean"]).any():
                    continue
                (h,) = ax.plot(t["layer"], t["mean"], color=color, ls=style, marker=".", label=label)
                ax.fill_between(t["layer"], t["lo"], t["hi"], color=color, alpha=0.18, lw=0)
                handles[label] = h
                n_data += len(t)
            layer_axes(ax, r, c, method, f"{stream_label}\nmean cosine")
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    return writer.save(fig, name, n_data), band_note(table["n"])


def dynamics_methods(conds: pd.DataFrame) -> list[str]:
    """SFT methods with RSA at two or more checkpoints of one K (the dynamics control)."""
    sft = conds[conds["checkpoint"].notna()]
    counts = sft.groupby(["method", "shots"])["checkpoint"].nunique()
    return sorted({m for (m, _k), n in counts.items() if n >= 2})


def collapse_by_fraction(conds: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """Late-layer residual collapse (`late_collapse`) per SFT method, K and checkpoint fraction, for
    the methods of `dynamics_methods`, and ICL (checkpoint NaN) at the same K: mean over seeds with
    its t-interval and n. `conds`: one panel's conditions with RSA, all checkpoints, one order."""
    methods = dynamics_methods(conds)
    if not methods:
        return pd.DataFrame(columns=["method", "shots", "checkpoint", *TABLE_COLUMNS])
    shots = sorted(conds.loc[conds["method"].isin(methods) & conds["checkpoint"].notna(), "shots"].unique())
    rows = []
    sel = conds[conds["shots"].isin(shots) & (conds["method"].isin(methods) | conds["checkpoint"].isna())]
    for (method, k, ckpt), group in sel.groupby(["method", "shots", "checkpoint"], dropna=False, sort=True):
        values = [late_collapse(a["collapse_resid"]) for _, c in group.iterrows()
                  if (a := _read(c, ["collapse_resid"], problems)) is not None]
        if values:
            rows.append([method, int(k), float(ckpt), *_interval_rows(np.array(values)[:, None])[0]])
    return pd.DataFrame(rows, columns=["method", "shots", "checkpoint", *TABLE_COLUMNS])


def draw_collapse_dynamics(writer: FigureWriter, name: str, title: str, conds: pd.DataFrame,
                           problems: list[str]) -> tuple[str, str] | None:
    """Late-layer residual collapse against fraction of training: a column per K (spread), a line
    per SFT method, ICL at that K as a horizontal line (its band shaded). Returns (figure name, band
    note), or None when no SFT method has two checkpoints with readable RSA."""
    table = collapse_by_fraction(conds, problems)
    sft = table[table["checkpoint"].notna()]
    if sft.empty:
        return None
    shots = spread(sft["shots"], MAX_SHOTS_SHOWN)
    fig, axes = new_figure(1, len(shots), (3.6, 2.8), sharey="row")
    fig.suptitle(title)
    n_data, handles = 0, {}
    for c, k in enumerate(shots):
        ax = axes[0, c]
        for method, t in sft[sft["shots"] == k].groupby("method", sort=True):
            t = t.sort_values("checkpoint")
            (h,) = ax.plot(t["checkpoint"], t["mean"], color=method_color(method), marker="o", label=method)
            ax.fill_between(t["checkpoint"], t["lo"], t["hi"], color=method_color(method), alpha=0.18, lw=0)
            handles[method] = h
            n_data += len(t)
        icl = table[(table["shots"] == k) & table["checkpoint"].isna()]
        for _, row in icl.iterrows():
            h = ax.axhline(row["mean"], color=method_color(row["method"]), ls="--", lw=1.2,
                           label=f"{row['method']} (same K)")
            if np.isfinite(row["lo"]):
                ax.axhspan(row["lo"], row["hi"], color=method_color(row["method"]), alpha=0.12, lw=0)
            handles[f"{row['method']} (same K)"] = h
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"K={k}", fontsize=10)
        ax.set_xlabel("fraction of training", fontsize=9)
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if c == 0:
            ax.set_ylabel("collapse index, residual\n(mean of layers L//2 … L−1)", fontsize=9)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    shown = table[table["shots"].isin(shots)]
    return writer.save(fig, name, n_data), band_note(shown["n"])
