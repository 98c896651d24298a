"""Whether two runs of the same config computed the same numbers, bit for bit: the metrics tables, every
condition's scores (matched by condition id), every RSA array, and the circuit-shift table where there
is one. Used for issue 15's refactor (docs/framework.md): run a config at two commits (each from its own
`git worktree`), then

    python benchmarks/result_identity.py BEFORE/smollm2-135m AFTER/smollm2-135m [BEFORE2 AFTER2 ...]

Exits non-zero at the first difference, naming it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def finished(run: Path) -> dict[str, Path]:
    """Condition id -> directory, for every condition whose record says ok."""
    out = {}
    for record in run.glob("conditions/*/record.json"):
        r = json.loads(record.read_text())
        if r.get("status") == "ok":
            out[r["condition"]] = record.parent
    return out


def compare(before: Path, after: Path) -> str:
    pd.testing.assert_frame_equal(pd.read_parquet(before / "metrics.parquet"),
                                  pd.read_parquet(after / "metrics.parquet"), check_exact=True)
    b, a = finished(before), finished(after)
    assert set(b) == set(a), f"condition ids differ: {sorted(set(b) ^ set(a))[:3]}"
    arrays = 0
    for cid, cdir in b.items():
        pd.testing.assert_frame_equal(pd.read_parquet(cdir / "scores.parquet"),
                                      pd.read_parquet(a[cid] / "scores.parquet"), check_exact=True)
        if (cdir / "rsa.npz").is_file():
            x, y = np.load(cdir / "rsa.npz"), np.load(a[cid] / "rsa.npz")
            assert set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files), cid
            arrays += 1
    shift = ""
    if (before / "circuits" / "shift.json").is_file():
        pd.testing.assert_frame_equal(pd.DataFrame(json.loads((before / "circuits" / "shift.json").read_text())),
                                      pd.DataFrame(json.loads((after / "circuits" / "shift.json").read_text())),
                                      check_exact=True)
        shift = ", circuit-shift table identical"
    rows = len(pd.read_parquet(after / "metrics.parquet"))
    return (f"{after}: metrics table ({rows} rows) identical to {before}; {len(b)} conditions' scores and "
            f"{arrays} RSA arrays identical{shift}")


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]]
    if not paths or len(paths) % 2:
        sys.exit("usage: result_identity.py BEFORE AFTER [BEFORE AFTER ...]")
    for before, after in zip(paths[0::2], paths[1::2]):
        print(compare(before, after))
