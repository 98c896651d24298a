"""configs/demo-cpu.yaml before and after the work graph (issue 16), side by side in one script.

"Before" is a commit from before the graph (arms one after another: trainings on Ray, every scoring
and RSA in the driver); "after" is this tree (one work graph: scorer actors, trainings as tasks, RSA on
the scorers, arms overlapping). Each runs from its own `git worktree` in a subprocess, one after the
other, with the same model cache, into a fresh output directory; the wall times, their ratio and the
largest metric difference are printed and written as JSON.

    python benchmarks/scaleout_demo.py --before d1a840e --out docs/benchmarks/scaleout_demo.json

Metrics agree to float rounding, not bit for bit: the driver scored with torch's default threads, a
scorer actor with `resources.scorer_cpus` threads (reduction order differs). Run it with nothing else
on the machine: it is a wall-time comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, config: Path, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "iclsft.cli", "sweep", str(config), f"out={out}", "--quiet"], cwd=tree,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="d1a840e", help="a commit from before the work graph")
    ap.add_argument("--config", default="configs/demo-cpu.yaml")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()
    config = (ROOT / args.config).resolve()
    with tempfile.TemporaryDirectory(prefix="iclsft-scaleout-") as tmp:
        tmp = Path(tmp)
        before_tree = tmp / "before-tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            walls = {"before": run(before_tree, config, tmp / "before"), "after": run(ROOT, config, tmp / "after")}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, capture_output=True)
        model = next(p.name for p in (tmp / "after").iterdir() if (p / "metrics.parquet").is_file())
        before = pd.read_parquet(tmp / "before" / model / "metrics.parquet")
        after = pd.read_parquet(tmp / "after" / model / "metrics.parquet")
        keys = [c for c in ("task", "order", "angle", "method", "shots", "seed", "checkpoint") if c in before]
        merged = before.merge(after, on=keys, suffixes=("_b", "_a"))
        cols = [c for c in ("accuracy", "auc", "confidence", "cal_confidence") if f"{c}_b" in merged]
        diff = max(float(np.nanmax(np.abs(merged[f"{c}_b"] - merged[f"{c}_a"]))) for c in cols)
        graph = json.loads((tmp / "after" / "graph.json").read_text())
    result = {"config": args.config, "before": args.before, "cpus": os.cpu_count(),
              "wall_before_s": round(walls["before"], 1), "wall_after_s": round(walls["after"], 1),
              "speedup": round(walls["before"] / walls["after"], 3), "conditions": len(before),
              "conditions_matched": len(merged), "max_metric_difference": diff, "graph": graph}
    print(f"{args.config} on {os.cpu_count()} CPUs: before ({args.before}) {walls['before']:.0f} s, after "
          f"{walls['after']:.0f} s ({result['speedup']:.2f}x); {len(merged)}/{len(before)} conditions matched, "
          f"largest metric difference {diff:.2g}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
