"""Circuit shift: how far a condition's component scores move from the base model's (numpy only).

Heads and MLP blocks are compared separately, each as one flattened vector of scores:

    cosine   1 - cos(s_base, s_cond)                       in [0, 2]; 0 same direction, 2 negated
    jaccard  1 - |T_base & T_cond| / |T_base | T_cond|     in [0, 1]; 0 same top set, 1 disjoint

T = the top ceil(top_frac x n) components by |s| (at least 1), ties broken by the lower flat index
(row-major: layer, then head). Both metrics ignore the overall scale of the scores, so L1
normalisation (for plots) does not change them. A zero score vector has no direction: its cosine
shift is NaN.
"""

from __future__ import annotations

import math

import numpy as np

from iclsft.circuits.scores import ComponentScores

TOP_FRAC = 0.05


def l1_normalised(scores: np.ndarray) -> np.ndarray:
    """Scores divided by their L1 norm (sum of |s| = 1); all-zero scores are returned as zeros."""
    scores = np.asarray(scores, dtype=np.float64)
    total = np.abs(scores).sum()
    return scores / total if total > 0 else np.zeros_like(scores)


def normalised(scores: ComponentScores) -> ComponentScores:
    """Heads and MLPs each scaled to unit L1 (for plotting conditions on one scale)."""
    return ComponentScores(heads=l1_normalised(scores.heads), mlps=l1_normalised(scores.mlps),
                           n_pairs=scores.n_pairs, ld_clean_mean=scores.ld_clean_mean,
                           ld_corrupt_mean=scores.ld_corrupt_mean)


def top_components(scores: np.ndarray, top_frac: float = TOP_FRAC) -> np.ndarray:
    """Flat indices of the top ceil(top_frac x n) components by |score| (at least 1), sorted by index.
    A stable sort on -|s| keeps the lower index first among ties."""
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
    flat = np.asarray(scores, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("no components to rank")
    k = max(1, math.ceil(top_frac * flat.size - 1e-9))  # tolerance: 0.05 * 20 is 1.0000000000000002
    return np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])


def shift_cosine(base: np.ndarray, cond: np.ndarray) -> float:
    """1 - cosine similarity of the flattened score vectors (NaN if either is all zeros)."""
    a, b = _flat_pair(base, cond)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0:
        return float("nan")
    return float(1.0 - np.dot(a, b) / norm)


def shift_jaccard(base: np.ndarray, cond: np.ndarray, top_frac: float = TOP_FRAC) -> float:
    """1 - Jaccard index of the two top-|s| component sets."""
    a, b = _flat_pair(base, cond)
    top_a, top_b = set(top_components(a, top_frac).tolist()), set(top_components(b, top_frac).tolist())
    return 1.0 - len(top_a & top_b) / len(top_a | top_b)


def circuit_shift(base: ComponentScores, cond: ComponentScores, *, top_frac: float = TOP_FRAC) -> dict:
    """{"heads": {"cosine", "jaccard"}, "mlps": {"cosine", "jaccard"}} of `cond` relative to `base`."""
    return {kind: {"cosine": shift_cosine(getattr(base, kind), getattr(cond, kind)),
                   "jaccard": shift_jaccard(getattr(base, kind), getattr(cond, kind), top_frac)}
            for kind in ("heads", "mlps")}


def _flat_pair(base: np.ndarray, cond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(base, dtype=np.float64), np.asarray(cond, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"scores of different shapes cannot be compared: {a.shape} and {b.shape} "
                         "(base and condition must come from the same architecture)")
    return a.ravel(), b.ravel()
