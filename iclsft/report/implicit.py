"""The report of an implicit-pattern run (SPEC §8): the study's results table, accuracy and shortcut
use against K per task (both variants, fine-tuned models as horizontal lines), and circuit shift.
Like the 2D report it needs no model, and omits (with a note) what the run lacks."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from iclsft import __version__
from iclsft.claims import load_implicit, study_claims
from iclsft.evaluate.rundata import method_color
from iclsft.evaluate.runs import recompute_metrics
from iclsft.implicit.circuits import load_shift
from iclsft.implicit.results import results_table
from iclsft.report.claims import claims_section
from iclsft.report.figures import FigureWriter, new_figure, slug
from iclsft.report.html import Section, fmt, page, table

VARIANT_STYLE = {"holds": "-", "broken": "--"}
CURVES = (("accuracy", "accuracy"), ("shortcut_rate", "answers = shortcut's"))


def build_implicit_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write index.html and its PNGs for the implicit run at `run_dir`; return the path of index.html."""
    path = Path(run_dir)
    metrics = recompute_metrics(path)
    out = Path(out_dir) if out_dir is not None else path / "report"
    out.mkdir(parents=True, exist_ok=True)
    writer = FigureWriter(out)
    sections = [_results_section(metrics), _curves_section(metrics, writer), _circuits_section(path, writer),
                claims_section(lambda: study_claims(load_implicit(path, metrics)))]
    meta = (f"{path} · {len(metrics)} finished conditions · accuracy = exact answer; means over seeds · "
            f"iclsft {__version__} · {time.strftime('%Y-%m-%d %H:%M')}")
    markup = page(f"Implicit patterns: ICL vs fine-tuning — {path.resolve().name}", meta, sections)
    return writer.publish(markup)


def _results_section(metrics: pd.DataFrame) -> Section:
    s = Section("Results", "Accuracy per task and variant: the base model (zero-shot, K=0), ICL as the best over "
                "K in 1..16 (the study's number) and at the largest K, and each fine-tuned model (zero-shot). "
                "'holds': the hidden pattern gives the answer; 'broken': it gives a wrong one.")
    if metrics.empty:
        s.note("No finished conditions yet.")
        return s
    res = results_table(metrics)
    header = list(res.columns)
    rows = [[r[c] if isinstance(r[c], str) else ("" if pd.isna(r[c]) else (str(int(r[c])) if c == "best K"
             else fmt(r[c]))) for c in header] for _, r in res.iterrows()]
    s.raw(table(header, rows, n_keys=2))
    return s


def _curves_section(metrics: pd.DataFrame, writer: FigureWriter) -> Section:
    s = Section("Against K", "ICL accuracy and shortcut use against the number of demos (solid: pattern holds, "
                "dashed: broken); fine-tuned models as horizontal lines of their method's colour.")
    icl = metrics[metrics["method"] == "icl"]
    if icl.empty:
        s.note("No ICL conditions: nothing to draw against K.")
        return s
    tasks = sorted(metrics["task"].unique())
    fig, axes = new_figure(len(CURVES), len(tasks), (3.4, 2.6))
    n = 0
    for col, task in enumerate(tasks):
        for row, (metric, label) in enumerate(CURVES):
            ax = axes[row][col]
            for variant, style in VARIANT_STYLE.items():
                g = icl[(icl["task"] == task) & (icl["variant"] == variant)].groupby("shots")[metric].mean()
                if len(g):
                    x = [max(k, 0.5) for k in g.index]  # K=0 drawn at 0.5 on the log axis
                    ax.plot(x, g.values, style, marker="o", color=method_color("icl"), label=f"ICL {variant}")
                    n += len(g)
                here = (metrics["task"] == task) & (metrics["variant"] == variant)
                sft = metrics[here & (metrics["method"] != "icl")]
                for method, v in sft.groupby("method")[metric].mean().items():
                    ax.axhline(v, linestyle=style, color=method_color(method), label=f"{method} {variant}")
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{task}: {label}", fontsize=10)
            ax.set_xlabel("K demos (0 at 0.5)")
    axes[0][0].legend(fontsize=7)
    s.figure(writer.save(fig, slug("implicit", "curves"), n), "ICL against K, fine-tuned models as lines")
    return s


def _circuits_section(path: Path, writer: FigureWriter) -> Section:
    s = Section("Circuit shift", "Attribution-patching scores per attention head and MLP block on (holds, broken) "
                "question pairs, compared with the base model's: 1 − cosine of the score vectors and 1 − Jaccard "
                "of the top-5% components (docs/implicit.md: our operationalisation). Larger = the model "
                "solves the task through more different components.")
    shift = load_shift(path)
    if shift is None or shift.empty:
        s.note("No circuit scores in this run (iclsft-eval circuits RUN computes them).")
        return s
    cols = ["heads_cosine", "heads_jaccard", "mlps_cosine", "mlps_jaccard", "ld_clean", "ld_corrupt"]
    rows = [[r["task"], r["state"], str(int(r["n_pairs"]))] + [fmt(r[c]) for c in cols] for _, r in shift.iterrows()]
    s.raw(table(["task", "state", "pairs", *cols], rows, n_keys=2))
    tasks = sorted(shift["task"].unique())
    fig, axes = new_figure(1, 2, (max(3.0, 1.2 * len(tasks) * shift["state"].nunique() / 2), 2.8))
    n = 0
    states = list(dict.fromkeys(shift["state"]))
    width = 0.8 / max(1, len(states))
    for ax, kind in zip(axes[0], ("heads", "mlps")):
        for j, state in enumerate(states):
            sub = shift[shift["state"] == state].set_index("task").reindex(tasks)
            xs = [i + j * width for i in range(len(tasks))]
            color = method_color("icl" if state.startswith("icl") else state)
            ax.bar(xs, sub[f"{kind}_cosine"].fillna(0).to_numpy(), width, label=state, color=color)
            n += int(sub[f"{kind}_cosine"].notna().sum())
        ax.set_xticks([i + width * (len(states) - 1) / 2 for i in range(len(tasks))], tasks, fontsize=8)
        ax.set_title(f"{kind}: 1 − cosine vs base", fontsize=10)
    axes[0][0].legend(fontsize=7)
    s.figure(writer.save(fig, slug("implicit", "shift"), n), "Circuit shift relative to the base model")
    return s
