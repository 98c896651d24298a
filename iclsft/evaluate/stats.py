"""Across-seed statistics of a metrics table (SPEC §5): the mean of each metric with a 95% Student-t
interval over seeds, and the ICL − SFT difference as a paired t-test by seed with Holm-adjusted p.

Seeds are the unit of replication: one seed fixes the exemplar stream, which both arms share
(SPEC §3), so an ICL and an SFT condition with the same (task, angle, order, K, seed) saw exactly the
same exemplars and their difference is a paired one. A percentile bootstrap over 2–10 seeds is not
used: at 3 seeds its 95% interval is the range of the values and excludes a true 0 in about a quarter
of experiments (docs/statistics.md). Angles and angle errors are axial and averaged on the circle of
doubled angles. Pure pandas/numpy; no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from iclsft.evaluate import student_t
from iclsft.evaluate.angles import wrap_error
from iclsft.evaluate.metrics import METRIC_NAMES

LEVEL = 0.95
T_METHOD = "t over seeds"
PAIRED_METHOD = "paired t over seeds"
ONE_SAMPLE_METHOD = "one-sample t over seeds"
CIRCULAR_METHOD = "t over seeds, circular (doubled angles)"
CIRCULAR_PAIRED_METHOD = "paired t over seeds, circular (doubled angles)"
RESULTANT_MIN = 1e-9
"""Below this mean resultant length the doubled angles cancel and no mean direction exists."""

# Conditions that differ only in seed form one group.
GROUP_COLUMNS = ("task", "angle", "method", "order", "shots", "checkpoint")
PAIR_COLUMNS = ("task", "angle", "order", "shots")
BASELINE = "icl"

AXIAL_METRICS = ("inferred_angle", "cal_inferred_angle")  # in [0, 180), period 180°
ERROR_METRICS = ("angle_error", "cal_angle_error")  # signed, in (−90, 90], period 180°
ABS_ERROR_OF = {"abs_angle_error": "angle_error", "cal_abs_angle_error": "cal_angle_error"}

# Every metric of the metrics table except the counts; a table that lacks some (an older run) or has
# one that is NaN throughout (angles of xor) is summarised over the rest.
# The absolute errors are derived from the signed ones where a table predates them.
SUMMARY_METRICS: tuple[str, ...] = tuple(dict.fromkeys([*(m for m in METRIC_NAMES if not m.startswith("n_")),
                                                        *ABS_ERROR_OF]))


@dataclass(frozen=True)
class Interval:
    """Mean of the finite values with a two-sided interval; ``method`` names how it was made and
    ``n`` counts the values (seeds) it rests on."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str


@dataclass(frozen=True)
class PairedTest:
    """A t-test of a mean difference: ``diff`` = a_mean − b_mean (for a one-sample test b_mean is the
    null value), its interval [lo, hi], the two-sided ``p``, and ``n`` pairs (or values)."""

    diff: float
    lo: float
    hi: float
    p: float
    n: int
    a_mean: float
    b_mean: float
    method: str


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _finite(values: npt.ArrayLike) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def _t_test(d: np.ndarray, level: float) -> tuple[float, float, float, float]:
    """(mean, lo, hi, two-sided p against 0) of the finite 1-D array ``d`` by Student's t."""
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(d.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan  # one value: no spread, so no interval and no test
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se <= 1e-12 * max(1.0, abs(mean)):
        # No spread at all (every value identical up to rounding): the interval is the point, and the
        # mean differs from 0 with certainty unless it is 0.
        return mean, mean, mean, (1.0 if mean == 0.0 else 0.0)
    half = student_t.quantile(0.5 + level / 2.0, n - 1) * se
    p = float(student_t.two_sided_p(mean / se, n - 1))
    return mean, mean - half, mean + half, p


def t_interval(values: npt.ArrayLike, *, level: float = LEVEL) -> Interval:
    """Student-t interval of the mean of the finite entries of ``values`` (seeds are the unit).

    mean ± t_{(1+level)/2, n−1} · sd/√n. One finite value: lo and hi are NaN (no spread can be
    estimated); none: everything NaN; all values equal: lo = hi = mean.
    """
    _check_level(level)
    v = _finite(values)
    mean, lo, hi, _ = _t_test(v, level)
    return Interval(mean, lo, hi, len(v), T_METHOD)


def paired_t_test(a: npt.ArrayLike, b: npt.ArrayLike, *, level: float = LEVEL) -> PairedTest:
    """Paired t-test of mean(a − b) over the pairs where both are finite (pairs are seeds).

    Fewer than 2 pairs: p, lo and hi are NaN. No spread in a − b: p = 0 when the difference is
    nonzero, 1 when it is zero, and lo = hi = diff.
    """
    _check_level(level)
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_t_test needs a and b of equal length, got {len(a)} and {len(b)}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    diff, lo, hi, p = _t_test(a - b, level)
    a_mean = float(a.mean()) if len(a) else math.nan
    b_mean = float(b.mean()) if len(b) else math.nan
    return PairedTest(diff, lo, hi, p, int(ok.sum()), a_mean, b_mean, PAIRED_METHOD)


def one_sample_t_test(values: npt.ArrayLike, *, null: float = 0.0, level: float = LEVEL) -> PairedTest:
    """One-sample t-test of mean(values) against the constant ``null`` (e.g. a rate against 0.5).

    ``diff`` = mean − null with its interval; ``b_mean`` is ``null``. Edge cases as paired_t_test.
    """
    _check_level(level)
    if not math.isfinite(null):
        raise ValueError(f"null must be a finite number, got {null}")
    v = _finite(values)
    diff, lo, hi, p = _t_test(v - null, level)
    a_mean = float(v.mean()) if len(v) else math.nan
    return PairedTest(diff, lo, hi, p, len(v), a_mean, float(null), ONE_SAMPLE_METHOD)


def holm(pvalues: npt.ArrayLike) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values, in the input order.

    The family is the finite entries: NaN stays NaN and does not count toward m. The i-th smallest of
    m p-values becomes max over j ≤ i of min(1, (m − j + 1)·p_(j)) — monotone in p, capped at 1.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.reshape(-1)
    bad = flat[np.isfinite(flat) & ((flat < 0) | (flat > 1))]
    if len(bad):
        raise ValueError(f"p-values must lie in [0, 1] (or be NaN), got {bad[0]}")
    out = np.full_like(flat, math.nan)
    idx = np.flatnonzero(np.isfinite(flat))
    m = len(idx)
    if m:
        order = idx[np.argsort(flat[idx], kind="stable")]
        adjusted = np.minimum(1.0, (m - np.arange(m)) * flat[order])
        out[order] = np.maximum.accumulate(adjusted)
    return out.reshape(p.shape)


def _mean_direction(angles_deg: npt.ArrayLike) -> float:
    """Half the direction of the mean unit vector of the doubled finite angles, in (−90°, 90°]; NaN
    when none is finite or the resultant length is below RESULTANT_MIN (no mean direction exists)."""
    v = np.deg2rad(2.0 * _finite(angles_deg))
    if len(v) == 0:
        return math.nan
    r = complex(np.cos(v).mean(), np.sin(v).mean())
    if abs(r) < RESULTANT_MIN:
        return math.nan
    return float(wrap_error(math.degrees(math.atan2(r.imag, r.real)) / 2.0))


def circular_mean_axial(angles_deg: npt.ArrayLike) -> float:
    """Mean of axial angles (period 180°, so 0° and 179° are neighbours), in [0, 180).

    The angles are doubled onto the full circle, averaged as unit vectors, and the direction is
    halved back. NaN when no value is finite or the resultant length is below 1e-9 (e.g. 0° and 90°:
    no mean direction exists).
    """
    return float(_mean_direction(angles_deg) % 180.0) % 180.0


def circular_mean_error(errors_deg: npt.ArrayLike) -> float:
    """Circular mean of signed axial errors (degrees), in (−90, 90].

    Like circular_mean_axial, on the doubled circle; the result is wrapped to (−90, 90] like the
    errors themselves, so +85° and −85° average to +90° (never −90°, never 0°). NaN as there.
    """
    return _mean_direction(errors_deg)


def circular_t_interval(values: npt.ArrayLike, *, axial: bool, level: float = LEVEL) -> Interval:
    """Circular mean of angles (``axial``: in [0, 180)) or signed angle errors (in (−90, 90]) with a
    t-interval: each value is unwrapped to within ±90° of the circular mean, and the t-interval of
    those unwrapped values is the interval. Its ends are not wrapped (so lo ≤ hi; read them modulo
    180°). NaN mean and ends when the doubled angles cancel; edge cases otherwise as t_interval.
    """
    _check_level(level)
    v = _finite(values)
    cm = circular_mean_axial(v) if axial else circular_mean_error(v)
    if not math.isfinite(cm):
        return Interval(math.nan, math.nan, math.nan, len(v), CIRCULAR_METHOD)
    _, lo, hi, _ = _t_test(cm + wrap_error(v - cm), level)
    return Interval(cm, lo, hi, len(v), CIRCULAR_METHOD)


def _circular_paired(a: np.ndarray, b: np.ndarray, axial: bool, level: float) -> PairedTest:
    """Paired test of angle differences: a − b wrapped to (−90, 90], summarised as circular_t_interval,
    with p from the t-test of the unwrapped differences against 0."""
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    d = wrap_error(a - b)
    cm = circular_mean_error(d)
    mean_of = circular_mean_axial if axial else circular_mean_error
    if math.isfinite(cm):
        _, lo, hi, p = _t_test(cm + wrap_error(d - cm), level)
    else:
        lo = hi = p = math.nan
    return PairedTest(cm, lo, hi, p, int(ok.sum()), mean_of(a), mean_of(b), CIRCULAR_PAIRED_METHOD)


def _label(method: str, level: float) -> str:
    return f"{level * 100:g}% {method}"


def _describe(values: npt.ArrayLike, metric: str, level: float) -> Interval:
    if metric in AXIAL_METRICS or metric in ERROR_METRICS:
        return circular_t_interval(values, axial=metric in AXIAL_METRICS, level=level)
    return t_interval(values, level=level)


def _prepare(table: pd.DataFrame, metrics: Sequence[str] | None, keys: Sequence[str]) -> tuple[pd.DataFrame, list]:
    table = table.copy()
    for derived, signed in ABS_ERROR_OF.items():
        if derived not in table.columns and signed in table.columns:
            table[derived] = table[signed].abs()
    if metrics is None:
        # Default: every summary metric the table has with at least one finite value.
        metrics = [m for m in SUMMARY_METRICS if m in table.columns
                   and np.isfinite(pd.to_numeric(table[m], errors="coerce").to_numpy(dtype=np.float64)).any()]
    metrics = list(metrics)
    missing = [c for c in [*keys, "seed", *metrics] if c not in table.columns]
    if missing:
        raise ValueError(f"metrics table is missing columns {missing}; it has {list(table.columns)}")
    # ICL rows carry no checkpoint: None in an object column, NaN once numeric. Make it NaN throughout.
    table["checkpoint"] = pd.to_numeric(table["checkpoint"], errors="raise").astype(np.float64)
    return table, metrics


def _check_unique(table: pd.DataFrame, keys: Sequence[str], what: str) -> None:
    dup = table.duplicated(list(keys), keep=False)
    if dup.any():
        first = table.loc[dup, list(keys)].iloc[0].to_dict()
        raise ValueError(f"{what}: {int(dup.sum())} rows share their key with another row, e.g. {first}; "
                         "one row per condition and seed is expected")


def summarize(table: pd.DataFrame, metrics: Sequence[str] | None = None, *, level: float = LEVEL) -> pd.DataFrame:
    """Mean and Student-t interval across seeds of each metric, per condition group.

    ``table`` is a metrics table (``RUN/metrics.parquet``); ``metrics`` defaults to the
    SUMMARY_METRICS it holds with a finite value (``abs_angle_error``/``cal_abs_angle_error`` are
    derived from the signed errors where missing). Returns one row per (group, metric) with columns
    ``task, angle, method, order, shots, checkpoint, metric, mean, lo, hi, n_seeds, ci_method``.
    ``n_seeds`` counts the seeds with a finite value (NaN values, e.g. an inferred angle of a
    one-class prediction, are left out); with one seed lo and hi are NaN. Angles and signed angle
    errors are circular means with circular_t_interval; ``ci_method`` names the interval.
    """
    _check_level(level)
    keys = list(GROUP_COLUMNS)
    table, metrics = _prepare(table, metrics, keys)
    _check_unique(table, [*keys, "seed"], "summarize")
    rows = []
    for group, sub in table.groupby(keys, dropna=False, sort=True):
        key = dict(zip(keys, group))
        for m in metrics:
            iv = _describe(sub[m].to_numpy(dtype=np.float64), m, level)
            rows.append({**key, "metric": m, "mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "n_seeds": iv.n,
                         "ci_method": _label(iv.method, level)})
    return pd.DataFrame(rows, columns=[*keys, "metric", "mean", "lo", "hi", "n_seeds", "ci_method"])


def paired_differences(table: pd.DataFrame, metrics: Sequence[str] | None = None, *, baseline: str = BASELINE,
                       level: float = LEVEL) -> pd.DataFrame:
    """ICL − SFT difference of each metric as a paired t-test over seeds, per (task, angle, order, K),
    SFT method and SFT checkpoint.

    For every SFT row the ICL row with the same task, angle, order, K and seed is its pair; the
    difference is ``baseline − method`` (positive: ICL higher). Returns one row per (group, metric)
    with columns ``task, angle, order, shots, method, checkpoint, metric, icl_mean, sft_mean, diff,
    lo, hi, n_pairs, p, p_holm, ci_method``: icl_mean and sft_mean are over the same paired seeds,
    ``diff`` their difference with its t-interval [lo, hi], ``p`` the two-sided paired-t p-value.
    ``p_holm`` is Holm-adjusted within the family of every row of the returned table with the same
    metric and SFT checkpoint (all tasks, angles, orders, K and SFT methods together; the final
    checkpoint is one family, each intermediate checkpoint another). Angle metrics are differenced
    on the circle (wrapped to (−90, 90]). Seeds missing in either arm, or with a NaN metric on either
    side, are left out; fewer than 2 pairs give NaN lo, hi and p. Empty when the table has no ICL or
    no SFT rows.
    """
    _check_level(level)
    pair = list(PAIR_COLUMNS)
    table, metrics = _prepare(table, metrics, [*pair, "method", "checkpoint"])
    columns = [*pair, "method", "checkpoint", "metric", "icl_mean", "sft_mean", "diff", "lo", "hi", "n_pairs",
               "p", "p_holm", "ci_method"]
    base = table[table["method"] == baseline]
    other = table[table["method"] != baseline]
    _check_unique(base, [*pair, "seed"], f"paired_differences ({baseline} rows)")
    _check_unique(other, [*pair, "method", "checkpoint", "seed"], "paired_differences (SFT rows)")
    merged = other.merge(base[[*pair, "seed", *metrics]], on=[*pair, "seed"], suffixes=("", "@base"))
    rows = []
    for group, sub in merged.groupby([*pair, "method", "checkpoint"], dropna=False, sort=True):
        key = dict(zip([*pair, "method", "checkpoint"], group))
        for m in metrics:
            a = sub[f"{m}@base"].to_numpy(dtype=np.float64)
            b = sub[m].to_numpy(dtype=np.float64)
            if m in AXIAL_METRICS or m in ERROR_METRICS:
                t = _circular_paired(a, b, m in AXIAL_METRICS, level)
            else:
                t = paired_t_test(a, b, level=level)
            rows.append({**key, "metric": m, "icl_mean": t.a_mean, "sft_mean": t.b_mean, "diff": t.diff,
                         "lo": t.lo, "hi": t.hi, "n_pairs": t.n, "p": t.p, "p_holm": math.nan,
                         "ci_method": _label(t.method, level)})
    out = pd.DataFrame(rows, columns=columns)
    if len(out):
        # The family: one metric at one checkpoint (NaN checkpoints cannot occur on SFT rows).
        for _, idx in out.groupby(["metric", "checkpoint"], dropna=False).groups.items():
            out.loc[idx, "p_holm"] = holm(out.loc[idx, "p"].to_numpy(dtype=np.float64))
    return out

