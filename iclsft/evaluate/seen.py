"""Seen-feature bias (seed 002): does a model extrapolate exemplar labels along the rows and columns
of the lattice whose n1 or n2 value it has seen in the exemplars?

Operational measure, from raw predictions and the condition's exemplars alone:

    For every hold-out point q and exemplar e whose label is wrong for q (truth(q) != label(e)),
    count an error towards e when the prediction for q is label(e). Compare the rate of such errors
    for exemplars that share a row or column with q (e.n1 == q.n1 or e.n2 == q.n2: a "seen"
    feature value) with the rate for exemplars that share neither, within strata of the same
    exemplar label and the same distance from q (Euclidean, bins of DISTANCE_BIN lattice units),
    weighted by the aligned pairs of each stratum:

    seen_feature_effect = Σ_s w_s (rate_aligned,s − rate_other,s),   s = (label(e), distance bin)

A perfect classifier makes no error, and a constant predictor errs towards every exemplar of one
label and none of the other, aligned or not: both give exactly 0, whatever the exemplars' label mix
(the label strata make the constant case exact). A random predictor gives ≈ 0; a model that copies
an exemplar's label along its row or column errs towards aligned exemplars only (effect > 0).
Conditioning on pairs whose exemplar label is wrong for q removes the trivial agreement of nearby
points that share a label. A classifier that depends on q alone can still differ a little between a
stratum's aligned and other queries (geometry): docs/claims.md gives the measured spread.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

DISTANCE_BIN = 5.0
CHUNK = 2048  # queries per block: a block's pair arrays stay a few MB at K = 200


def seen_feature_effect(scores: pd.DataFrame, exemplars: pd.DataFrame) -> float:
    """The measure of the module docstring for one condition; NaN when no aligned mismatched pair
    exists (e.g. a sub-lattice that shares no row or column with the exemplars).

    `scores`: n1, n2, truth (−1 on the boundary), lp_0, lp_1, is_exemplar; `exemplars`: n1, n2, truth."""
    missing = [c for c in ("n1", "n2", "truth", "lp_0", "lp_1", "is_exemplar") if c not in scores]
    missing += [f"exemplars.{c}" for c in ("n1", "n2", "truth") if c not in exemplars]
    if missing:
        raise ValueError(f"seen_feature_effect needs columns {missing}")
    hold = (scores["truth"].to_numpy() != -1) & ~scores["is_exemplar"].to_numpy(dtype=bool)
    q1 = scores["n1"].to_numpy(dtype=np.float64)[hold]
    q2 = scores["n2"].to_numpy(dtype=np.float64)[hold]
    qt = scores["truth"].to_numpy(dtype=np.int64)[hold]
    d = scores["lp_0"].to_numpy(dtype=np.float64)[hold] - scores["lp_1"].to_numpy(dtype=np.float64)[hold]
    qp = np.where(d >= 0, 0, 1)  # raw prediction, ties to the first label (as in metrics.predict)
    e1 = exemplars["n1"].to_numpy(dtype=np.float64)
    e2 = exemplars["n2"].to_numpy(dtype=np.float64)
    et = exemplars["truth"].to_numpy(dtype=np.int64)
    n_bins = int(math.ceil(100 * math.sqrt(2) / DISTANCE_BIN)) + 1
    # counts[kind, stratum] of mismatched pairs and of errors towards the exemplar; kind 0 aligned,
    # 1 other; stratum = label(e) * n_bins + distance bin
    n_strata = 2 * n_bins
    pairs = np.zeros((2, n_strata))
    errors = np.zeros((2, n_strata))
    for a in range(0, len(q1), CHUNK):
        s = slice(a, a + CHUNK)
        mismatch = qt[s, None] != et[None, :]
        aligned = (q1[s, None] == e1[None, :]) | (q2[s, None] == e2[None, :])
        towards = qp[s, None] == et[None, :]
        dist = np.hypot(q1[s, None] - e1[None, :], q2[s, None] - e2[None, :])
        b = np.minimum((dist / DISTANCE_BIN).astype(np.int64), n_bins - 1) + n_bins * et[None, :]
        for kind, sel in enumerate((mismatch & aligned, mismatch & ~aligned)):
            pairs[kind] += np.bincount(b[sel], minlength=n_strata)
            errors[kind] += np.bincount(b[sel], weights=towards[sel].astype(np.float64), minlength=n_strata)
    usable = (pairs[0] > 0) & (pairs[1] > 0)
    if not usable.any():
        return math.nan
    rate = errors[:, usable] / pairs[:, usable]
    w = pairs[0, usable] / pairs[0, usable].sum()
    return float(np.sum(w * (rate[0] - rate[1])))
