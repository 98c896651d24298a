"""RSA figures (SPEC §7): collapse index against layer, cosine-similarity histograms and the
400×400 sub-matrices, from each condition's `rsa.npz` (exemplar/test similarity and collapse against
training fraction: iclsft.report.rsa_measures).

`rsa.npz` holds `layers` (L,), `bins` (B+1,) edges on [−1, 1], `hist_{resid,mlp}` (L, B) pair counts,
`sub_{resid,mlp}` (L, n, n) cosines over the matrix points (by default the condition's exemplars,
then test inputs, each kind sorted by label; `sub_is_exemplar`, `sub_truth` (n,) say which is which),
`collapse_{resid,mlp}` (L,) = mean within-class − mean between-class cosine, and
`{within_exemplar,within_test,exemplar_test}_{resid,mlp}` (L,). Intervals over seeds are Student-t
(`iclsft.evaluate.stats.t_interval`); every caption says so and gives n. Arrays are read only for
the figures that need them (a sweep's sub-matrices run to gigabytes); a file that cannot be read or
has the wrong shapes is reported in the page, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from iclsft.evaluate.rundata import method_color
from iclsft.evaluate.stats import T_METHOD, t_interval
from iclsft.report.figures import FigureWriter, new_figure, panel_axes
from iclsft.rsa.run import load_rsa, read_rsa_record

STREAMS = (("resid", "residual stream"), ("mlp", "MLP output"))
BLOCKS = ("within_exemplar", "within_test", "exemplar_test")
MAX_LAYERS_SHOWN = 6
MAX_SHOTS_SHOWN = 5


def read_rsa(cdir: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Named arrays of `cdir/rsa.npz` (checked against the checksum in rsa.json), shape-checked against
    each other; ValueError otherwise. `optional` arrays are included where the file has them."""
    path = Path(cdir) / "rsa.npz"
    keys = ["layers", *[k for k in keys if k != "layers"]]
    z = load_rsa(cdir)
    missing = [k for k in keys if k not in z]
    if missing:
        raise ValueError(f"{path} lacks arrays {missing} (it has {sorted(z)})")
    out = {k: np.asarray(z[k]) for k in [*keys, *(k for k in optional if k in z and k not in keys)]}
    n_layers = len(out["layers"])
    n_sub = len(out["sub_truth"]) if "sub_truth" in out else None
    expected = {"bins": None}
    if n_sub is not None:
        expected["sub_is_exemplar"] = (n_sub,)
    for stream, _ in STREAMS:
        for stat in ("collapse", *BLOCKS):
            expected[f"{stat}_{stream}"] = (n_layers,)
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


def _read(cond: pd.Series, keys: Sequence[str], problems: list[str],
          optional: Sequence[str] = ()) -> dict[str, np.ndarray] | None:
    try:
        return read_rsa(Path(cond["dir"]), keys, optional)
    except (OSError, ValueError) as e:
        problems.append(f"{Path(cond['dir']).name}: {e}")
        return None


def spread(values: Sequence[int], n: int) -> list[int]:
    """At most `n` of the sorted `values`, evenly spread, always including the first and last."""
    values = sorted(set(values))
    if len(values) <= n:
        return values
    return [values[i] for i in sorted(set(np.round(np.linspace(0, len(values) - 1, n)).astype(int)))]


def seed_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Mean over seeds (axis 0) of `values` (seeds, points) with the 95% t-interval over seeds per
    point (NaN with one seed); and the number of seeds."""
    intervals = [t_interval(values[:, j]) for j in range(values.shape[1])]
    return (np.array([iv.mean for iv in intervals]), np.array([iv.lo for iv in intervals]),
            np.array([iv.hi for iv in intervals]), values.shape[0])


def band_note(counts: Sequence[int]) -> str:
    """How a figure's bands were made, for its caption: "band: 95% t over seeds, n = 2–3", with the
    lines of a single seed named as having none."""
    counts = sorted(set(int(n) for n in counts))
    if not counts or counts[-1] < 2:
        return "one seed: no band"
    many = [n for n in counts if n >= 2]
    text = f"band: 95% {T_METHOD}, n = {many[0]}" + (f"–{many[-1]}" if len(many) > 1 else "")
    return text + ("; lines with one seed: no band" if counts[0] < 2 else "")


def layer_axes(ax, r: int, c: int, title: str, ylabel: str) -> None:
    """Grid and labels of one panel of a (stream rows × columns) against-layer figure."""
    panel_axes(ax, r, c, len(STREAMS), title, ylabel, "layer")


def draw_collapse(writer: FigureWriter, name: str, title: str, conds: pd.DataFrame, methods: Sequence[str],
                  problems: list[str]) -> tuple[str, str] | None:
    """Collapse index against layer: a column per K, a row per stream, a line per method (mean over
    seeds with its t-interval band). Returns (figure name, band note), or None when no file could be
    read (each failure is in `problems`)."""
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
    handles, counts = {}, []
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
                mean, lo, hi, n = seed_band(np.stack([a[f"collapse_{stream}"].astype(np.float64) for a in runs]))
                (h,) = ax.plot(layers, mean, color=method_color(method), marker=".", label=method)
                ax.fill_between(layers, lo, hi, color=method_color(method), alpha=0.18, lw=0)
                counts.append(n)
                handles[method] = h
                n_data += len(layers)
            ax.axhline(0, color="grey", lw=0.8, ls=":")
            layer_axes(ax, r, c, f"K={k}", f"{stream_label}\ncollapse index")
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=9)
    return writer.save(fig, name, n_data), band_note(counts)


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


def matrix_description(picks: Mapping[str, pd.Series]) -> str:
    """What the picked conditions' sub-matrices hold, from their rsa.json: "exemplars + test points
    (icl: 4 + 92)" or "the fixed balanced grid subset (400 points)"."""
    parts, kinds = [], set()
    for method, cond in picks.items():
        info = read_rsa_record(Path(cond["dir"])) or {}
        kinds.add(info.get("rsa_subset", "grid"))  # version-1 files held the grid subset
        n, n_ex = info.get("subset"), info.get("subset_exemplars", 0)
        if isinstance(n, int):
            exemplars = info.get("rsa_subset") == "exemplars"
            parts.append(f"{method}: {n_ex} + {n - n_ex}" if exemplars else f"{method}: {n}")
    if kinds == {"exemplars"}:
        return f"the condition's exemplars + hold-out test points ({', '.join(parts)})"
    if kinds == {"grid"}:
        return f"the fixed label-balanced grid subset ({', '.join(parts)} points)"
    return f"mixed: exemplars + test points or the grid subset ({', '.join(parts)})"


def blocks(truth: np.ndarray, is_exemplar: np.ndarray) -> tuple[list[int], list[int]]:
    """Where the matrix's blocks start: (kind boundaries, label boundaries inside a kind), as row
    positions in the stored order (exemplars, then test points; each kind by label)."""
    kind = [i for i in range(1, len(truth)) if is_exemplar[i] != is_exemplar[i - 1]]
    label = [i for i in range(1, len(truth)) if truth[i] != truth[i - 1] and i not in kind]
    return kind, label


def draw_submatrices(writer: FigureWriter, name: str, title: str, picks: Mapping[str, pd.Series], stream: str,
                     problems: list[str]) -> str | None:
    """Cosine sub-matrices in their stored order (exemplars, then test points, each by label): a row
    per method, a column per (spread) layer; solid lines separate exemplars from test points, dashed
    lines the classes. One colour scale per column (the layers differ in scale, the methods are what
    a column compares). None when no file could be read."""
    arrays = {m: a for m, c in picks.items()
              if (a := _read(c, [f"sub_{stream}", "sub_truth"], problems, optional=["sub_is_exemplar"]))}
    if not arrays:
        return None
    n_layers = min((len(a["layers"]) for a in arrays.values()), default=0)
    shown = spread(range(n_layers), MAX_LAYERS_SHOWN)
    fig, axes = new_figure(max(1, len(arrays)), max(1, len(shown)), (1.9, 1.9))
    fig.suptitle(title)
    n_data = 0
    for c, layer in enumerate(shown):
        mats = {method: a[f"sub_{stream}"][layer].astype(np.float32) for method, a in arrays.items()}
        off = np.concatenate([m[~np.eye(len(m), dtype=bool)] for m in mats.values()])
        off = off[np.isfinite(off)]
        vmin, vmax = (np.percentile(off, [1, 99]) if len(off) else (-1.0, 1.0))
        image = None
        for r, (method, m) in enumerate(mats.items()):
            ax = axes[r, c]
            image = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-6), interpolation="nearest")
            a = arrays[method]
            # files of RSA version 1 hold no membership: every point there is a grid point
            is_exemplar = a.get("sub_is_exemplar", np.zeros(len(m), dtype=bool))
            kind, label = blocks(a["sub_truth"], is_exemplar)
            for pos, style in [(p, "-") for p in kind] + [(p, "--") for p in label]:
                ax.axhline(pos - 0.5, color="white", lw=0.8, ls=style)
                ax.axvline(pos - 0.5, color="white", lw=0.8, ls=style)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"layer {int(a['layers'][layer])}", fontsize=10)
            if c == 0:
                ax.set_ylabel(method, fontsize=9)
            n_data += 1
        if image is not None:
            fig.colorbar(image, ax=axes[:, c], location="bottom", shrink=0.85, aspect=15).ax.tick_params(labelsize=7)
    return writer.save(fig, name, n_data)
