"""RSA figures (SPEC §7): collapse index against layer, cosine-similarity histograms and the
label-sorted 400×400 sub-matrices, from each condition's `rsa.npz`.

`rsa.npz` holds `layers` (L,), `bins` (B+1,) edges on [−1, 1], `hist_{resid,mlp}` (L, B) pair counts,
`sub_{resid,mlp}` (L, n, n) cosines over a label-balanced subset with labels `sub_truth` (n,), and
`collapse_{resid,mlp}` (L,) = mean within-class − mean between-class cosine. Arrays are read only for
the figures that need them (a sweep's sub-matrices run to gigabytes); a file that cannot be read or
has the wrong shapes is reported in the page, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from iclsft.evaluate.stats import bootstrap_interval
from iclsft.report.data import method_color
from iclsft.report.figures import FigureWriter, new_figure

STREAMS = (("resid", "residual stream"), ("mlp", "MLP output"))
MAX_LAYERS_SHOWN = 6
MAX_SHOTS_SHOWN = 5


def read_rsa(cdir: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Named arrays of `cdir/rsa.npz` (checked against the checksum in rsa.json), shape-checked against
    each other; ValueError otherwise."""
    from iclsft.rsa.run import load_rsa

    path = Path(cdir) / "rsa.npz"
    keys = ["layers", *[k for k in keys if k != "layers"]]
    z = load_rsa(cdir)
    missing = [k for k in keys if k not in z]
    if missing:
        raise ValueError(f"{path} lacks arrays {missing} (it has {sorted(z)})")
    out = {k: np.asarray(z[k]) for k in keys}
    n_layers = len(out["layers"])
    n_sub = len(out["sub_truth"]) if "sub_truth" in out else None
    expected = {"bins": None}
    for stream, _ in STREAMS:
        expected[f"collapse_{stream}"] = (n_layers,)
        if "bins" in out:
            expected[f"hist_{stream}"] = (n_layers, len(out["bins"]) - 1)
        if n_sub is not None:
            expected[f"sub_{stream}"] = (n_layers, n_sub, n_sub)
    for k, v in out.items():
        shape = expected.get(k)
        if shape is not None and v.shape != shape:
            raise ValueError(f"{path}: {k} has shape {v.shape}, expected {shape} for {n_layers} layers")
        if k.startswith("hist_") and (v.sum(axis=1) <= 0).any():
            raise ValueError(f"{path}: {k} has a layer without any counted pair")
    return out


def _read(cond: pd.Series, keys: Sequence[str], problems: list[str]) -> dict[str, np.ndarray] | None:
    try:
        return read_rsa(Path(cond["dir"]), keys)
    except (OSError, ValueError) as e:
        problems.append(f"{Path(cond['dir']).name}: {e}")
        return None


def spread(values: Sequence[int], n: int) -> list[int]:
    """At most `n` of the sorted `values`, evenly spread, always including the first and last."""
    values = sorted(set(values))
    if len(values) <= n:
        return values
    return [values[i] for i in sorted(set(np.round(np.linspace(0, len(values) - 1, n)).astype(int)))]


def draw_collapse(writer: FigureWriter, name: str, title: str, conds: pd.DataFrame, methods: Sequence[str],
                  problems: list[str]) -> str | None:
    """Collapse index against layer: a column per K, a row per stream, a line per method (mean over
    seeds with its bootstrap band). None when no file could be read (each failure is in `problems`)."""
    arrays = {}
    for _, cond in conds.iterrows():
        got = _read(cond, ["collapse_resid", "collapse_mlp"], problems)
        if got is not None:
            arrays[cond["condition"]] = got
    conds = conds[conds["condition"].isin(arrays)]
    if conds.empty:
        return None
    shots = spread(conds["shots"], MAX_SHOTS_SHOWN)
    fig, axes = new_figure(len(STREAMS), len(shots), (3.0, 2.4), sharey="row")
    fig.suptitle(title)
    n_data = 0
    handles = {}
    for c, k in enumerate(shots):
        for r, (stream, stream_label) in enumerate(STREAMS):
            ax = axes[r, c]
            for method in methods:
                sel = conds[(conds["shots"] == k) & (conds["method"] == method)]
                runs = [arrays[i] for i in sel["condition"] if i in arrays]
                if not runs:
                    continue
                layers = runs[0]["layers"]
                runs = [a for a in runs if np.array_equal(a["layers"], layers)]
                values = np.stack([a[f"collapse_{stream}"].astype(np.float64) for a in runs])
                band = np.array([bootstrap_interval(values[:, j]) for j in range(values.shape[1])])
                (h,) = ax.plot(layers, values.mean(axis=0), color=method_color(method), marker=".", label=method)
                ax.fill_between(layers, band[:, 0], band[:, 1], color=method_color(method), alpha=0.18, lw=0)
                handles[method] = h
                n_data += len(layers)
            ax.axhline(0, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
            if r == 0:
                ax.set_title(f"K={k}", fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{stream_label}\ncollapse index", fontsize=9)
            if r == len(STREAMS) - 1:
                ax.set_xlabel("layer", fontsize=9)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    return writer.save(fig, name, n_data)


def draw_histograms(writer: FigureWriter, name: str, title: str, picks: Mapping[str, pd.Series],
                    problems: list[str]) -> str | None:
    """Cosine-similarity histograms over all grid pairs: a column per (spread) layer, a row per
    stream, a line per method (one condition each). None when no file could be read."""
    arrays = {m: a for m, c in picks.items() if (a := _read(c, ["bins", "hist_resid", "hist_mlp"], problems))}
    if not arrays:
        return None
    n_layers = min((len(a["layers"]) for a in arrays.values()), default=0)
    shown = spread(range(n_layers), MAX_LAYERS_SHOWN)
    fig, axes = new_figure(len(STREAMS), max(1, len(shown)), (2.2, 2.0), sharey="row")
    fig.suptitle(title)
    n_data = 0
    handles = {}
    for r, (stream, stream_label) in enumerate(STREAMS):
        lo, hi = 1.0, -1.0
        for c, layer in enumerate(shown):
            ax = axes[r, c]
            for method, a in arrays.items():
                counts = a[f"hist_{stream}"][layer].astype(np.float64)
                if counts.sum() <= 0:
                    continue
                bins = a["bins"].astype(np.float64)
                density = counts / counts.sum() / np.diff(bins)
                h = ax.stairs(density, bins, color=method_color(method), label=method, lw=1.2)
                handles[method] = h
                used = np.nonzero(counts)[0]
                lo, hi = min(lo, bins[used[0]]), max(hi, bins[used[-1] + 1])
                n_data += 1
            if r == 0:
                ax.set_title(f"layer {int(next(iter(arrays.values()))['layers'][layer])}", fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{stream_label}\ndensity", fontsize=9)
            if r == len(STREAMS) - 1:
                ax.set_xlabel("cosine similarity", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.grid(alpha=0.3)
        if hi > lo:
            pad = 0.05 * (hi - lo)
            for ax in axes[r, :]:
                ax.set_xlim(lo - pad, hi + pad)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    return writer.save(fig, name, n_data)


def draw_submatrices(writer: FigureWriter, name: str, title: str, picks: Mapping[str, pd.Series], stream: str,
                     problems: list[str]) -> str | None:
    """Label-sorted cosine sub-matrices: a row per method, a column per (spread) layer; one colour
    scale per column (the layers differ in scale, the methods are what a column compares). None when
    no file could be read."""
    arrays = {m: a for m, c in picks.items() if (a := _read(c, [f"sub_{stream}", "sub_truth"], problems))}
    if not arrays:
        return None
    n_layers = min((len(a["layers"]) for a in arrays.values()), default=0)
    shown = spread(range(n_layers), MAX_LAYERS_SHOWN)
    fig, axes = new_figure(max(1, len(arrays)), max(1, len(shown)), (1.9, 1.9))
    fig.suptitle(title)
    n_data = 0
    for c, layer in enumerate(shown):
        mats = {}
        for method, a in arrays.items():
            order = np.argsort(a["sub_truth"], kind="stable")  # sorted by label already; make sure
            m = a[f"sub_{stream}"][layer].astype(np.float32)[np.ix_(order, order)]
            mats[method] = (m, np.searchsorted(a["sub_truth"][order], a["sub_truth"][order][-1]))
        off = np.concatenate([m[~np.eye(len(m), dtype=bool)] for m, _ in mats.values()])
        off = off[np.isfinite(off)]
        vmin, vmax = (np.percentile(off, [1, 99]) if len(off) else (-1.0, 1.0))
        image = None
        for r, (method, (m, split)) in enumerate(mats.items()):
            ax = axes[r, c]
            image = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-6), interpolation="nearest")
            for pos in (split - 0.5,):
                ax.axhline(pos, color="white", lw=0.8)
                ax.axvline(pos, color="white", lw=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"layer {int(arrays[method]['layers'][layer])}", fontsize=10)
            if c == 0:
                ax.set_ylabel(method, fontsize=9)
            n_data += 1
        if image is not None:
            fig.colorbar(image, ax=axes[:, c], location="bottom", shrink=0.85, aspect=15).ax.tick_params(labelsize=7)
    return writer.save(fig, name, n_data)
