"""Decision-field figures: p(first label) over the query lattice, raw and prior-corrected (the
log-odds d = lp_0 − lp_1 centred at its median over the lattice, SPEC §5), with the exemplars and
the true boundary. Drawn without pyplot, like the other figures (see iclsft.report.figures)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from iclsft.evaluate.metrics import centred_field
from iclsft.report.figures import FigureWriter, new_figure

FIELD_CMAP = "RdBu_r"  # p(first label): 1 red, 0 blue, 0.5 white; centred log-odds: > 0 red, < 0 blue
CLIP_PERCENTILE = 98.0  # centred fields: colour range ± this percentile of |d − median d|, per panel
CENTRE = 49.5  # centre of the 0..99 lattice, where every true boundary passes


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


def load_centred_field(cond: pd.Series) -> np.ndarray:
    """The condition's log-odds d = lp_0 − lp_1 minus its median over the lattice, from its scores."""
    field = np.asarray(centred_field(pd.read_parquet(Path(cond["dir"]) / "scores.parquet")), dtype=np.float64)
    n = len(range(0, 100, int(cond["grid_step"])))
    if field.shape != (n, n):
        raise ValueError(f"{cond['dir']}/scores.parquet gives a centred field of shape {field.shape}; its lattice "
                         f"(grid_step {cond['grid_step']}) needs ({n}, {n})")
    return field


def field_scale(field: np.ndarray) -> float:
    """Half-width of the colour range of a centred field: the CLIP_PERCENTILE-th percentile of |field|
    (a few extreme log-odds would otherwise wash the ranking out); 1 for a flat field."""
    s = float(np.percentile(np.abs(field), CLIP_PERCENTILE))
    return s if s > 0 else 1.0


def draw_fields(writer: FigureWriter, name: str, title: str, grid: Mapping[str, Mapping[int, pd.Series]],
                task: str, angle: float, label: str, *, centred: bool = False) -> str:
    """A grid of decision fields: one row per entry of `grid` (label → {K: condition}), one column
    per K; exemplars drawn as dots (white: first label, black: second), true boundary dashed.

    Raw: p(first label) on [0, 1]. Centred (`centred=True`): d − median(d) on a diverging scale
    symmetric around 0, each panel clipped at ±(CLIP_PERCENTILE-th percentile of its |d − median d|),
    the value shown in its title: one scale for all panels would leave the weakly separating ones white.
    """
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
            field = load_centred_field(cond) if centred else load_field(cond)
            step = int(cond["grid_step"])
            lo, hi = -step / 2, (field.shape[0] - 1) * step + step / 2
            vmax = field_scale(field) if centred else 1.0
            if centred:
                ax.set_title(f"K={k} · ±{vmax:.2g}" if r == 0 else f"±{vmax:.2g}", fontsize=9)
            # field[i, j] is (n1_i, n2_j): transpose so that n1 runs along x, n2 up the y axis.
            image = ax.imshow(field.T, origin="lower", extent=(lo, hi, lo, hi), cmap=FIELD_CMAP,
                              vmin=-vmax if centred else 0.0, vmax=vmax, interpolation="nearest")
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
    if image is not None and centred:
        # Imported here, not at the top: iclsft.report.figures is the import that names the missing package.
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        # Panels have their own scales: the bar shows the shared shape, in units of each panel's ±s.
        bar = fig.colorbar(ScalarMappable(Normalize(-1.0, 1.0), cmap=FIELD_CMAP), ax=axes, shrink=0.6,
                           label=f"(d − median d) / s, s = ±value in the panel title\n(d = log-odds of "
                                 f"{label.strip()}; clipped at P{CLIP_PERCENTILE:g} of |d − median d|)")
        bar.set_ticks([-1, 0, 1], labels=["−s", "0", "+s"])
    elif image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label=f"p({label.strip()})")
    return writer.save(fig, name, n_data)
