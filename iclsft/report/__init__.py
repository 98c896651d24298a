"""The HTML report of a run directory: figures of the 2D study (SPEC §5, §7) and statistics across seeds.

    from iclsft.report import build_report
    build_report("runs/demo")          # writes runs/demo/report/index.html and its PNGs
"""

from __future__ import annotations

from pathlib import Path

from iclsft.report.build import build_linear2d_report, is_implicit_run
from iclsft.report.implicit import build_implicit_report
from iclsft.report.models import build_models_report, is_sweep_dir

__all__ = ["build_report"]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `index.html`, its PNGs and the statistics as CSV into `out_dir` (default RUN/report);
    return the path of `index.html`. Needs no model: everything comes from the stored results.
    A 2D run gets the study's page (iclsft.report.build), an implicit-pattern run its own page
    (iclsft.report.implicit); a sweep's out folder holding several model run directories gets the
    cross-model page and each model's report (iclsft.report.models)."""
    if is_sweep_dir(run_dir):
        return build_models_report(run_dir, out_dir)
    if is_implicit_run(run_dir):
        return build_implicit_report(run_dir, out_dir)
    return build_linear2d_report(run_dir, out_dir)
