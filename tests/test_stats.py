"""Tests for iclsft.evaluate.stats: bootstrap intervals across seeds and paired ICL − SFT differences,
against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from iclsft.evaluate.stats import bootstrap_interval, paired_differences, summarize


def metrics_table(rows: list[dict]) -> pd.DataFrame:
    """A metrics table as RUN/metrics.parquet holds it (ICL rows have no checkpoint)."""
    base = {"task": "linear2d", "angle": 45.0, "order": "random", "model": "m", "dtype": "float32",
            "condition": "x", "checkpoint": None}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_bootstrap_interval_contains_the_mean_and_is_reproducible():
    values = np.array([0.61, 0.72, 0.55, 0.80, 0.67])
    lo, hi = bootstrap_interval(values, n_boot=4000)
    assert lo < values.mean() < hi
    # Resampled means lie between the smallest and largest value, and the 95% interval is far inside.
    assert values.min() < lo and hi < values.max()
    assert bootstrap_interval(values, n_boot=4000) == (lo, hi)  # fixed generator seed
    assert bootstrap_interval(values, n_boot=4000, seed=1) != (lo, hi)


def test_bootstrap_interval_shrinks_with_more_seeds():
    rng = np.random.default_rng(7)
    widths = []
    for n in (4, 16, 64):
        z = rng.normal(size=n)
        values = 0.7 + 0.05 * (z - z.mean()) / z.std()  # the same spread at every n: only n changes
        lo, hi = bootstrap_interval(values)
        widths.append(hi - lo)
        # ≈ ±1.96 standard errors of the mean, sd·sqrt((n−1)/n)/sqrt(n) for the bootstrap
        assert hi - lo == pytest.approx(2 * 1.96 * 0.05 / math.sqrt(n), rel=0.3)
    # The standard error falls as 1/sqrt(n): each 4x more seeds roughly halves the width.
    assert widths[0] > 1.5 * widths[1] > 1.5 * 1.5 * widths[2] > 0


def test_bootstrap_interval_edge_cases():
    assert bootstrap_interval([0.3]) == (0.3, 0.3)
    assert bootstrap_interval([0.3, math.nan]) == (0.3, 0.3)  # NaN values are left out
    assert all(math.isnan(v) for v in bootstrap_interval([math.nan]))
    lo, hi = bootstrap_interval([0.4, 0.4, 0.4])
    assert lo == pytest.approx(0.4) and hi == pytest.approx(0.4)
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([0.1, 0.2], level=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_interval([0.1, 0.2], n_boot=0)


def test_summarize_means_intervals_and_seed_counts():
    table = metrics_table(
        [{"method": "icl", "shots": 5, "seed": s, "accuracy": a, "auc": u} for s, a, u in
         [(0, 0.8, 0.9), (1, 0.7, math.nan), (2, 0.9, 0.7)]]
        + [{"method": "lora", "shots": 5, "seed": 0, "checkpoint": 1.0, "accuracy": 0.65, "auc": 0.8}]
    )
    out = summarize(table, ["accuracy", "auc"])
    assert list(out.columns) == ["task", "angle", "method", "order", "shots", "checkpoint", "metric", "mean", "lo",
                                 "hi", "n_seeds"]
    icl = out[out["method"] == "icl"].set_index("metric")
    assert icl.loc["accuracy", "mean"] == pytest.approx(0.8)
    assert icl.loc["accuracy", "n_seeds"] == 3
    assert icl.loc["accuracy", "lo"] < 0.8 < icl.loc["accuracy", "hi"]
    assert icl.loc["auc", "mean"] == pytest.approx(0.8)  # NaN seed left out
    assert icl.loc["auc", "n_seeds"] == 2
    assert math.isnan(icl.loc["accuracy", "checkpoint"])
    lora = out[out["method"] == "lora"].set_index("metric")
    # One seed: the interval is the point itself, and n_seeds says so.
    assert lora.loc["accuracy", "n_seeds"] == 1
    assert lora.loc["accuracy", "lo"] == lora.loc["accuracy", "hi"] == lora.loc["accuracy", "mean"] == 0.65


def test_summarize_rejects_duplicate_seeds_and_unknown_metrics():
    row = {"method": "icl", "shots": 1, "seed": 0, "accuracy": 0.5}
    with pytest.raises(ValueError, match="share their key"):
        summarize(metrics_table([row, row]), ["accuracy"])
    with pytest.raises(ValueError, match="missing columns"):
        summarize(metrics_table([row]), ["no_such_metric"])


def test_paired_differences_equal_hand_computed_mean_difference():
    icl = [(0, 0.80), (1, 0.70), (2, 0.90), (3, 0.95)]  # seed 3 has no SFT partner
    lora = [(2, 0.70), (0, 0.60), (1, 0.75)]  # out of seed order: pairing is by seed, not by row
    table = metrics_table(
        [{"method": "icl", "shots": 5, "seed": s, "accuracy": a} for s, a in icl]
        + [{"method": "lora", "shots": 5, "seed": s, "checkpoint": 1.0, "accuracy": a} for s, a in lora]
        + [{"method": "lora", "shots": 5, "seed": s, "checkpoint": 0.5, "accuracy": 0.5} for s in (0, 1, 2)]
        + [{"method": "icl", "shots": 2, "seed": 0, "accuracy": 0.6}]  # no SFT at K=2: no pair
    )
    out = paired_differences(table, ["accuracy"])
    assert len(out) == 2  # one per SFT checkpoint at K=5
    final = out[out["checkpoint"] == 1.0].iloc[0]
    per_seed = [0.80 - 0.60, 0.70 - 0.75, 0.90 - 0.70]
    assert final["diff"] == pytest.approx(np.mean(per_seed))
    assert final["icl_mean"] == pytest.approx(0.8)
    assert final["sft_mean"] == pytest.approx((0.6 + 0.75 + 0.7) / 3)
    assert final["n_pairs"] == 3
    assert final["lo"] <= final["diff"] <= final["hi"]
    assert final["lo"] >= min(per_seed) and final["hi"] <= max(per_seed)
    half = out[out["checkpoint"] == 0.5].iloc[0]
    assert half["diff"] == pytest.approx(0.8 - 0.5)
    assert (final["method"], final["shots"], final["order"]) == ("lora", 5, "random")


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
    assert out.loc["12", "lo"] == out.loc["12", "hi"] == out.loc["12", "diff"]


def test_paired_differences_empty_without_sft():
    table = metrics_table([{"method": "icl", "shots": 1, "seed": 0, "accuracy": 0.7}])
    out = paired_differences(table, ["accuracy"])
    assert out.empty and "diff" in out.columns
