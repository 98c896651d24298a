"""`build_linear2d_report`: one HTML page with the figures of the 2D study (seed 002) for a run directory.

Sections follow the study: decision fields per method and K; metrics against K; inferred against
true angle (ICL's pull towards the diagonal); order probes; SFT training dynamics; RSA (histograms,
sub-matrices, collapse index against layer); tables of means with t-intervals over seeds and of the
paired ICL − SFT differences. A section whose data the run lacks says so in one line instead of
drawing an empty figure.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from iclsft import __version__
from iclsft.claims import load_linear2d, study_claims
from iclsft.evaluate.rundata import RunData, is_final, load_run, method_color
from iclsft.evaluate.stats import paired_differences, summarize
from iclsft.report import rsa, rsa_measures, tables
from iclsft.report.claims import claims_section
from iclsft.report.fields import CLIP_PERCENTILE, draw_fields
from iclsft.report.figures import (
    ANGLE_ROWS,
    CURVE_METRICS,
    DYNAMICS_METRICS,
    ORDER_METRICS,
    THETA_METRICS,
    FigureWriter,
    available_metrics,
    draw_angles,
    draw_lines,
    interval_note,
    k_colors,
    slug,
)
from iclsft.report.html import Section, page
from iclsft.tasks.linear2d import has_boundary_angle

ORDER_COLORS = ("#000000", "#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628")
K_AXIS = "K (exemplars per class)"


def build_linear2d_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the 2D study's `index.html`, its PNGs and the statistics as CSV for the run directory `run_dir`
    into `out_dir` (default RUN/report); return the path of `index.html`. Needs no model: everything comes
    from the stored results (`iclsft.report.build_report` picks the page a directory gets)."""
    data = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else data.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(data.metrics)
    diffs = paired_differences(data.metrics)
    writer = FigureWriter(out)
    sections = [
        tables.run_section(data),
        _fields_section(data, writer),
        _curves_section(data, summary, writer),
        _theta_section(data, summary, writer),
        _angles_section(data, summary, writer),
        _orders_section(data, summary, writer),
        _dynamics_section(data, summary, writer),
        _rsa_section(data, writer),
        tables.stats_section(data, summary, diffs, out),
        claims_section(lambda: study_claims(load_linear2d(data.path, data))),
    ]
    n = len(data.conditions)
    meta = (f"{data.path} · {n} finished condition{'s' * (n != 1)} · methods {', '.join(data.methods)} · "
            f"intervals: 95% Student t over seeds (n = seeds; angles circular), ICL − SFT by paired t, "
            f"Holm-adjusted · iclsft {__version__} · "
            f"{time.strftime('%Y-%m-%d %H:%M')}")
    markup = page(f"ICL vs SFT — {data.path.resolve().name}", meta, sections)
    return writer.publish(markup)


def _panel(table: pd.DataFrame, task: str, angle: float) -> pd.DataFrame:
    return table[(table["task"] == task) & (table["angle"] == angle)]


def _where(task: str, angle: float) -> str:
    return f"{task} · θ = {angle:g}°"


def _pick_seed(seeds: pd.Series) -> int:
    """Seed 0 where present (the figures of a single-seed run), else the smallest."""
    return 0 if (seeds == 0).any() else int(seeds.min())


def _field_cells(conds: pd.DataFrame) -> tuple[dict[int, pd.Series], int]:
    seed = _pick_seed(conds["seed"])
    return {int(row["shots"]): row for _, row in conds[conds["seed"] == seed].iterrows()}, seed


def _fields_section(data: RunData, writer: FigureWriter) -> Section:
    s = Section("Decision fields", f"p({data.first_label.strip()}) over the query lattice for each method (rows) "
                "and shot count K (columns); dots are the 2K exemplars (white: first label, black: second), the "
                "dashed line is the true boundary. ICL's seen-feature and comparison biases show as fields that "
                "follow rows/columns or the diagonal instead of the boundary. Beside each raw figure, the same "
                "conditions prior-corrected: the log-odds d = lp₀ − lp₁ minus its median over the lattice "
                "(SPEC §5). On a model with a label preference the raw field is one colour while the centred "
                "field shows how the model ranks the points.")
    conds = data.conditions[is_final(data.conditions["checkpoint"]) & (data.conditions["order"] == data.main_order)]
    for task, angle in data.panels:
        sel = _panel(conds, task, angle)
        grid, seeds = {}, set()
        for method in data.methods:
            if (sel["method"] == method).any():
                grid[method], seed = _field_cells(sel[sel["method"] == method])
                seeds.add(seed)
        if not grid:
            s.note(f"{_where(task, angle)}: no finished condition in order {data.main_order}.")
            continue
        seed_text = ", ".join(str(x) for x in sorted(seeds))
        name = draw_fields(writer, slug("fields", task, f"a{angle:g}"),
                           f"{_where(task, angle)} · order {data.main_order} · seed {seed_text}",
                           grid, task, angle, data.first_label)
        s.figure(name, f"Decision fields, {_where(task, angle)}, order {data.main_order}, seed {seed_text}.")
        name = draw_fields(writer, slug("cfields", task, f"a{angle:g}"),
                           f"prior-corrected · {_where(task, angle)} · order {data.main_order} · seed {seed_text}",
                           grid, task, angle, data.first_label, centred=True)
        s.figure(name, f"Prior-corrected decision fields (d − median d, d = lp₀ − lp₁), {_where(task, angle)}, "
                 f"order {data.main_order}, seed {seed_text}: red where the model ranks a point above its median "
                 f"towards {data.first_label.strip()}, blue below; each panel's colours are clipped at "
                 f"±P{CLIP_PERCENTILE:g} of its |d − median d| (value in the panel title). With a label "
                 "preference the raw field is one colour while this one shows the ranking.")
    return s


def _curves_section(data: RunData, summary: pd.DataFrame, writer: FigureWriter) -> Section:
    s = Section("Metrics against K", "Mean over seeds with its 95% interval as a band (method and n in each "
                "caption), one line per method (final SFT checkpoints). Calibrated accuracy thresholds lp₀ − lp₁ "
                "at its median over the grid (SPEC §5), which removes a label prior without using the truth; "
                "train accuracy is over the exemplars; dotted lines mark chance (for smoothness / perfect: the "
                "perfect classifier).")
    final = summary[is_final(summary["checkpoint"]) & (summary["order"] == data.main_order)]
    colors = {m: method_color(m) for m in data.methods}
    for task, angle in data.panels:
        sel = _panel(final, task, angle)
        if not available_metrics(sel, CURVE_METRICS):
            s.note(f"{_where(task, angle)}: no finite metric values to plot.")
            continue
        name = draw_lines(writer, slug("curves", task, f"a{angle:g}"),
                          f"{_where(task, angle)} · order {data.main_order}", sel, x="shots", series="method",
                          metrics=CURVE_METRICS, colors=colors, logx=True, xticks=sorted(sel["shots"].unique()),
                          xlabel=K_AXIS)
        s.figure(name, f"Metrics against K, {_where(task, angle)}; {interval_note(sel, metrics=CURVE_METRICS)}.")
    return s


def _theta_section(data: RunData, summary: pd.DataFrame, writer: FigureWriter) -> Section:
    s = Section("Accuracy against angle", "Accuracy and hold-out accuracy (raw, and calibrated hold-out) against "
                "the boundary angle θ, one row of panels per K, a line per method (final SFT checkpoints), mean "
                "over seeds with its 95% interval as a band. The study finds ICL better at 0°, 45° and 90° than "
                "between them.")
    final = summary[is_final(summary["checkpoint"]) & (summary["order"] == data.main_order)]
    colors = {m: method_color(m) for m in data.methods}
    drawn = False
    for task in sorted(final["task"].unique()):
        sel = final[final["task"] == task]
        angles = sorted(sel["angle"].unique())
        if len(angles) < 2 or not available_metrics(sel, THETA_METRICS):
            continue
        shots = sorted(sel["shots"].unique())
        name = draw_lines(writer, slug("theta", task), f"{task} · order {data.main_order}", sel, x="angle",
                          series="method", rows="shots", row_values=shots, row_labels={k: f"K={k}" for k in shots},
                          metrics=THETA_METRICS, colors=colors, xticks=angles, xlabel="true angle θ (°)")
        s.figure(name, f"Accuracy against θ, {task}, K {', '.join(str(k) for k in shots)}; "
                 f"{interval_note(sel, metrics=THETA_METRICS)}.")
        drawn = True
    if not drawn:
        s.note("Omitted: no task was run at two or more angles (a sweep over angles draws accuracy against θ).")
    return s


def _angles_section(data: RunData, summary: pd.DataFrame, writer: FigureWriter) -> Section:
    s = Section("Inferred against true angle", "The boundary angle recovered by a logistic fit to each method's "
                "predictions (raw, then calibrated), drawn as θ + the mean angle error (averaged on the circle of "
                "doubled angles, as angles are axial), with the mean absolute error beside it; bars are 95% "
                "intervals over seeds (method and n in each caption). The dashed diagonal is a perfect learner. A "
                "pull towards 45° (comparison bias) bends ICL's lines towards the diagonal n1 = n2 direction.")
    final = summary[is_final(summary["checkpoint"]) & (summary["order"] == data.main_order)
                    & summary["metric"].isin([row[0] for row in ANGLE_ROWS])]
    for task in sorted({task for task, _ in data.panels}):
        if not has_boundary_angle(task):
            s.note(f"{task}: no angle figure: its classes are split by two perpendicular lines (θ and θ + 90°), "
                   "so there is no single boundary angle to infer.")
            continue
        sel = final[final["task"] == task]
        methods = [m for m in data.methods if np.isfinite(sel.loc[sel["method"] == m, "mean"]).any()]
        if not methods:
            s.note(f"{task}: every prediction was a single class, so no angle could be inferred.")
            continue
        angles = sorted(sel["angle"].unique())
        what = " and mean |angle error|" if np.isfinite(sel.loc[sel["metric"].str.contains("abs_"), "mean"]).any() \
            else ""
        name = draw_angles(writer, slug("angles", task), f"{task} · order {data.main_order}", sel, methods)
        s.figure(name, f"Inferred against true angle{what}, {task}, angles {', '.join(f'{a:g}' for a in angles)}°; "
                 f"{interval_note(sel, 'bars')}.")
        if len(angles) == 1:
            s.note(f"{task}: the run has one angle; a sweep over angles shows the pull towards the diagonal.")
    return s


def _orders_section(data: RunData, summary: pd.DataFrame, writer: FigureWriter) -> Section:
    s = Section("Order probes", "Metrics against K for each periodic label pattern of the exemplar stream "
                "(1 = first label, 2 = second) beside random order, mean over seeds with its 95% interval as a "
                "band. A short period can make ICL switch from classifying to continuing the pattern: pattern "
                "following is the share of raw predictions equal to the label the pattern assigns to the next "
                "position (0.5 dotted: no pattern), and the share of first-label predictions is read against the "
                "random-order line (both on raw predictions: the prior correction would hide them).")
    if len(data.orders) < 2:
        s.note(f"Omitted: the run has one order pattern ({data.main_order}); run with --order-pattern or a sweep "
               "with several orders to probe order.")
        return s
    colors = {o: ORDER_COLORS[i % len(ORDER_COLORS)] for i, o in enumerate(data.orders)}
    final = summary[is_final(summary["checkpoint"])]
    conds = data.conditions[is_final(data.conditions["checkpoint"])]
    for task, angle in data.panels:
        sel = _panel(final, task, angle)
        multi = [m for m in data.methods if sel.loc[sel["method"] == m, "order"].nunique() > 1]
        if not multi or not available_metrics(sel[sel["method"].isin(multi)], ORDER_METRICS):
            s.note(f"{_where(task, angle)}: no method was run with several order patterns.")
            continue
        name = draw_lines(writer, slug("orders", task, f"a{angle:g}"), _where(task, angle),
                          sel[sel["method"].isin(multi)], x="shots", series="order", rows="method", row_values=multi,
                          metrics=ORDER_METRICS, colors=colors, logx=True, xticks=sorted(sel["shots"].unique()),
                          xlabel=K_AXIS)
        s.figure(name, f"Metrics against K per order pattern, {_where(task, angle)}; "
                 f"{interval_note(sel[sel['method'].isin(multi)], metrics=ORDER_METRICS)}.")
        method = "icl" if "icl" in multi else multi[0]
        mc = _panel(conds, task, angle)
        mc = mc[mc["method"] == method]
        grid = {f"order {o}": _field_cells(mc[mc["order"] == o])[0] for o in data.orders if (mc["order"] == o).any()}
        seed = _pick_seed(mc["seed"])
        name = draw_fields(writer, slug("order-fields", task, f"a{angle:g}"),
                           f"{method} · {_where(task, angle)} · seed {seed}", grid, task, angle, data.first_label)
        s.figure(name, f"{method} decision fields per order pattern, {_where(task, angle)}.")
    return s


def _dynamics_section(data: RunData, summary: pd.DataFrame, writer: FigureWriter) -> Section:
    s = Section("SFT training dynamics", "SFT metrics at the saved fractions of training, one line per K "
                "(a control of the study: SFT's behaviour as it learns, at a fixed set of exemplars); mean over seeds "
                "with its 95% interval as a band.")
    ckpt = summary[summary["checkpoint"].notna() & (summary["order"] == data.main_order)]
    methods = [m for m in data.methods if ckpt.loc[ckpt["method"] == m, "checkpoint"].nunique() > 1]
    if not methods:
        s.note("Omitted: no SFT method has more than one checkpoint (sft --checkpoints 0.25,0.5,1 saves them).")
        return s
    for task, angle in data.panels:
        sel = _panel(ckpt[ckpt["method"].isin(methods)], task, angle)
        if not available_metrics(sel, DYNAMICS_METRICS):
            s.note(f"{_where(task, angle)}: no SFT checkpoints.")
            continue
        shots = sorted(sel["shots"].unique())
        name = draw_lines(writer, slug("dynamics", task, f"a{angle:g}"), f"{_where(task, angle)} · order "
                          f"{data.main_order}", sel, x="checkpoint", series="shots", rows="method", row_values=methods,
                          metrics=DYNAMICS_METRICS, colors=k_colors(shots), labels={k: f"K={k}" for k in shots},
                          xticks=sorted(sel["checkpoint"].unique()), xlabel="fraction of training")
        s.figure(name, f"SFT metrics along training, {_where(task, angle)}; "
                 f"{interval_note(sel, metrics=DYNAMICS_METRICS)}.")
    return s


def _rsa_pick(conds: pd.DataFrame) -> tuple[int, dict[str, pd.Series]]:
    """The K with RSA for the most methods (the largest such K), and one condition per method there."""
    counts = conds.groupby("shots")["method"].nunique()
    k = int(counts[counts == counts.max()].index.max())
    picks = {}
    for method, mc in conds[conds["shots"] == k].groupby("method", sort=False):
        picks[method] = mc[mc["seed"] == _pick_seed(mc["seed"])].iloc[0]
    return k, picks


def _rsa_dynamics(s: Section, data: RunData, task: str, angle: float, writer: FigureWriter,
                  problems: list[str]) -> None:
    """Collapse against fraction of training for the SFT checkpoints (the study's dynamics control)."""
    conds = _panel(data.conditions[data.conditions["rsa"] & (data.conditions["order"] == data.main_order)],
                   task, angle)
    got = rsa_measures.draw_collapse_dynamics(writer, slug("rsa-dynamics", task, f"a{angle:g}"),
                                              f"{_where(task, angle)} · order {data.main_order}", conds, problems)
    if got:
        s.figure(got[0], f"Collapse index (residual stream, {rsa_measures.LATE_LAYERS}) against fraction of "
                 f"training, a line per SFT method, ICL at the same K dashed; mean over seeds, {got[1]}.")
    elif rsa_measures.dynamics_methods(conds):
        s.note(f"{_where(task, angle)}: collapse against training fraction omitted: its RSA arrays are unreadable.")
    else:
        s.note(f"{_where(task, angle)}: no SFT method has RSA at two or more checkpoints.")


def _rsa_section(data: RunData, writer: FigureWriter) -> Section:
    s = Section("Representations (RSA)", "Cosine similarity between the last query token's activations, per "
                "layer (residual stream and MLP output). Collapse index = mean within-class − mean between-class "
                "cosine over all grid points: SFT collapsing representations onto the label axis shows as a rising "
                "index in middle layers and as two blocks in the sub-matrices. The sub-matrices hold the "
                "condition's exemplars (at most 200) then hold-out test points, 400 in all, each sorted by label, "
                "as in the study; its finding that ICL's in-context exemplars are more similar to each other "
                "shows as a bright top-left block and in the within-exemplar line.")
    conds = data.conditions[data.conditions["rsa"] & is_final(data.conditions["checkpoint"])
                            & (data.conditions["order"] == data.main_order)]
    if conds.empty:
        s.note("Omitted: no condition has RSA arrays (rsa.npz with an ok rsa.json) in order "
               f"{data.main_order}.")
        return s
    problems: list[str] = []
    methods = [m for m in data.methods if (conds["method"] == m).any()]
    dynamics = rsa_measures.dynamics_methods(data.conditions[data.conditions["rsa"]
                                                             & (data.conditions["order"] == data.main_order)])
    missing = [_where(task, angle) for task, angle in data.panels if _panel(conds, task, angle).empty]
    if missing:
        s.note(f"No RSA arrays (order {data.main_order}) at: {'; '.join(missing)}.")
    for task, angle in data.panels:
        sel = _panel(conds, task, angle)
        if sel.empty:
            continue
        s.heading(_where(task, angle))
        got = rsa.draw_collapse(writer, slug("rsa-collapse", task, f"a{angle:g}"), _where(task, angle), sel,
                                methods, problems)
        if got:
            s.figure(got[0], f"Collapse index against layer, {_where(task, angle)} (mean over seeds; {got[1]}).")
        k, picks = _rsa_pick(sel)
        picks = {m: picks[m] for m in methods if m in picks}
        seeds = ", ".join(sorted({str(int(c["seed"])) for c in picks.values()}))
        where = f"{_where(task, angle)} · K={k} · seed {seeds}"
        name = rsa.draw_histograms(writer, slug("rsa-hist", task, f"a{angle:g}"), where, picks, problems)
        if name:
            s.figure(name, f"Cosine-similarity histograms over all pairs of grid points, {where}.")
        for stream, label in rsa.STREAMS:
            name = rsa.draw_submatrices(writer, slug("rsa-sub", stream, task, f"a{angle:g}"), f"{label} · {where}",
                                        picks, stream, problems)
            if name:
                s.figure(name, f"Cosine sub-matrices ({label}; {rsa.matrix_description(picks)}; solid lines "
                         f"separate exemplars from test points, dashed lines the classes), {where}.")
        at_k = f"{_where(task, angle)} · K={k}"
        got = rsa_measures.draw_block_means(writer, slug("rsa-blocks", task, f"a{angle:g}"), at_k,
                                            sel[sel["shots"] == k], methods, problems)
        if got:
            s.figure(got[0], f"Mean cosine within the exemplars, within the test points and between the two "
                     f"(off-diagonal pairs of the sub-matrix), {at_k}; mean over seeds, {got[1]}.")
        if dynamics:
            _rsa_dynamics(s, data, task, angle, writer, problems)
    if not dynamics:
        s.note("No collapse against training fraction: no SFT method has RSA at two or more checkpoints "
               "(sft --checkpoints 0.25,0.5,1, then the rsa step).")
    for problem in dict.fromkeys(problems):
        s.note(f"Skipped unreadable RSA arrays: {problem}")
    return s
