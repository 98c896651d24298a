"""Tests for iclsft.evaluate.metrics (SPEC §5), with hand-computed expected values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from iclsft.evaluate.metrics import (
    METRIC_NAMES,
    angle_error,
    calibrated_predict,
    compute_metrics,
    decision_field,
    expected_calibration_error,
    fit_angle,
    fit_logistic,
    lattice_index,
    predict,
    roc_auc,
    smoothness,
)


def lattice(step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All (n1, n2) points of the 0..99 lattice with the given step, n1-major."""
    values = np.arange(0, 100, step)
    g1, g2 = np.meshgrid(values, values, indexing="ij")
    return g1.ravel(), g2.ravel()


def truth_for(n1: np.ndarray, n2: np.ndarray, angle: float) -> np.ndarray:
    """Ground truth exactly as the task defines it: 0 above, 1 below, -1 on the boundary."""
    t = math.radians(angle)
    margin = -math.sin(t) * (n1 - 49.5) + math.cos(t) * (n2 - 49.5)
    return np.where(np.abs(margin) < 1e-9, -1, np.where(margin > 0, 0, 1))


def make_table(
    n1: np.ndarray,
    n2: np.ndarray,
    truth: np.ndarray,
    lp_0: np.ndarray,
    lp_1: np.ndarray,
    is_exemplar: np.ndarray | None = None,
) -> pd.DataFrame:
    if is_exemplar is None:
        is_exemplar = np.zeros(len(n1), dtype=bool)
    return pd.DataFrame(
        {
            "n1": np.asarray(n1, dtype=np.int64),
            "n2": np.asarray(n2, dtype=np.int64),
            "truth": np.asarray(truth, dtype=np.int64),
            "lp_0": np.asarray(lp_0, dtype=np.float64),
            "lp_1": np.asarray(lp_1, dtype=np.float64),
            "is_exemplar": np.asarray(is_exemplar, dtype=bool),
        }
    )


def table_from_d(n1: np.ndarray, n2: np.ndarray, truth: np.ndarray, d: np.ndarray) -> pd.DataFrame:
    """Table whose two-label softmax has margin d (label mass 1)."""
    d = np.asarray(d, dtype=np.float64)
    return make_table(n1, n2, truth, -np.logaddexp(0.0, -d), -np.logaddexp(0.0, d))


# ---------------------------------------------------------------- smoothness


def test_smoothness_checkerboard_is_zero() -> None:
    n1, n2 = lattice()
    grid = ((n1 + n2) % 2).reshape(100, 100)
    # Every point, corners included, differs from all (>= 2) of its neighbours.
    assert smoothness(grid) == 0.0


def test_smoothness_half_plane_is_one() -> None:
    n1, _ = lattice()
    grid = (n1 >= 50).astype(int).reshape(100, 100)
    # Points next to the cut differ from exactly one neighbour, so none are rough.
    assert smoothness(grid) == 1.0


def test_smoothness_3x3_flipped_centre_and_corner() -> None:
    grid = np.array(
        [
            [1, 0, 0],
            [0, 1, 0],
            [0, 0, 0],
        ]
    )
    # Differing-neighbour counts:
    #   (0,0) corner: (0,1), (1,0) both differ -> 2 rough
    #   (0,1) edge:   (0,0) and (1,1) differ   -> 2 rough
    #   (1,0) edge:   (0,0) and (1,1) differ   -> 2 rough
    #   (1,1) centre: all 4 differ             -> 4 rough
    #   (0,2), (2,0), (2,2): 0; (1,2), (2,1): 1 (only the centre)
    # 4 rough of 9 -> 1 - 4/9 = 5/9.
    assert smoothness(grid) == pytest.approx(5 / 9, abs=1e-15)


def test_smoothness_4x4_isolated_interior_and_corner() -> None:
    grid = np.zeros((4, 4), dtype=int)
    grid[1, 1] = 1  # interior: all 4 neighbours differ -> rough
    grid[3, 3] = 1  # corner: both of its 2 neighbours differ -> rough
    # Each neighbour of a flipped point differs from only that one point.
    # 2 rough of 16 -> 0.875.
    assert smoothness(grid) == 0.875


def test_smoothness_single_flip_on_border_edge() -> None:
    grid = np.zeros((4, 4), dtype=int)
    grid[0, 2] = 1  # edge point, 3 neighbours, all differ -> rough; neighbours differ from 1
    assert smoothness(grid) == 1 - 1 / 16


def test_smoothness_sub_lattice_through_compute_metrics() -> None:
    n1, n2 = lattice(step=10)  # values 0, 10, ..., 90: a 10x10 grid
    truth = truth_for(n1, n2, 90.0)  # class 0 iff n1 < 50
    # Half plane: every sub-lattice point agrees with >= 3 of its neighbours.
    m = compute_metrics(table_from_d(n1, n2, truth, np.where(truth == 0, 1.0, -1.0)), 90.0)
    assert m["smoothness"] == 1.0
    assert m["n_points"] == 100
    # Checkerboard over sub-lattice indices (n/10), not raw values: 0.0 only if
    # neighbours are adjacent sub-lattice points.
    checker = ((n1 // 10 + n2 // 10) % 2 == 0).astype(float) * 2 - 1
    m = compute_metrics(table_from_d(n1, n2, truth, checker), 90.0)
    assert m["smoothness"] == 0.0
    # One flipped interior point (n1=20, n2=40), two steps from the cut: 1 rough of 100.
    d = np.where(truth == 0, 1.0, -1.0)
    d[(n1 == 20) & (n2 == 40)] = -1.0
    table = table_from_d(n1, n2, truth, d).sample(frac=1.0, random_state=3)
    assert compute_metrics(table, 90.0)["smoothness"] == pytest.approx(0.99, abs=1e-15)
    # Flip (40, 40), next to the cut between n1 = 40 and 50, to class 1 instead:
    # (40, 40) differs from (30, 40), (40, 30), (40, 50) -> rough; (40, 30) and
    # (40, 50) now differ from it and from (50, 30) / (50, 50) -> rough;
    # (30, 40) differs once, (50, 40) not at all. 3 rough of 100.
    d = np.where(truth == 0, 1.0, -1.0)
    d[(n1 == 40) & (n2 == 40)] = -1.0
    assert compute_metrics(table_from_d(n1, n2, truth, d), 90.0)["smoothness"] == pytest.approx(
        0.97, abs=1e-15
    )


def test_smoothness_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2D"):
        smoothness(np.zeros(5))


# ------------------------------------------------------------ inferred angle


# Measured |error| of fit_angle on exact half-planes of the full 100x100 lattice
# (boundary points in class 0): 0, 45, 90, 135 -> 0 to ~1e-13 (symmetry: the
# label set is invariant under a lattice reflection that maps the true normal
# to itself, and the fit is unique); 30 and 60 -> 0.26976 degrees, 10 -> 0.139,
# 15 -> 0.188. The residual comes from the lattice staircase, not the solver
# (the gradient norm at the solution is ~1e-13).
EXACT_ANGLE_TOL = 1e-9
LATTICE_ANGLE_TOL_30 = 0.3


@pytest.mark.parametrize(
    ("angle", "tol"),
    [
        (0.0, EXACT_ANGLE_TOL),
        (30.0, LATTICE_ANGLE_TOL_30),
        (45.0, EXACT_ANGLE_TOL),
        (90.0, EXACT_ANGLE_TOL),
        (135.0, EXACT_ANGLE_TOL),
    ],
)
def test_fit_angle_exact_half_planes(angle: float, tol: float) -> None:
    n1, n2 = lattice()
    truth = truth_for(n1, n2, angle)
    estimate = fit_angle(n1, n2, truth != 1)  # boundary points -> class 0
    assert 0.0 <= estimate < 180.0
    assert abs(angle_error(estimate, angle)) <= tol


def test_fit_angle_30_degrees_measured_bias() -> None:
    n1, n2 = lattice()
    estimate = fit_angle(n1, n2, truth_for(n1, n2, 30.0) != 1)
    # Pinned measured value: the staircase pulls the estimate ~0.27 deg towards 0.
    assert estimate == pytest.approx(29.7302398527354, abs=1e-6)


def test_fit_angle_one_class_is_nan() -> None:
    n1, n2 = lattice()
    assert math.isnan(fit_angle(n1, n2, np.ones(len(n1), dtype=bool)))
    assert math.isnan(fit_angle(n1, n2, np.zeros(len(n1), dtype=bool)))


def test_fit_logistic_stationary_point() -> None:
    # Non-separable data: the solution is the zero of the penalised gradient.
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 2))
    y = (z @ np.array([1.0, -2.0]) + rng.normal(size=500) > 0.3).astype(float)
    b, w = fit_logistic(z, y, C=0.5)
    x = np.hstack([np.ones((500, 1)), z])
    p = 1 / (1 + np.exp(-(x @ np.r_[b, w])))
    grad = x.T @ (p - y) + np.r_[0.0, w / 0.5]
    assert np.linalg.norm(grad) < 1e-8
    assert w[0] > 0 > w[1]


@pytest.mark.parametrize(
    ("estimated", "true", "expected"),
    [
        (179.0, 1.0, -2.0),
        (1.0, 179.0, 2.0),
        (100.0, 10.0, 90.0),
        (10.0, 100.0, 90.0),
        (30.0, 29.0, 1.0),
        (0.0, 0.0, 0.0),
    ],
)
def test_angle_error_wrapping(estimated: float, true: float, expected: float) -> None:
    assert angle_error(estimated, true) == pytest.approx(expected, abs=1e-12)


def test_angle_error_nan_propagates() -> None:
    assert math.isnan(angle_error(math.nan, 10.0))


def test_compute_metrics_inferred_angle_matches_truth() -> None:
    n1, n2 = lattice()
    truth = truth_for(n1, n2, 135.0)
    m = compute_metrics(table_from_d(n1, n2, truth, np.where(truth == 1, -3.0, 3.0)), 135.0)
    assert m["inferred_angle"] == pytest.approx(135.0, abs=EXACT_ANGLE_TOL)
    assert m["angle_error"] == pytest.approx(0.0, abs=EXACT_ANGLE_TOL)


# ------------------------------------------------------------ ties at 45 deg


def test_boundary_points_at_45_degrees_are_excluded() -> None:
    n1, n2 = lattice()
    truth = truth_for(n1, n2, 45.0)  # class 0 iff n2 > n1; boundary n1 == n2
    assert np.count_nonzero(truth == -1) == 100
    # Correct with margin 2 everywhere off the boundary; on the boundary the
    # model says label 1 (not the tie-goes-to-label-0 side), which would count
    # as wrong against either class if boundary points were scored.
    d = np.where(truth == 0, 2.0, -2.0)
    exemplar = (n1 % 10 == 0) & (n2 % 10 == 5)  # 100 exemplars, none on the diagonal
    table = make_table(n1, n2, truth, -np.logaddexp(0, -d), -np.logaddexp(0, d), exemplar)
    m = compute_metrics(table, 45.0)
    assert m["n_points"] == 10_000
    assert m["n_boundary"] == 100
    assert m["n_holdout"] == 10_000 - 100 - 100
    assert m["accuracy"] == 1.0
    assert m["holdout_accuracy"] == 1.0
    # All 10,000 points have |d| = 2.
    assert m["confidence"] == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-14)
    assert m["log_loss"] == pytest.approx(math.log1p(math.exp(-2)), rel=1e-12)
    assert m["ece"] == pytest.approx(1 - 1 / (1 + math.exp(-2)), rel=1e-12)
    assert m["auc"] == 1.0
    # Staircase smoothness: diagonal points (i, i), 1 <= i <= 98, differ from
    # (i-1, i) and (i, i+1) -> 98 rough; points (i, i+1), 0 <= i <= 98, differ
    # from (i, i) and (i+1, i+1) -> 99 rough. 1 - 197/10000.
    assert m["smoothness"] == pytest.approx(1 - 197 / 10_000, abs=1e-15)
    assert m["inferred_angle"] == pytest.approx(45.0, abs=EXACT_ANGLE_TOL)


# ------------------------------------------------------ hand-computed table


def hand_table() -> pd.DataFrame:
    # 2x3 lattice; label probabilities chosen so everything is checkable by hand.
    rows = [
        # n1, n2, truth, P(label0), P(label1), exemplar
        (0, 0, 0, 0.60, 0.20, True),  # p0 = .75, pred 0 right, conf .75
        (0, 1, 0, 0.10, 0.30, False),  # p0 = .25, pred 1 wrong, conf .75
        (0, 2, 1, 0.30, 0.60, True),  # p0 = 1/3, pred 1 right, conf 2/3
        (1, 0, 1, 0.45, 0.45, False),  # d = 0 tie -> pred 0 wrong, conf .5
        (1, 1, -1, 0.05, 0.90, False),  # boundary: p0 = 1/19, conf 18/19
        (1, 2, 1, 0.02, 0.90, False),  # p0 = 1/46, pred 1 right, conf 45/46
    ]
    n1, n2, truth, q0, q1, ex = map(np.array, zip(*rows, strict=True))
    return make_table(n1, n2, truth, np.log(q0.astype(float)), np.log(q1.astype(float)), ex)


def test_hand_table_metrics() -> None:
    m = compute_metrics(hand_table(), 10.0)
    assert tuple(m) == METRIC_NAMES
    assert m["n_points"] == 6
    assert m["n_boundary"] == 1
    assert m["n_holdout"] == 3  # rows 2, 4, 6
    assert m["accuracy"] == pytest.approx(3 / 5, abs=1e-15)  # rows 1, 3, 6 of 5 labelled
    assert m["holdout_accuracy"] == pytest.approx(1 / 3, abs=1e-15)  # only row 6
    assert m["confidence"] == pytest.approx((0.75 + 0.75 + 2 / 3 + 0.5 + 18 / 19 + 45 / 46) / 6, rel=1e-12)
    assert m["label_mass"] == pytest.approx((0.8 + 0.4 + 0.9 + 0.9 + 0.95 + 0.92) / 6, rel=1e-12)
    expected_ll = -(math.log(0.75) + math.log(0.25) + math.log(2 / 3) + math.log(0.5) + math.log(45 / 46)) / 5
    assert m["log_loss"] == pytest.approx(expected_ll, rel=1e-12)
    # ECE bins (N = 5): [0.7, 0.8): rows 1, 2 -> acc .5, conf .75 -> 2/5 * .25;
    # [0.6, 0.7): row 3 -> 1/5 * (1 - 2/3); [0.5, 0.6): row 4 -> 1/5 * .5;
    # [0.9, 1]: row 6 -> 1/5 * (1 - 45/46).
    expected_ece = 2 / 5 * 0.25 + 1 / 5 * (1 / 3) + 1 / 5 * 0.5 + 1 / 5 * (1 / 46)
    assert m["ece"] == pytest.approx(expected_ece, rel=1e-12)
    # AUC: positives (truth 0) d = ln3, -ln3; negatives d = ln .5, 0, ln(1/45).
    # ln3 beats all 3; -ln3 beats only ln(1/45) -> 4 of 6 pairs.
    assert m["auc"] == pytest.approx(4 / 6, abs=1e-15)
    # Raw predictions: class 0 at rows 1 and 4 only -> a real angle fit.
    assert 0.0 <= m["inferred_angle"] < 180.0
    # Calibrated: d sorted = ln(1/45), ln(1/18), ln(1/3), ln(1/2), 0, ln3, so the
    # median is (ln(1/3) + ln(1/2)) / 2 and d >= median -> class 0 at rows
    # 1 (ln3), 3 (ln .5) and 4 (0).
    # Correct among labelled: row 1 yes, row 2 (pred 1, truth 0) no, row 3
    # (pred 0, truth 1) no, row 4 no, row 6 yes -> 2/5. Hold-out rows 2, 4, 6 -> 1/3.
    assert m["cal_accuracy"] == pytest.approx(2 / 5, abs=1e-15)
    assert m["cal_holdout_accuracy"] == pytest.approx(1 / 3, abs=1e-15)


def test_hand_table_row_order_irrelevant() -> None:
    table = hand_table()
    a = compute_metrics(table, 10.0)
    b = compute_metrics(table.iloc[::-1].reset_index(drop=True), 10.0)
    for key in METRIC_NAMES:
        assert a[key] == pytest.approx(b[key], rel=1e-9, nan_ok=True), key


def test_holdout_empty_is_nan() -> None:
    table = hand_table()
    table["is_exemplar"] = True
    m = compute_metrics(table, 10.0)
    assert math.isnan(m["holdout_accuracy"])
    assert math.isnan(m["cal_holdout_accuracy"])
    assert m["n_holdout"] == 0
    assert m["accuracy"] == pytest.approx(0.6, abs=1e-15)


def test_predict_ties_go_to_first_label() -> None:
    assert predict([0.0, -0.0, 1e-300, -1e-300, 5.0, -5.0]).tolist() == [0, 0, 0, 1, 0, 1]


def test_calibrated_predict_uses_median() -> None:
    # median of [-4, -3, -2, -1] is -2.5 -> top two are class 0
    assert calibrated_predict([-1.0, -4.0, -2.0, -3.0]).tolist() == [0, 1, 0, 1]
    # odd length: the median point itself is class 0
    assert calibrated_predict([-1.0, -3.0, -2.0]).tolist() == [0, 1, 0]


# ---------------------------------------------------------------------- auc


def test_roc_auc_ties_count_half() -> None:
    # pos 1.0 vs neg 1.0: tie -> 1/2; pos 1.0 vs neg 0.0 -> 1. Total 1.5 / 2.
    assert roc_auc([1.0, 1.0, 0.0], [True, False, False]) == 0.75
    # all scores tied -> 0.5
    assert roc_auc(np.zeros(6), [1, 0, 1, 0, 1, 0]) == 0.5


def test_roc_auc_separating_and_reversed() -> None:
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    positive = np.array([False, False, False, True, True])
    assert roc_auc(score, positive) == 1.0
    assert roc_auc(-score, positive) == 0.0
    # one inversion (0.4 > 0.35 with 0.35 positive): 5 of 6 pairs
    assert roc_auc(score, [False, False, True, True, True]) == pytest.approx(5 / 6, abs=1e-15)


def test_roc_auc_one_class_is_nan() -> None:
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))
    assert math.isnan(roc_auc([0.1, 0.2], [False, False]))


# ---------------------------------------------------------------------- ece


def test_ece_bin_edges() -> None:
    # 0.5 lands in [0.5, 0.6) and 1.0 in the last bin [0.9, 1.0].
    # Bin [0.5, 0.6): two points, acc 1/2, conf 0.5 -> 0; bin [0.9, 1]: conf
    # (0.95 + 1.0)/2 = 0.975, acc 1 -> 2/4 * 0.025.
    ece = expected_calibration_error([0.5, 0.5, 0.95, 1.0], [True, False, True, True])
    assert ece == pytest.approx(0.5 * 0.025, rel=1e-12)
    # A confidence exactly on an inner edge belongs to the bin above it: 0.5 and
    # 0.55 share [0.5, 0.6): acc 1/2, conf 0.525 -> 0.025 (not 0.475 if split).
    ece = expected_calibration_error([0.5, 0.55], [False, True])
    assert ece == pytest.approx(0.025, rel=1e-12)
    assert math.isnan(expected_calibration_error([], []))


# ---------------------------------------------------------- calibrated metrics


def test_calibrated_prediction_fixes_label_prior() -> None:
    n1, n2 = lattice()
    truth = truth_for(n1, n2, 90.0)  # class 0 iff n1 < 50: balanced, no boundary
    # d always negative (model always says label 1) but higher on class 0.
    lp_0 = np.where(truth == 0, math.log(0.2), math.log(0.05))
    lp_1 = np.full(len(n1), math.log(0.6))
    m = compute_metrics(make_table(n1, n2, truth, lp_0, lp_1), 90.0)
    assert m["accuracy"] == 0.5
    assert m["holdout_accuracy"] == 0.5
    assert m["auc"] == 1.0
    assert m["cal_accuracy"] == 1.0
    assert m["cal_holdout_accuracy"] == 1.0
    assert m["smoothness"] == 1.0  # uniform prediction
    assert m["cal_smoothness"] == 1.0
    assert math.isnan(m["inferred_angle"])  # one predicted class
    assert math.isnan(m["angle_error"])
    assert m["cal_inferred_angle"] == pytest.approx(90.0, abs=EXACT_ANGLE_TOL)
    assert m["cal_angle_error"] == pytest.approx(0.0, abs=EXACT_ANGLE_TOL)
    assert m["label_mass"] == pytest.approx(0.5 * 0.8 + 0.5 * 0.65, rel=1e-12)


# ----------------------------------------------------------- decision_field


def test_decision_field_shape_and_orientation() -> None:
    n1_values = [0, 5]
    n2_values = [0, 7, 9]
    rows = [(a, b) for a in n1_values for b in n2_values]
    n1 = np.array([r[0] for r in rows])
    n2 = np.array([r[1] for r in rows])
    d = 10 * n1 + n2 / 10  # distinct per point, so orientation errors show up
    table = table_from_d(n1, n2, np.zeros(6), d * 0.01).sample(frac=1.0, random_state=1)
    field = decision_field(table)
    assert field.shape == (2, 3)
    assert field[1, 2] == pytest.approx(1 / (1 + math.exp(-0.509)), rel=1e-12)  # (5, 9)
    assert field[0, 1] == pytest.approx(1 / (1 + math.exp(-0.007)), rel=1e-12)  # (0, 7)
    assert field[1, 0] == pytest.approx(1 / (1 + math.exp(-0.5)), rel=1e-12)  # (5, 0)
    assert field[0, 0] == 0.5


def test_decision_field_increases_along_axes() -> None:
    n1, n2 = lattice(step=5)
    field = decision_field(table_from_d(n1, n2, np.zeros(len(n1)), (n1 - 2 * n2) / 100))
    assert field.shape == (20, 20)
    assert np.all(np.diff(field, axis=0) > 0)  # grows with n1 (rows)
    assert np.all(np.diff(field, axis=1) < 0)  # shrinks with n2 (columns)


# ---------------------------------------------------------------- bad input


def test_missing_column_is_named() -> None:
    with pytest.raises(ValueError, match=r"missing columns: \['lp_1', 'is_exemplar'\]"):
        compute_metrics(hand_table().drop(columns=["lp_1", "is_exemplar"]), 10.0)


@pytest.mark.parametrize("angle", [180.0, -0.5, math.nan])
def test_bad_angle(angle: float) -> None:
    with pytest.raises(ValueError, match=r"angle must be in \[0, 180\) degrees, got"):
        compute_metrics(hand_table(), angle)


def test_angle_180_message_names_value() -> None:
    with pytest.raises(ValueError, match="got 180.0"):
        compute_metrics(hand_table(), 180)


def test_bad_truth_value() -> None:
    table = hand_table()
    table.loc[2, "truth"] = 2
    with pytest.raises(ValueError, match="truth must be -1, 0 or 1, got 2"):
        compute_metrics(table, 10.0)


def test_nan_log_prob() -> None:
    table = hand_table()
    table.loc[3, "lp_0"] = math.nan
    with pytest.raises(ValueError, match="lp_0 has 1 NaN"):
        compute_metrics(table, 10.0)


def test_incomplete_lattice() -> None:
    with pytest.raises(ValueError, match="2x3 lattice: 1 points missing, 0 duplicated"):
        compute_metrics(hand_table().drop(index=4), 10.0)


def test_duplicated_lattice_point() -> None:
    table = hand_table()
    table = pd.concat([table, table.iloc[[0, 0]]], ignore_index=True)
    with pytest.raises(ValueError, match="0 points missing, 2 duplicated"):
        compute_metrics(table, 10.0)
    with pytest.raises(ValueError, match="duplicated"):
        decision_field(table)


def test_lattice_index_maps_sorted_values() -> None:
    n1_values, n2_values, i1, i2 = lattice_index([10, 0, 10, 0], [3, 3, 1, 1])
    assert n1_values.tolist() == [0, 10]
    assert n2_values.tolist() == [1, 3]
    assert i1.tolist() == [1, 0, 1, 0]
    assert i2.tolist() == [1, 1, 0, 0]
