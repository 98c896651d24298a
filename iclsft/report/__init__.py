"""The HTML report of a run directory: figures of the 2D study (SPEC §5, §7) and statistics across seeds.

    from iclsft.report import build_report
    build_report("runs/demo")          # writes runs/demo/report/index.html and its PNGs
"""

from iclsft.report.build import build_report

__all__ = ["build_report"]
