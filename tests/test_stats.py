"""Tests for iclsft.evaluate.stats and student_t: t-intervals and paired t-tests across seeds, Holm,
circular means of angles, and the across-seed tables, against tabulated, analytic and hand-computed
values; coverage and false-positive rate by simulation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from iclsft.evaluate import student_t
from iclsft.evaluate.stats import (
    Interval,
    circular_mean_axial,
    circular_mean_error,
    circular_t_interval,
    holm,
    one_sample_t_test,
    paired_differences,
    paired_t_test,
    summarize,
    t_interval,
    wrap_error,
)

# Tabulated two-sided 95% critical values of Student's t (any statistics table).
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 9: 2.262157, 30: 2.042272}


def metrics_table(rows: list[dict]) -> pd.DataFrame:
    """A metrics table as RUN/metrics.parquet holds it (ICL rows have no checkpoint)."""
    base = {"task": "linear2d", "angle": 45.0, "order": "random", "model": "m", "dtype": "float32",
            "condition": "x", "checkpoint": None}
    return pd.DataFrame([{**base, **r} for r in rows])


# --- Student t ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_tables(df):
    assert student_t.quantile(0.975, df) == pytest.approx(T975[df], abs=2e-6)
    assert student_t.quantile(0.025, df) == pytest.approx(-T975[df], abs=2e-6)


def test_t_p_values_match_closed_forms():
    t = np.array([0.0, 0.5, 1.0, 3.0, 10.0])
    # df 1 is the Cauchy distribution, df 2 has P(|T| < t) = t / sqrt(2 + t²).
    np.testing.assert_allclose(student_t.two_sided_p(t, 1), 1 - 2 / np.pi * np.arctan(t), atol=1e-12)
    np.testing.assert_allclose(student_t.two_sided_p(t, 2), 1 - t / np.sqrt(2 + t**2), atol=1e-12)
    assert float(student_t.two_sided_p(2.0, 5)) == pytest.approx(0.1019395, abs=1e-7)  # tabulated
    assert float(student_t.two_sided_p(-2.0, 5)) == float(student_t.two_sided_p(2.0, 5))
    assert float(student_t.two_sided_p(math.inf, 4)) == 0.0
    with pytest.raises(ValueError, match="degrees of freedom"):
        student_t.two_sided_p(1.0, 0)
    with pytest.raises(ValueError, match="degrees of freedom"):
        student_t.quantile(0.975, 2.5)


# --- primitives --------------------------------------------------------------------------------------

def test_t_interval_hand_computed():
    iv = t_interval([1.0, 2.0, 3.0, math.nan])  # NaN left out: mean 2, sd 1, n 3
    half = T975[2] / math.sqrt(3)
    assert iv == Interval(2.0, pytest.approx(2 - half, abs=1e-6), pytest.approx(2 + half, abs=1e-6), 3,
                          "t over seeds")
    iv90 = t_interval([1.0, 2.0, 3.0], level=0.90)
    assert iv90.hi - 2.0 == pytest.approx(2.919986 / math.sqrt(3), abs=1e-6)  # t_{0.95, 2} = 2.919986


def test_t_interval_edge_cases():
    one = t_interval([0.3])
    assert one.mean == 0.3 and one.n == 1 and math.isnan(one.lo) and math.isnan(one.hi)
    none = t_interval([math.nan])
    assert none.n == 0 and all(math.isnan(x) for x in (none.mean, none.lo, none.hi))
    same = t_interval([0.4, 0.4, 0.4])
    assert same.lo == same.hi == same.mean == pytest.approx(0.4)
    with pytest.raises(ValueError, match="level"):
        t_interval([0.1, 0.2], level=1.5)


def test_paired_t_test_hand_computed():
    a, b = [0.80, 0.70, 0.90, math.nan], [0.60, 0.75, 0.70, 0.5]  # the NaN pair is left out
    d = np.array([0.20, -0.05, 0.20])
    se = d.std(ddof=1) / math.sqrt(3)
    t = d.mean() / se
    res = paired_t_test(a, b)
    assert res.n == 3 and res.method == "paired t over seeds"
    assert res.diff == pytest.approx(d.mean())
    assert (res.a_mean, res.b_mean) == (pytest.approx(0.8), pytest.approx((0.60 + 0.75 + 0.70) / 3))
    assert res.lo == pytest.approx(d.mean() - T975[2] * se, abs=1e-6)
    assert res.hi == pytest.approx(d.mean() + T975[2] * se, abs=1e-6)
    assert res.p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)  # df 2 closed form


def test_paired_t_test_edge_cases():
    few = paired_t_test([0.8, math.nan], [0.6, 0.7])
    assert few.n == 1 and few.diff == pytest.approx(0.2) and all(math.isnan(x) for x in (few.p, few.lo, few.hi))
    shift = paired_t_test([0.1, 0.2, 0.3], [0.0, 0.1, 0.2])  # no spread, nonzero difference
    assert shift.p == 0.0 and shift.lo == shift.hi == pytest.approx(0.1)
    same = paired_t_test([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert same.p == 1.0 and same.diff == 0.0
    with pytest.raises(ValueError, match="equal length"):
        paired_t_test([0.1, 0.2], [0.1])


def test_one_sample_t_test_against_a_constant():
    res = one_sample_t_test([0.6, 0.7, 0.8], null=0.5)
    t = 0.2 / (0.1 / math.sqrt(3))
    assert (res.diff, res.a_mean, res.b_mean, res.n) == (pytest.approx(0.2), pytest.approx(0.7), 0.5, 3)
    assert res.p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert res.lo == pytest.approx(0.2 - T975[2] * 0.1 / math.sqrt(3), abs=1e-6)
    with pytest.raises(ValueError, match="null"):
        one_sample_t_test([0.6, 0.7], null=math.nan)


def test_holm_against_hand_computation():
    p = [0.01, 0.04, math.nan, 0.03, 0.005]
    # m = 4 finite: sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06.
    np.testing.assert_allclose(holm(p), [0.03, 0.06, math.nan, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.4]), [0.8, 0.8])  # 0.4·2 = 0.8, then 0.5·1 raised to 0.8
    np.testing.assert_allclose(holm([0.7, 0.6, 0.01]), [1.0, 1.0, 0.03])  # 0.6·2 = 1.2 capped at 1
    np.testing.assert_allclose(holm([0.02, 0.02]), [0.04, 0.04])  # ties
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError, match="p-values"):
        holm([0.2, 1.5])


def test_circular_means_of_hand_made_angles():
    assert circular_mean_axial([5.0, 175.0]) == pytest.approx(0.0, abs=1e-9)
    assert circular_mean_axial([85.0, 95.0]) == pytest.approx(90.0)
    assert circular_mean_axial([170.0, 10.0, 0.0, math.nan]) == pytest.approx(0.0, abs=1e-9)
    assert circular_mean_axial([30.0, 40.0]) == pytest.approx(35.0)
    assert math.isnan(circular_mean_axial([0.0, 90.0]))  # doubled: opposite, no mean direction
    assert math.isnan(circular_mean_axial([]))
    assert circular_mean_error([85.0, -85.0]) == pytest.approx(90.0)  # not 0: both are near ±90
    assert circular_mean_error([-85.0, -89.0]) == pytest.approx(-87.0)
    assert circular_mean_error([5.0, -15.0]) == pytest.approx(-5.0)
    np.testing.assert_allclose(wrap_error([90.0, -90.0, 95.0, -100.0, 180.0]), [90.0, 90.0, -85.0, 80.0, 0.0])


def test_circular_t_interval_unwraps_around_the_mean():
    iv = circular_t_interval([88.0, -88.0, 86.0], axial=False)  # unwrapped: 88, 92, 86
    u = np.array([88.0, 92.0, 86.0])
    half = T975[2] * u.std(ddof=1) / math.sqrt(3)
    assert 86.0 < iv.mean < 90.0 and iv.n == 3 and "circular" in iv.method
    assert (iv.lo, iv.hi) == (pytest.approx(u.mean() - half, abs=1e-6), pytest.approx(u.mean() + half, abs=1e-6))
    axial = circular_t_interval([178.0, 2.0, 0.0], axial=True)
    assert axial.mean == pytest.approx(0.0, abs=1e-9) and axial.lo < 0.0 < axial.hi


# --- tables ------------------------------------------------------------------------------------------

def test_summarize_means_intervals_and_seed_counts():
    table = metrics_table(
        [{"method": "icl", "shots": 5, "seed": s, "accuracy": a, "auc": u} for s, a, u in
         [(0, 0.8, 0.9), (1, 0.7, math.nan), (2, 0.9, 0.7)]]
        + [{"method": "lora", "shots": 5, "seed": 0, "checkpoint": 1.0, "accuracy": 0.65, "auc": 0.8}]
    )
    out = summarize(table, ["accuracy", "auc"])
    assert list(out.columns) == ["task", "angle", "method", "order", "shots", "checkpoint", "metric", "mean", "lo",
                                 "hi", "n_seeds", "ci_method"]
    icl = out[out["method"] == "icl"].set_index("metric")
    assert icl.loc["accuracy", "mean"] == pytest.approx(0.8)
    assert icl.loc["accuracy", "n_seeds"] == 3
    assert icl.loc["accuracy", "hi"] == pytest.approx(0.8 + T975[2] * 0.1 / math.sqrt(3), abs=1e-6)
    assert icl.loc["accuracy", "ci_method"] == "95% t over seeds"
    assert icl.loc["auc", "mean"] == pytest.approx(0.8)  # NaN seed left out
    assert icl.loc["auc", "n_seeds"] == 2
    assert icl.loc["auc", "hi"] == pytest.approx(0.8 + T975[1] * 0.1, abs=1e-5)  # sd 0.1414, se 0.1
    assert math.isnan(icl.loc["accuracy", "checkpoint"])
    lora = out[out["method"] == "lora"].set_index("metric")
    # One seed: a mean, no interval, and n_seeds says so.
    assert lora.loc["accuracy", "n_seeds"] == 1 and lora.loc["accuracy", "mean"] == 0.65
    assert math.isnan(lora.loc["accuracy", "lo"]) and math.isnan(lora.loc["accuracy", "hi"])


def test_summarize_angles_on_the_circle_and_default_metrics():
    table = metrics_table([{"method": "icl", "shots": 5, "seed": s, "accuracy": 0.9, "inferred_angle": th,
                            "angle_error": e, "smoothness": math.nan}
                           for s, th, e in [(0, 5.0, 85.0), (1, 175.0, -85.0)]])
    out = summarize(table).set_index("metric")
    assert out.loc["inferred_angle", "mean"] == pytest.approx(0.0, abs=1e-9)  # not the linear 90
    assert out.loc["angle_error", "mean"] == pytest.approx(90.0)  # not the linear 0
    assert "circular" in out.loc["angle_error", "ci_method"]
    assert out.loc["abs_angle_error", "mean"] == pytest.approx(85.0)  # derived |error|, linear mean
    assert out.loc["abs_angle_error", "lo"] == out.loc["abs_angle_error", "hi"] == pytest.approx(85.0)
    # Default metrics: those the table has with a finite value (smoothness is NaN throughout).
    assert set(out.index) == {"accuracy", "inferred_angle", "angle_error", "abs_angle_error"}


def test_summarize_rejects_duplicate_seeds_and_unknown_metrics():
    row = {"method": "icl", "shots": 1, "seed": 0, "accuracy": 0.5}
    with pytest.raises(ValueError, match="share their key"):
        summarize(metrics_table([row, row]), ["accuracy"])
    with pytest.raises(ValueError, match="missing columns"):
        summarize(metrics_table([row]), ["no_such_metric"])


def test_paired_differences_equal_hand_computed_paired_t():
    icl = [(0, 0.80), (1, 0.70), (2, 0.90), (3, 0.95)]  # seed 3 has no SFT partner
    lora = [(2, 0.70), (0, 0.60), (1, 0.75)]  # out of seed order: pairing is by seed, not by row
    table = metrics_table(
        [{"method": "icl", "shots": 5, "seed": s, "accuracy": a} for s, a in icl]
        + [{"method": "lora", "shots": 5, "seed": s, "checkpoint": 1.0, "accuracy": a} for s, a in lora]
        + [{"method": "lora", "shots": 5, "seed": s, "checkpoint": 0.5, "accuracy": 0.5 + 0.01 * s} for s in (0, 1, 2)]
        + [{"method": "icl", "shots": 2, "seed": 0, "accuracy": 0.6}]  # no SFT at K=2: no pair
    )
    out = paired_differences(table, ["accuracy"])
    assert len(out) == 2  # one per SFT checkpoint at K=5
    assert {"p", "p_holm", "ci_method"} <= set(out.columns)
    final = out[out["checkpoint"] == 1.0].iloc[0]
    d = np.array([0.80 - 0.60, 0.70 - 0.75, 0.90 - 0.70])
    se = d.std(ddof=1) / math.sqrt(3)
    t = d.mean() / se
    assert final["diff"] == pytest.approx(d.mean())
    assert final["icl_mean"] == pytest.approx(0.8)
    assert final["sft_mean"] == pytest.approx((0.6 + 0.75 + 0.7) / 3)
    assert final["n_pairs"] == 3
    assert final["lo"] == pytest.approx(d.mean() - T975[2] * se, abs=1e-6)
    assert final["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert final["p_holm"] == pytest.approx(final["p"])  # alone in its family (metric, checkpoint 1.0)
    assert final["ci_method"] == "95% paired t over seeds"
    half = out[out["checkpoint"] == 0.5].iloc[0]
    assert half["diff"] == pytest.approx(0.8 - 0.51)
    assert (final["method"], final["shots"], final["order"]) == ("lora", 5, "random")


def test_paired_differences_holm_family_is_metric_and_checkpoint():
    rows = []
    for angle in (0.0, 45.0, 90.0):
        for s, (a, b) in enumerate([(0.8, 0.6), (0.7, 0.62), (0.9, 0.7)]):
            rows.append({"angle": angle, "method": "icl", "shots": 5, "seed": s, "accuracy": a + angle / 1000})
            rows.append({"angle": angle, "method": "full", "shots": 5, "seed": s, "checkpoint": 1.0,
                         "accuracy": b})
    out = paired_differences(metrics_table(rows), ["accuracy"]).set_index("angle")
    # By hand: differences (0.2, 0.08, 0.2) + θ/1000 per angle, paired t with 2 df (closed-form p), then
    # Holm over the one family of 3 (accuracy, checkpoint 1.0): the smallest p times 3, the next times 2,
    # the largest times 1, each raised to at least the one before.
    p = {}
    for angle in (0.0, 45.0, 90.0):
        d = np.array([0.2, 0.08, 0.2]) + angle / 1000
        t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
        p[angle] = 1 - t / math.sqrt(2 + t * t)
    assert p[90.0] < p[45.0] < p[0.0]
    expected = {90.0: 3 * p[90.0]}
    expected[45.0] = max(expected[90.0], 2 * p[45.0])
    expected[0.0] = max(expected[45.0], p[0.0])
    for angle in p:
        assert out.loc[angle, "p"] == pytest.approx(p[angle], abs=1e-12)
        assert out.loc[angle, "p_holm"] == pytest.approx(expected[angle], abs=1e-12)


def test_paired_differences_of_angles_are_circular():
    table = metrics_table(
        [{"method": "icl", "shots": 5, "seed": s, "angle_error": e} for s, e in [(0, 88.0), (1, 89.0), (2, 87.0)]]
        + [{"method": "full", "shots": 5, "seed": s, "checkpoint": 1.0, "angle_error": e}
           for s, e in [(0, -88.0), (1, -89.0), (2, -86.0)]]
    )
    row = paired_differences(table, ["angle_error"]).iloc[0]
    # 88 − (−88) = 176 wraps to −4; 178 → −2; 173 → −7: ICL and SFT are 2–7° apart, not 173–178°.
    u = np.array([-4.0, -2.0, -7.0])
    # their axial mean by the textbook rule: half the direction of the mean resultant of the doubled angles
    doubled = np.deg2rad(2 * u)
    assert row["diff"] == pytest.approx(math.degrees(math.atan2(np.sin(doubled).sum(), np.cos(doubled).sum())) / 2)
    half = T975[2] * u.std(ddof=1) / math.sqrt(3)
    assert -5.0 < row["diff"] < -4.0 and row["n_pairs"] == 3
    assert (row["lo"], row["hi"]) == (pytest.approx(u.mean() - half, abs=1e-6), pytest.approx(u.mean() + half,
                                                                                              abs=1e-6))
    assert row["icl_mean"] == pytest.approx(88.0, abs=0.01) and row["sft_mean"] == pytest.approx(-87.67, abs=0.01)


def test_paired_differences_pair_within_order_and_skip_nan():
    table = metrics_table(
        [{"method": "icl", "shots": 1, "seed": s, "order": o, "accuracy": a}
         for s, o, a in [(0, "random", 0.7), (1, "random", 0.8), (0, "12", 0.5), (1, "12", math.nan)]]
        + [{"method": "full", "shots": 1, "seed": s, "order": o, "checkpoint": 1.0, "accuracy": 0.6}
           for s in (0, 1) for o in ("random", "12")]
    )
    out = paired_differences(table, ["accuracy"]).set_index("order")
    assert out.loc["random", "diff"] == pytest.approx(0.15)
    assert out.loc["random", "n_pairs"] == 2
    assert out.loc["12", "diff"] == pytest.approx(-0.1)  # the NaN seed is left out of the pair
    assert out.loc["12", "n_pairs"] == 1
    assert math.isnan(out.loc["12", "lo"]) and math.isnan(out.loc["12", "p"]) and math.isnan(out.loc["12", "p_holm"])


def test_paired_differences_empty_without_sft():
    table = metrics_table([{"method": "icl", "shots": 1, "seed": 0, "accuracy": 0.7}])
    out = paired_differences(table, ["accuracy"])
    assert out.empty and "diff" in out.columns and "p_holm" in out.columns


# --- coverage by simulation --------------------------------------------------------------------------

N_SIM = 10_000  # simulated experiments per setting; the binomial standard error of 5% is then 0.22%
N_POINTS = 2500  # grid points behind one accuracy


def _accuracies(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    return rng.binomial(N_POINTS, np.clip(p, 0.0, 1.0)) / N_POINTS


@pytest.mark.parametrize("skewed", [False, True])
def test_paired_t_false_positive_rate_at_3_seeds(skewed):
    """No true ICL − SFT difference, 3 seeds: the paired test rejects at 5% ± 2.5%.

    Per seed a shared effect (both arms saw the same exemplars), an arm-by-seed effect and binomial
    noise over N_POINTS points; skewed: ICL's arm effect is a centred exponential (SFT's normal with
    the same mean and sd), so the differences are skewed with mean 0.
    """
    rng = np.random.default_rng(18 + skewed)
    shared = 0.75 + rng.normal(0, 0.04, (N_SIM, 3))
    arm = rng.exponential(0.03, (N_SIM, 3)) - 0.03 if skewed else rng.normal(0, 0.03, (N_SIM, 3))
    icl = _accuracies(rng, shared + arm)
    sft = _accuracies(rng, shared + rng.normal(0, 0.03, (N_SIM, 3)))
    rejected = np.mean([paired_t_test(icl[i], sft[i]).p < 0.05 for i in range(N_SIM)])
    assert 0.025 <= rejected <= 0.075, rejected
    assert abs(rejected - 0.05) < 0.01  # measured 0.0497 (normal), 0.0512 (skewed)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_t_interval_covers_a_known_mean(n):
    """Seed accuracies around a known mean 0.7 (seed effect sd 0.04 + binomial noise): 95% ± 2.5%."""
    rng = np.random.default_rng(n)
    values = _accuracies(rng, 0.7 + rng.normal(0, 0.04, (N_SIM, n)))
    covered = np.mean([(iv.lo <= 0.7 <= iv.hi) for iv in map(t_interval, values)])
    assert 0.925 <= covered <= 0.975, covered
