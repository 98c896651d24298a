"""The HTML report of a run directory: figures of the 2D study (SPEC §5, §7) and statistics across seeds.

    from iclsft.report import build_report
    build_report("runs/demo")          # writes runs/demo/report/index.html and its PNGs
"""

from __future__ import annotations

from pathlib import Path

from iclsft.evaluate.runs import study_of
from iclsft.report.models import build_models_report, is_sweep_dir
from iclsft.store import RunDir

__all__ = ["build_report"]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `index.html`, its PNGs and the statistics as CSV into `out_dir` (default RUN/report);
    return the path of `index.html`. Needs no model: everything comes from the stored results.
    A run gets its study's page (`Study.report`: the 2D study's iclsft.report.build, the implicit suite's
    iclsft.report.implicit); a sweep's out folder holding several model run directories gets the
    cross-model page and each model's report (iclsft.report.models)."""
    if is_sweep_dir(run_dir):
        return build_models_report(run_dir, out_dir)
    study = study_of(RunDir(run_dir))
    if study.report is None:
        raise ValueError(f"the {study.name} study has no report page; its results are in {run_dir}/metrics.parquet")
    return study.report(Path(run_dir), None if out_dir is None else Path(out_dir))
