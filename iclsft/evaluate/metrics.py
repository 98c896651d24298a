"""Metrics for the 2D lattice classification task (SPEC §5).

A scored table has one row per lattice point (n1, n2) with the ground-truth
class (0, 1, or -1 for points exactly on the boundary), the model's
full-vocabulary log-probabilities of the two labels (lp_0, lp_1) and whether
the point was an in-context/training exemplar. Everything here is pure numpy;
only the logistic fit behind the inferred angle is iterative.

Raw predictions (class 0 iff d = lp_0 - lp_1 >= 0) carry the model's label
preference; the calibrated ones (``cal_*``, threshold at the median of d) remove
a constant preference without looking at the truth. Order-probe measures
(``label_share``, ``pattern_following``) are taken on raw predictions on purpose:
the median threshold forces a 50/50 split, which would hide pattern matching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

# the angle fit lives in its own module; its names stay importable from here
from iclsft.evaluate.angles import (  # noqa: F401
    CENTRE,
    LOGREG_C,
    angle_error,
    fit_angle,
    fit_logistic,
    log_sigmoid,
)
from iclsft.tasks.linear2d import RANDOM_ORDER, check_order, has_boundary_angle

REQUIRED_COLUMNS: tuple[str, ...] = ("n1", "n2", "truth", "lp_0", "lp_1", "is_exemplar")

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "holdout_accuracy",
    "confidence",
    "label_mass",
    "smoothness",
    "inferred_angle",
    "angle_error",
    "ece",
    "log_loss",
    "auc",
    "cal_accuracy",
    "cal_holdout_accuracy",
    "cal_smoothness",
    "cal_inferred_angle",
    "cal_angle_error",
    "n_points",
    "n_boundary",
    "n_holdout",
    "label_share",
    "pattern_following",
    "train_accuracy",
    "abs_angle_error",
    "cal_abs_angle_error",
    "smoothness_rel",
    "cal_smoothness_rel",
    "cal_confidence",
)

ECE_BINS: int = 10

FloatArray = npt.NDArray[np.float64]


def sigmoid(x: npt.ArrayLike) -> FloatArray:
    """Return the logistic function of ``x``, stable for large |x|."""
    return np.exp(log_sigmoid(np.asarray(x, dtype=np.float64)))


def predict(d: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Return raw predictions: class 0 iff d = lp_0 - lp_1 >= 0 (ties go to the first label)."""
    return np.where(np.asarray(d, dtype=np.float64) >= 0.0, 0, 1).astype(np.int64)


def calibrated_predict(d: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Return label-prior-corrected predictions: class 0 iff d >= median(d) over all points."""
    d = np.asarray(d, dtype=np.float64)
    # Thresholding at the median removes a constant bias towards one label
    # without looking at the truth: it assumes the classes are roughly balanced,
    # which holds for a boundary through the lattice centre.
    return np.where(d >= np.median(d), 0, 1).astype(np.int64)


def lattice_index(
    n1: npt.ArrayLike, n2: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Map points onto their lattice and check it is complete.

    Returns ``(n1_values, n2_values, i1, i2)`` where the value arrays are the
    sorted unique coordinates and ``(i1[k], i2[k])`` is row k's grid cell.
    Raises ValueError unless every (n1, n2) combination occurs exactly once.
    """
    n1 = np.asarray(n1)
    n2 = np.asarray(n2)
    n1_values, i1 = np.unique(n1, return_inverse=True)
    n2_values, i2 = np.unique(n2, return_inverse=True)
    i1 = i1.reshape(-1)
    i2 = i2.reshape(-1)
    shape = (len(n1_values), len(n2_values))
    counts = np.bincount(np.ravel_multi_index((i1, i2), shape), minlength=shape[0] * shape[1])
    n_missing = int(np.count_nonzero(counts == 0))
    n_duplicated = int(np.sum(np.maximum(counts - 1, 0)))
    if n_missing or n_duplicated:
        raise ValueError(
            f"scores do not form a complete {shape[0]}x{shape[1]} lattice: "
            f"{n_missing} points missing, {n_duplicated} duplicated"
        )
    return n1_values, n2_values, i1, i2


def _to_grid(values: np.ndarray, i1: np.ndarray, i2: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Scatter per-row values into a (len(n1_values), len(n2_values)) grid."""
    grid = np.empty(shape, dtype=values.dtype)
    grid[i1, i2] = values
    return grid


def smoothness(pred_grid: npt.ArrayLike) -> float:
    """Return 1 - fraction of grid points whose label differs from >= 2 of their 4-neighbours.

    ``pred_grid[i, j]`` is the predicted label at the (i, j) lattice cell;
    border cells have only 2 or 3 neighbours and use the same >= 2 rule.
    """
    grid = np.asarray(pred_grid)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"pred_grid must be a non-empty 2D array, got shape {grid.shape}")
    n_diff = np.zeros(grid.shape, dtype=np.int64)
    # Each unequal adjacent pair counts once for both of its endpoints.
    diff_rows = grid[1:, :] != grid[:-1, :]
    n_diff[1:, :] += diff_rows
    n_diff[:-1, :] += diff_rows
    diff_cols = grid[:, 1:] != grid[:, :-1]
    n_diff[:, 1:] += diff_cols
    n_diff[:, :-1] += diff_cols
    return float(1.0 - np.mean(n_diff >= 2))


def perfect_smoothness(truth_grid: npt.ArrayLike) -> float:
    """Return the smoothness of the perfect classifier: the truth labels, boundary points (-1) given
    the first label (class 0), as a raw prediction with d = 0 would be.

    A straight boundary through a lattice is a staircase wherever it is not axis-parallel, so even
    this classifier is rough along it: 1.0 at 0 and 90 degrees, 0.988 at 30, 0.980 at 45 on the
    full 100x100 grid (either class for the 45-degree diagonal gives the same value).
    """
    truth = np.asarray(truth_grid)
    return smoothness(np.where(truth == -1, 0, truth))


def label_share(pred: npt.ArrayLike) -> float:
    """Return the share of raw predictions that are the first label (class 0), over all queries."""
    pred = np.asarray(pred).reshape(-1)
    return _mean_or_nan(pred == 0)


def pattern_label(order: str, shots: int) -> int | None:
    """Return the class (0 = first label) that an order pattern assigns to the query after K shots.

    The prompt at K holds stream positions 0..2K-1 and position i carries label
    ``order[i % len(order)]`` ('1' = class 0), so the query sits at position 2K.
    None for random order (no pattern to follow).
    """
    check_order(order)
    if order == RANDOM_ORDER:
        return None
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be a positive integer for order pattern {order!r}, got {shots!r}")
    return 0 if order[(2 * int(shots)) % len(order)] == "1" else 1


def pattern_following(pred: npt.ArrayLike, order: str, shots: int | None) -> float:
    """Return the share of raw predictions equal to the label the order pattern gives the next
    stream position (see ``pattern_label``), over all queries; NaN for random order."""
    if order == RANDOM_ORDER:
        return math.nan
    label = pattern_label(order, shots)  # type: ignore[arg-type]  # validated there
    return _mean_or_nan(np.asarray(pred).reshape(-1) == label)


def roc_auc(score: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """Return ROC AUC of ``score`` for the ``positive`` class via Mann-Whitney U.

    Ties get average ranks, so a tied positive/negative pair counts 1/2.
    NaN if either class is absent.
    """
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive).astype(bool).reshape(-1)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    # 1-based average rank of each distinct value: last position of its run minus half its extent.
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = float(np.sum(avg_rank[inverse.reshape(-1)][positive]))
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def expected_calibration_error(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = ECE_BINS
) -> float:
    """Return ECE over ``n_bins`` equal-width confidence bins on [0, 1].

    Bin b is [b/n_bins, (b+1)/n_bins); a confidence of exactly 1 goes into the
    last bin. ECE = sum_b (n_b / N) * |acc_b - conf_b|; NaN if there are no points.
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct_f = np.asarray(correct, dtype=np.float64).reshape(-1)
    if len(conf) == 0:
        return math.nan
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    n_b = np.bincount(bins, minlength=n_bins)
    # Sum of |sum(acc) - sum(conf)| per bin / N equals sum_b (n_b/N)|acc_b - conf_b|.
    gap = np.bincount(bins, weights=correct_f, minlength=n_bins) - np.bincount(
        bins, weights=conf, minlength=n_bins
    )
    return float(np.sum(np.abs(gap[n_b > 0])) / len(conf))


def _mean_or_nan(values: np.ndarray) -> float:
    """Mean of ``values`` as a float, NaN for an empty array (without numpy's warning)."""
    return float(np.mean(values)) if len(values) else math.nan


def _check_columns(scores: pd.DataFrame, columns: Sequence[str]) -> None:
    """Raise ValueError naming any missing columns."""
    missing = [c for c in columns if c not in scores.columns]
    if missing:
        raise ValueError(f"scores table is missing columns: {missing}")


def _score_margin(scores: pd.DataFrame) -> FloatArray:
    """Return d = lp_0 - lp_1, rejecting NaN or +inf log-probs."""
    lp_0 = scores["lp_0"].to_numpy(dtype=np.float64)
    lp_1 = scores["lp_1"].to_numpy(dtype=np.float64)
    for name, lp in (("lp_0", lp_0), ("lp_1", lp_1)):
        n_bad = int(np.count_nonzero(np.isnan(lp) | (lp == np.inf)))
        if n_bad:
            raise ValueError(f"{name} has {n_bad} NaN or +inf log-probabilities")
    d = lp_0 - lp_1
    if np.isnan(d).any():
        # Only -inf - -inf gets here: the model gave both labels zero probability.
        raise ValueError("lp_0 and lp_1 are both -inf for some points; d = lp_0 - lp_1 is undefined")
    return d


def decision_field(scores: pd.DataFrame) -> FloatArray:
    """Return p(first label) = sigmoid(lp_0 - lp_1) on the lattice.

    Shape is (len(unique n1), len(unique n2)); ``field[i, j]`` is the point
    (n1_values[i], n2_values[j]) with values sorted ascending.
    """
    _check_columns(scores, ("n1", "n2", "lp_0", "lp_1"))
    d = _score_margin(scores)
    n1_values, n2_values, i1, i2 = lattice_index(scores["n1"].to_numpy(), scores["n2"].to_numpy())
    return _to_grid(sigmoid(d), i1, i2, (len(n1_values), len(n2_values)))


def centred_field(scores: pd.DataFrame) -> FloatArray:
    """Return the prior-corrected decision field: d - median(d) on the lattice (log-odds of the first
    label centred at the condition's median), laid out exactly like ``decision_field``.

    Zero is the calibrated decision threshold, so a model with a constant label preference shows
    its ranking of the points here even where its raw field is one colour.
    """
    _check_columns(scores, ("n1", "n2", "lp_0", "lp_1"))
    d = _score_margin(scores)
    n1_values, n2_values, i1, i2 = lattice_index(scores["n1"].to_numpy(), scores["n2"].to_numpy())
    return _to_grid(_centred(d), i1, i2, (len(n1_values), len(n2_values)))


def _prediction_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    labelled: np.ndarray,
    holdout: np.ndarray,
    grid_index: tuple[np.ndarray, np.ndarray, tuple[int, int]],
    n1: np.ndarray,
    n2: np.ndarray,
    angle: float | None,
) -> dict[str, float]:
    """Return the metrics computed alike for raw and calibrated predictions, keyed by raw name.

    ``angle`` None: the task has no single boundary angle, so the angle metrics are NaN.
    """
    correct = pred == truth
    i1, i2, shape = grid_index
    inferred = math.nan if angle is None else fit_angle(n1, n2, pred == 0)
    err = math.nan if angle is None else angle_error(inferred, angle)
    smooth = smoothness(_to_grid(pred, i1, i2, shape))
    perfect = perfect_smoothness(_to_grid(truth, i1, i2, shape))
    return {
        "accuracy": _mean_or_nan(correct[labelled]),
        "holdout_accuracy": _mean_or_nan(correct[holdout]),
        "smoothness": smooth,
        # A lattice too small or a truth too rough for any smooth classifier: no reference to divide by.
        "smoothness_rel": smooth / perfect if perfect > 0 else math.nan,
        "inferred_angle": inferred,
        "angle_error": err,
        "abs_angle_error": abs(err),
    }


def _centred(d: FloatArray) -> FloatArray:
    """Return d - median(d), with 0 where d equals the median (so an infinite median gives 0, not NaN)."""
    med = np.median(d)
    with np.errstate(invalid="ignore"):  # inf - inf is replaced by 0 right here
        return np.where(d == med, 0.0, d - med)


def _check_task_args(task: str, order: str, shots: int | None) -> None:
    """Raise ValueError naming a bad task name, order pattern or shot count."""
    has_boundary_angle(task)
    check_order(order)
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1):
        raise ValueError(f"shots must be a positive integer or None, got {shots!r}")
    if order != RANDOM_ORDER and shots is None:
        raise ValueError(f"order pattern {order!r} needs the shot count (shots) to place the query in the stream")


def compute_metrics(
    scores: pd.DataFrame,
    angle: float,
    *,
    task: str = "linear2d",
    order: str = RANDOM_ORDER,
    shots: int | None = None,
) -> dict[str, float]:
    """Compute all SPEC §5 metrics for one scored lattice and true boundary angle (degrees).

    ``task`` decides whether the angle metrics exist (NaN for ``xor``); ``order`` and ``shots``
    (the condition's K) place the query in the exemplar stream for ``pattern_following``.
    Returns a dict with keys ``METRIC_NAMES`` in order; counts are ints.
    Raises ValueError on missing columns, truth outside {-1, 0, 1}, an angle
    outside [0, 180), NaN log-probs, an incomplete/duplicated lattice, an unknown
    task, a bad order pattern, or an order pattern without a positive shot count.
    """
    _check_columns(scores, REQUIRED_COLUMNS)
    if len(scores) == 0:
        raise ValueError("scores table is empty")
    angle = float(angle)
    if not 0.0 <= angle < 180.0:
        raise ValueError(f"angle must be in [0, 180) degrees, got {angle}")
    _check_task_args(task, order, shots)
    truth = scores["truth"].to_numpy()
    bad = np.setdiff1d(pd.unique(truth), [-1, 0, 1])
    if len(bad):
        raise ValueError(f"truth must be -1, 0 or 1, got {bad.tolist()[0]!r}")
    truth = truth.astype(np.int64)
    d = _score_margin(scores)
    n1 = scores["n1"].to_numpy()
    n2 = scores["n2"].to_numpy()
    n1_values, n2_values, i1, i2 = lattice_index(n1, n2)
    grid_index = (i1, i2, (len(n1_values), len(n2_values)))

    labelled = truth != -1
    exemplar = scores["is_exemplar"].to_numpy(dtype=bool)
    holdout = labelled & ~exemplar
    pred = predict(d)
    # Confidence of the predicted label: max(p0, 1 - p0) = sigmoid(|d|). It rewards a label
    # preference: a model that puts p = 0.99 on one label everywhere scores 0.99 whatever the input.
    conf = sigmoid(np.abs(d))
    lp_0 = scores["lp_0"].to_numpy(dtype=np.float64)
    lp_1 = scores["lp_1"].to_numpy(dtype=np.float64)
    # -log p(truth): truth 0 -> -log sigmoid(d); truth 1 -> -log sigmoid(-d).
    signed = np.where(truth == 0, d, -d)

    boundary_angle = angle if has_boundary_angle(task) else None
    raw = _prediction_metrics(pred, truth, labelled, holdout, grid_index, n1, n2, boundary_angle)
    cal = _prediction_metrics(calibrated_predict(d), truth, labelled, holdout, grid_index, n1, n2, boundary_angle)
    metrics: dict[str, float] = {
        "accuracy": raw["accuracy"],
        "holdout_accuracy": raw["holdout_accuracy"],
        "confidence": float(np.mean(conf)),
        "label_mass": float(np.mean(np.exp(lp_0) + np.exp(lp_1))),
        "smoothness": raw["smoothness"],
        "inferred_angle": raw["inferred_angle"],
        "angle_error": raw["angle_error"],
        "ece": expected_calibration_error(conf[labelled], (pred == truth)[labelled]),
        "log_loss": _mean_or_nan(-log_sigmoid(signed[labelled])),
        "auc": roc_auc(d[labelled], truth[labelled] == 0),
        "cal_accuracy": cal["accuracy"],
        "cal_holdout_accuracy": cal["holdout_accuracy"],
        "cal_smoothness": cal["smoothness"],
        "cal_inferred_angle": cal["inferred_angle"],
        "cal_angle_error": cal["angle_error"],
        "n_points": len(scores),
        "n_boundary": int(np.count_nonzero(~labelled)),
        "n_holdout": int(np.count_nonzero(holdout)),
        "label_share": label_share(pred),
        "pattern_following": pattern_following(pred, order, shots),
        # Exemplars lie on the full grid; a sub-lattice run may query none of them (then NaN).
        "train_accuracy": _mean_or_nan((pred == truth)[labelled & exemplar]),
        "abs_angle_error": raw["abs_angle_error"],
        "cal_abs_angle_error": cal["abs_angle_error"],
        "smoothness_rel": raw["smoothness_rel"],
        "cal_smoothness_rel": cal["smoothness_rel"],
        # The same confidence after removing a constant label preference: distance from the median.
        "cal_confidence": float(np.mean(sigmoid(np.abs(_centred(d))))),
    }
    assert tuple(metrics) == METRIC_NAMES
    return metrics
