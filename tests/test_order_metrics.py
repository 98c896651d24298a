"""Tests for the per-condition measures issue 18 added (SPEC §5): label share and pattern following
(order probes), train accuracy, no angles for xor, |angle error|, smoothness relative to the perfect
classifier, prior-free confidence, the centred decision field, and stale metrics tables rebuilt.

Expected values come from counting grid points, hand derivations or brute force, never from the
module's own formulas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_metrics import lattice as grid  # all (n1, n2) of the lattice, n1-major

from iclsft.artifacts import npy_bytes, parquet_bytes
from iclsft.evaluate.metrics import (
    METRIC_NAMES,
    centred_field,
    compute_metrics,
    pattern_label,
    perfect_smoothness,
)
from iclsft.evaluate.rundata import load_run
from iclsft.evaluate.runs import read_metrics, recompute_metrics, write_metrics
from iclsft.spec import IclRunSpec, ModelSpec, TaskSpec
from iclsft.store import RunDir
from iclsft.tasks import linear2d


def table(n1, n2, truth, d, is_exemplar=None) -> pd.DataFrame:
    """A scores table whose two-label margin lp_0 - lp_1 is d."""
    d = np.asarray(d, dtype=np.float64)
    return pd.DataFrame({
        "n1": np.asarray(n1, dtype=np.int64), "n2": np.asarray(n2, dtype=np.int64),
        "truth": np.asarray(truth, dtype=np.int64),
        "lp_0": -np.logaddexp(0.0, -d), "lp_1": -np.logaddexp(0.0, d),
        "is_exemplar": np.zeros(len(d), bool) if is_exemplar is None else np.asarray(is_exemplar, bool),
    })


def truth_at(n1: np.ndarray, n2: np.ndarray, angle: float) -> np.ndarray:
    t = math.radians(angle)
    m = -math.sin(t) * (n1 - 49.5) + math.cos(t) * (n2 - 49.5)
    return np.where(np.abs(m) < 1e-9, -1, np.where(m > 0, 0, 1))


def brute_smoothness(g: np.ndarray) -> float:
    """1 - share of cells differing from >= 2 of their existing 4-neighbours, by explicit loops."""
    rows, cols = g.shape
    rough = 0
    for i in range(rows):
        for j in range(cols):
            near = [(i + a, j + b) for a, b in ((1, 0), (-1, 0), (0, 1), (0, -1))
                    if 0 <= i + a < rows and 0 <= j + b < cols]
            rough += sum(g[p] != g[i, j] for p in near) >= 2
    return 1 - rough / g.size


# ------------------------------------------------------------- pattern following and label share


@pytest.mark.parametrize("order", ["12", "21", "1221", "12121221", "2112"])
@pytest.mark.parametrize("shots", [1, 2, 3, 4, 7, 100])
def test_pattern_label_is_the_next_label_of_the_real_stream(order: str, shots: int) -> None:
    stream = linear2d.exemplar_stream(TaskSpec(angle=30.0), seed=3, order=order)
    assert pattern_label(order, shots) == stream["truth"].iloc[2 * shots]


def test_1221_odd_and_even_shots() -> None:
    # stream 1 2 2 1 | 1 2 2 1 ...: position 2 is '2', position 4 is '1', position 6 is '2'
    n1, n2 = grid(10)
    always_second = table(n1, n2, truth_at(n1, n2, 0.0), np.full(len(n1), -1.0))
    follows = {k: compute_metrics(always_second, 0.0, order="1221", shots=k)["pattern_following"]
               for k in (1, 2, 3, 4)}
    assert follows == {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0}


@pytest.mark.parametrize(("order", "shots"), [("12", 5), ("1221", 1), ("1221", 2), ("12121221", 3)])
def test_pure_pattern_matcher_follows_the_pattern_everywhere(order: str, shots: int) -> None:
    n1, n2 = grid()
    # written out: the label at stream position 2K of the repeated pattern ('1' = first label)
    next_label = (order * 200)[2 * shots]
    d = np.full(len(n1), 2.0 if next_label == "1" else -2.0)
    m = compute_metrics(table(n1, n2, truth_at(n1, n2, 45.0), d), 45.0, order=order, shots=shots)
    assert m["pattern_following"] == 1.0
    assert m["label_share"] == (1.0 if next_label == "1" else 0.0)


def test_perfect_classifier_at_0_degrees_splits_half_half() -> None:
    n1, n2 = grid()
    truth = truth_at(n1, n2, 0.0)
    d = np.where(truth == 0, 3.0, -3.0)
    # first label where n2 > 49.5: n2 in 50..99, 50 of 100 columns
    expected = np.count_nonzero(n2 >= 50) / len(n2)
    assert expected == 0.5
    m = compute_metrics(table(n1, n2, truth, d), 0.0, order="12", shots=4)
    assert m["label_share"] == expected and m["pattern_following"] == expected


def test_perfect_classifier_at_45_degrees_counts_boundary_points() -> None:
    n1, n2 = grid()
    truth = truth_at(n1, n2, 45.0)
    # d = 0 on the boundary: a raw prediction's tie goes to the first label
    d = np.where(truth == 0, 3.0, np.where(truth == 1, -3.0, 0.0))
    first = np.count_nonzero(n2 > n1) + np.count_nonzero(n2 == n1)  # 4950 above + 100 on the diagonal
    assert first == 5050
    k1 = compute_metrics(table(n1, n2, truth, d), 45.0, order="1221", shots=1)  # next label '2'
    k2 = compute_metrics(table(n1, n2, truth, d), 45.0, order="1221", shots=2)  # next label '1'
    assert k1["label_share"] == pytest.approx(first / 10_000, abs=1e-15)
    assert k1["pattern_following"] == pytest.approx(1 - first / 10_000, abs=1e-15)
    assert k2["pattern_following"] == pytest.approx(first / 10_000, abs=1e-15)


def test_random_predictions_follow_half_the_time() -> None:
    n1, n2 = grid()
    coin = np.random.default_rng(12345).random(len(n1)) < 0.5
    d = np.where(coin, 1.0, -1.0)
    m = compute_metrics(table(n1, n2, truth_at(n1, n2, 30.0), d), 30.0, order="12", shots=10)
    # binomial sd at n = 10,000 is 0.005: +-0.02 is four of them
    assert m["pattern_following"] == pytest.approx(0.5, abs=0.02)
    assert m["label_share"] == pytest.approx(0.5, abs=0.02)


def test_random_order_has_no_pattern_following() -> None:
    n1, n2 = grid(10)
    m = compute_metrics(table(n1, n2, truth_at(n1, n2, 0.0), np.ones(100)), 0.0, order="random", shots=3)
    assert math.isnan(m["pattern_following"]) and m["label_share"] == 1.0


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"order": "12"}, "needs the shot count"),
    ({"order": "13", "shots": 1}, "'13' is not allowed"),
    ({"order": "12", "shots": 0}, "positive integer"),
    ({"task": "spiral"}, "unknown linear2d task 'spiral'; allowed: linear2d, xor, semantic"),
])
def test_bad_probe_arguments(kwargs: dict, words: str) -> None:
    n1, n2 = grid(10)
    with pytest.raises(ValueError, match=words):
        compute_metrics(table(n1, n2, truth_at(n1, n2, 0.0), np.ones(100)), 0.0, **kwargs)


# ---------------------------------------------------------------------------- train accuracy


def test_train_accuracy_on_exemplars_only() -> None:
    n1, n2 = grid(10)
    truth = truth_at(n1, n2, 90.0)
    d = np.where(truth == 0, 1.0, -1.0)
    exemplar = np.zeros(100, bool)
    exemplar[[0, 1, 98, 99]] = True
    d[[0, 5]] *= -1  # one exemplar wrong, one hold-out point wrong
    m = compute_metrics(table(n1, n2, truth, d, exemplar), 90.0)
    assert m["train_accuracy"] == 0.75
    assert m["holdout_accuracy"] == pytest.approx(95 / 96, abs=1e-15)
    none = compute_metrics(table(n1, n2, truth, d), 90.0)  # a sub-lattice that queries no exemplar
    assert math.isnan(none["train_accuracy"])


# ------------------------------------------------------------------------------------- angles


def test_xor_has_no_angle_metrics() -> None:
    n1, n2 = grid(5)
    m1 = np.where(n2 > 49.5, 1, -1)
    m2 = np.where(n1 < 49.5, 1, -1)  # margin of the line at 90 degrees
    truth = np.where((m1 < 0) ^ (m2 < 0), 1, 0)
    d = np.where(truth == 0, 2.0, -2.0)
    xor = compute_metrics(table(n1, n2, truth, d), 0.0, task="xor")
    for name in ("inferred_angle", "angle_error", "abs_angle_error",
                 "cal_inferred_angle", "cal_angle_error", "cal_abs_angle_error"):
        assert math.isnan(xor[name]), name
    assert xor["accuracy"] == 1.0 and xor["smoothness_rel"] == 1.0
    linear = compute_metrics(table(n1, n2, truth, d), 0.0, task="linear2d")
    assert not math.isnan(linear["abs_angle_error"])  # the same table as linear2d: computed


def test_abs_angle_error_of_a_tilted_classifier() -> None:
    n1, n2 = grid()
    d = np.where(truth_at(n1, n2, 30.0) == 0, 2.0, -2.0)  # a clean boundary at 30 degrees
    m = compute_metrics(table(n1, n2, truth_at(n1, n2, 40.0), d), 40.0, task="semantic")
    assert m["angle_error"] == pytest.approx(-10.0, abs=0.5)
    assert m["abs_angle_error"] == pytest.approx(10.0, abs=0.5)
    assert m["abs_angle_error"] == abs(m["angle_error"])
    assert m["cal_abs_angle_error"] == abs(m["cal_angle_error"])


# --------------------------------------------------------------------------------- smoothness


@pytest.mark.parametrize(("angle", "expected", "tol"), [
    (0.0, 1.0, 0.0), (90.0, 1.0, 0.0),
    (45.0, 1 - 197 / 10_000, 1e-15),  # 98 interior diagonal + 99 sub-diagonal points (hand count)
    (135.0, 1 - 197 / 10_000, 1e-15),
    (30.0, 0.988, 5e-4),  # SPEC / issue 18
])
def test_perfect_classifier_smoothness(angle: float, expected: float, tol: float) -> None:
    n1, n2 = grid()
    truth = truth_at(n1, n2, angle).reshape(100, 100)
    value = perfect_smoothness(truth)
    assert value == pytest.approx(expected, abs=tol)
    assert value == pytest.approx(brute_smoothness(np.where(truth == -1, 0, truth)), abs=1e-15)


def test_smoothness_rel_divides_by_the_perfect_classifier() -> None:
    n1, n2 = grid()
    truth = truth_at(n1, n2, 45.0)
    perfect = compute_metrics(table(n1, n2, truth, np.where(truth == 1, -1.0, 1.0)), 45.0)
    assert perfect["smoothness"] == pytest.approx(0.9803, abs=1e-12)
    assert perfect["smoothness_rel"] == pytest.approx(1.0, abs=1e-15)
    half_plane = compute_metrics(table(n1, n2, truth, np.where(n1 >= 50, -1.0, 1.0)), 45.0)
    assert half_plane["smoothness"] == 1.0
    assert half_plane["smoothness_rel"] == pytest.approx(10_000 / 9_803, abs=1e-15)
    # calibrated: the same field shifted by a constant bias gives the same calibrated prediction
    assert half_plane["cal_smoothness_rel"] == pytest.approx(10_000 / 9_803, abs=1e-15)


def test_xor_smoothness_reference_uses_xor_truth() -> None:
    n1, n2 = grid()
    truth = np.where((n2 > 49.5) ^ (n1 > 49.5), 1, 0)
    m = compute_metrics(table(n1, n2, truth, np.where(truth == 0, 1.0, -1.0)), 0.0, task="xor")
    # quadrants: only the 4 cells at the centre differ from two neighbours
    assert m["smoothness"] == pytest.approx(1 - 4 / 10_000, abs=1e-15)
    assert m["smoothness_rel"] == pytest.approx(1.0, abs=1e-15)


def test_smoothness_rel_is_nan_without_a_smooth_reference() -> None:
    n1, n2 = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    truth = (n1 + n2) % 2  # a checkerboard: even the perfect classifier is all rough
    m = compute_metrics(table(n1, n2, truth, np.ones(4)), 0.0)
    assert m["smoothness"] == 1.0 and math.isnan(m["smoothness_rel"])


# ------------------------------------------------------------------------ prior-free confidence


def test_cal_confidence_ignores_a_label_preference() -> None:
    n1, n2 = grid()
    truth = truth_at(n1, n2, 0.0)
    d = 5.0 + np.where(truth == 0, 1.0, -1.0)  # prefers the first label, ranks the classes apart
    m = compute_metrics(table(n1, n2, truth, d), 0.0)
    # median 5, |d - 5| = 1 everywhere
    assert m["cal_confidence"] == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)
    assert m["confidence"] == pytest.approx((1 / (1 + math.exp(-6)) + 1 / (1 + math.exp(-4))) / 2, abs=1e-12)
    flat = compute_metrics(table(n1, n2, truth, np.full(len(n1), 5.0)), 0.0)  # preference only
    assert flat["cal_confidence"] == 0.5
    assert flat["confidence"] == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-12)


def test_centred_field_layout_and_values() -> None:
    n1, n2 = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    scores = table(n1, n2, np.zeros(4), [1.0, 2.0, 3.0, 10.0]).iloc[[3, 0, 2, 1]]  # rows shuffled
    # median of {1, 2, 3, 10} is 2.5; field[i, j] is (n1 = i, n2 = j)
    np.testing.assert_allclose(centred_field(scores), [[-1.5, -0.5], [0.5, 7.5]], atol=1e-12)


def test_centred_field_with_an_infinite_median() -> None:
    n1, n2 = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    scores = table(n1, n2, np.zeros(4), np.zeros(4))
    scores["lp_1"] = [-np.inf, -np.inf, -np.inf, -1.0]  # three points with d = +inf: median +inf
    field = centred_field(scores)
    assert field[0, 0] == 0.0 and field[1, 1] == -np.inf


# ------------------------------------------------------------------------ run directories


def write_order_run(path: Path, *, task: str = "linear2d", orders=("1221",)) -> Path:
    """An ICL run on a 10x10 sub-lattice whose scores always prefer the first label (d = +1)."""
    run = RunDir(path)
    spec = IclRunSpec(tasks=(TaskSpec(name=task, angle=30.0, grid_step=10),), orders=orders,
                      model=ModelSpec(name="synthetic", fingerprint="0" * 64), shots=(1, 2), seeds=(0,))
    run.open(spec)
    for cond in spec.conditions():
        exemplars = linear2d.exemplars(cond.task, cond.seed, cond.shots, cond.order)
        scores = linear2d.queries(cond.task, exemplars)
        scores["lp_0"], scores["lp_1"] = -np.log1p(np.exp(-1.0)), -np.log1p(np.exp(1.0))
        run.write_condition(cond, {"scores.parquet": parquet_bytes(scores),
                                   "exemplars.parquet": parquet_bytes(exemplars),
                                   "field.npy": npy_bytes(np.zeros((10, 10), np.float32))})
    run.write_arm_record("icl", "ok", conditions=len(run.finished()))
    return path


def test_recompute_passes_order_and_shots(tmp_path: Path) -> None:
    metrics = recompute_metrics(write_order_run(tmp_path / "run")).set_index("shots")
    # "1221": after K = 1 the next label is '2' (never predicted), after K = 2 it is '1' (always)
    assert metrics.loc[1, "pattern_following"] == 0.0 and metrics.loc[2, "pattern_following"] == 1.0
    assert (metrics["label_share"] == 1.0).all()
    xor = recompute_metrics(write_order_run(tmp_path / "xor", task="xor", orders=("random",)))
    assert xor["inferred_angle"].isna().all() and xor["pattern_following"].isna().all()


def test_stale_metrics_table_is_rebuilt(tmp_path: Path) -> None:
    path = write_order_run(tmp_path / "run")
    current = recompute_metrics(path)
    write_metrics(path, current.drop(columns=["pattern_following"]))  # as an older version wrote it
    assert read_metrics(path) is not None  # intact file ...
    assert read_metrics(path, columns=METRIC_NAMES) is None  # ... but outdated
    rebuilt = load_run(path).metrics
    assert list(rebuilt.columns[-len(METRIC_NAMES):]) == list(METRIC_NAMES)
    assert "pattern_following" in pd.read_parquet(path / "metrics.parquet").columns  # rewritten
