"""The cross-model page of a sweep: `OUT/<model>/` run directories side by side (SPEC §5 metrics).

    from iclsft.report.models import build_models_report
    build_models_report("runs/sweep")   # writes runs/sweep/report/index.html and its PNGs

One figure per key metric against K, one panel per (task, angle), a line per (model, method): colour
names the model, line style the method; bands are each summary's interval across seeds. Final SFT
checkpoints and each model's main order (random where it has it) only; the models' own reports,
linked from the page, show the rest.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from iclsft.evaluate.rundata import METHOD_ORDER, RunData, is_final, load_run, method_key
from iclsft.evaluate.stats import summarize
from iclsft.report.build import build_linear2d_report
from iclsft.report.figures import METRIC_AXES, WRAP, FigureWriter, interval_note, new_figure, slug
from iclsft.report.html import Section, esc, page
from iclsft.study import get, of_run

KEY_METRICS = tuple(METRIC_AXES[m] for m in ("accuracy", "holdout_accuracy", "cal_accuracy", "auc", "confidence"))
MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
METHOD_STYLES = ("-", "--", ":", "-.")
REPORT_NAME = "report"


def model_runs(sweep_dir: str | Path) -> dict[str, Path]:
    """The 2D run directories of a sweep folder (its sub-folders with a spec.json), by folder name.
    Implicit-suite runs live one level further down (`<model>/implicit`) and are not among them."""
    root = Path(sweep_dir)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "spec.json").is_file()}


def is_sweep_dir(path: str | Path) -> bool:
    """A folder that is no run directory itself but holds run directories (`OUT` of a sweep)."""
    return not (Path(path) / "spec.json").is_file() and bool(model_runs(path))


def build_models_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *,
                        model_reports: bool = True) -> Path:
    """Write the cross-model page into `out_dir` (default OUT/report) and return its `index.html`.

    With `model_reports`, each model's own report is (re)built first (`OUT/<model>/report`); the
    sweep passes False, having just built them. A model whose run cannot be read (no finished
    condition yet) is listed with the reason instead of failing the page.
    """
    two_d = (None, get("linear2d"))  # the 2D study's runs (and those load_run says are unreadable)
    runs = {name: path for name, path in model_runs(sweep_dir).items() if of_run(path) in two_d}
    if not runs:
        raise ValueError(f"{str(sweep_dir)!r} holds no run directory (a sub-folder <model>/ with a spec.json, as a "
                         "sweep writes): give a run directory or a sweep's out folder")
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / REPORT_NAME
    out.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, RunData] = {}
    problems: dict[str, str] = {}
    for name, path in runs.items():
        try:
            loaded[name] = load_run(path)
        except (ValueError, FileNotFoundError) as e:
            problems[name] = str(e)
            continue
        if model_reports:
            build_linear2d_report(path)
    summary = _summaries(loaded)
    writer = FigureWriter(out)
    sections = [_models_section(runs, loaded, problems, out), _metrics_section(summary, writer)]
    meta = f"{Path(sweep_dir)} · {len(loaded)} model run{'s' * (len(loaded) != 1)} · final SFT checkpoints, main order"
    markup = page(f"Models compared — {Path(sweep_dir).resolve().name}", meta, sections)
    return writer.publish(markup)


def _summaries(loaded: dict[str, RunData]) -> pd.DataFrame:
    """Every model's across-seed summary at final checkpoints in its main order, with a `model` column."""
    parts = []
    for name, data in loaded.items():
        summary = summarize(data.metrics)
        summary = summary[is_final(summary["checkpoint"]) & (summary["order"] == data.main_order)
                          & summary["metric"].isin([m for m, _, _ in KEY_METRICS])]
        parts.append(summary.assign(model=name))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["model", "task", "angle", "metric"])


def _models_section(runs: dict[str, Path], loaded: dict[str, RunData], problems: dict[str, str],
                    out: Path) -> Section:
    s = Section("Models", "Each model's run directory and its own report (all figures and statistics).")
    rows = []
    for name, path in runs.items():
        own = path / REPORT_NAME / "index.html"
        # Relative, so the sweep folder can be moved or served as a whole.
        link = (f'<a href="{esc(Path(os.path.relpath(own, out)).as_posix())}">{esc(name)} report</a>'
                if own.is_file() else "no report built yet")
        data = loaded.get(name)
        cells = [name, str(path), str(len(data.conditions)) if data else "–", ", ".join(data.methods) if data else "–"]
        rows.append('<tr><td class="key">' + "</td><td>".join(esc(c) for c in cells) + f'</td><td class="key">{link}'
                    "</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "run directory", "conditions", "methods", "report"))
    s.raw(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    for name, reason in problems.items():
        s.note(f"{name}: not compared: {reason}")
    return s


def _metrics_section(summary: pd.DataFrame, writer: FigureWriter) -> Section:
    s = Section("Key metrics against K", "Mean over seeds with its 95% interval as a band, one panel per (task, "
                "angle), a line per (model, method): colour is the model, line style the method. Dotted lines "
                "mark chance.")
    if summary.empty or not np.isfinite(summary["mean"]).any():
        s.note("Omitted: no model has finite metric values to compare.")
        return s
    models = list(dict.fromkeys(summary["model"]))
    methods = sorted(summary["method"].unique(), key=method_key)
    for metric, ylabel, ref in KEY_METRICS:
        sel = summary[(summary["metric"] == metric) & np.isfinite(summary["mean"])]
        if sel.empty:
            s.note(f"{ylabel}: no finite values in any model.")
            continue
        name = draw_models(writer, slug("models", metric), ylabel, sel, models, methods, ref)
        s.figure(name, f"{ylabel[0].upper()}{ylabel[1:]} against K per (task, angle), models {', '.join(models)}; "
                 f"{interval_note(sel)}.")
    return s


def draw_models(writer: FigureWriter, name: str, ylabel: str, summary: pd.DataFrame, models: Sequence[str],
                methods: Sequence[str], ref: float | None) -> str:
    """One panel per (task, angle) of `summary` (one metric), a line per (model, method) with its band;
    the legend, below the panels, keys colours to models and line styles to methods (model names are
    folder names and can be long: beside the panels they would squeeze them)."""
    panels = sorted({(str(t), float(a)) for t, a in summary[["task", "angle"]].itertuples(index=False)})
    n_cols = min(WRAP, len(panels))
    fig, axes = new_figure(math.ceil(len(panels) / n_cols), n_cols, (3.3, 2.6))
    fig.suptitle(ylabel)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    colors = {m: MODEL_COLORS[i % len(MODEL_COLORS)] for i, m in enumerate(models)}
    styles = {m: METHOD_STYLES[min(method_key(m)[0], len(METHOD_ORDER)) % len(METHOD_STYLES)] for m in methods}
    n_data = 0
    drawn: set[tuple[str, str]] = set()
    for ax, (task, angle) in zip(axes.flat, panels):
        sel = summary[(summary["task"] == task) & (summary["angle"] == angle)]
        for model in models:
            for method in methods:
                line = sel[(sel["model"] == model) & (sel["method"] == method)].sort_values("shots")
                if line.empty:
                    continue
                ax.plot(line["shots"], line["mean"], marker="o", ms=3, color=colors[model], ls=styles[method])
                ax.fill_between(line["shots"], line["lo"], line["hi"], color=colors[model], alpha=0.12, lw=0)
                drawn.add((model, method))
                n_data += len(line)
        if ref is not None:
            ax.axhline(ref, color="grey", lw=0.8, ls=":")
        shots = sorted(sel["shots"].unique())
        ax.set_xscale("log")
        ax.set_xticks(shots, [f"{k:g}" for k in shots])
        ax.minorticks_off()
        ax.set_title(f"{task} · θ = {angle:g}°", fontsize=10)
        ax.set_xlabel("K (exemplars per class)", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if drawn:
        from matplotlib.lines import Line2D  # here: iclsft.report.figures names the package when it is missing

        keys = [Line2D([], [], color=colors[m], lw=2) for m in models if any(d[0] == m for d in drawn)]
        labels = [m for m in models if any(d[0] == m for d in drawn)]
        shown = [m for m in methods if any(d[1] == m for d in drawn)]
        keys += [Line2D([], [], color="k", ls=styles[m]) for m in shown]
        fig.legend(keys, labels + shown, loc="outside lower center", ncols=min(4, len(keys)), fontsize=8)
    return writer.save(fig, name, n_data)
