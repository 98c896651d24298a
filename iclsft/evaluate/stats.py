"""Across-seed statistics of a metrics table (SPEC §5): the mean of each metric with a 95%
percentile-bootstrap interval, and the ICL − SFT difference paired by seed.

Seeds are the unit of replication: one seed fixes the exemplar stream, which both arms share
(SPEC §3), so an ICL and an SFT condition with the same (task, angle, order, K, seed) saw exactly the
same exemplars and their difference is a paired one. Pure pandas/numpy; no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import pandas as pd

from iclsft.evaluate import student_t
from iclsft.evaluate.metrics import METRIC_NAMES

N_BOOT = 2000
LEVEL = 0.95
T_METHOD = "t over seeds"
PAIRED_METHOD = "paired t over seeds"
ONE_SAMPLE_METHOD = "one-sample t over seeds"
RESULTANT_MIN = 1e-9
"""Below this mean resultant length the doubled angles cancel and no mean direction exists."""
BOOT_SEED = 0
"""Seed of the resampling generator. Each call restarts it, so a group's interval depends only on its
own values (not on which other groups or metrics were computed alongside)."""

# Conditions that differ only in seed form one group.
GROUP_COLUMNS = ("task", "angle", "method", "order", "shots", "checkpoint")
PAIR_COLUMNS = ("task", "angle", "order", "shots")
BASELINE = "icl"

# Inferred angles are axial (0° and 179° are neighbours), so their plain mean is meaningless near the
# wrap; angle_error is already wrapped into (−90°, 90°] and is averaged instead. Counts are not metrics.
SUMMARY_METRICS: tuple[str, ...] = tuple(
    m for m in METRIC_NAMES
    if m not in ("inferred_angle", "cal_inferred_angle", "n_points", "n_boundary", "n_holdout")
)


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


def _resultant(doubled_rad: np.ndarray) -> complex:
    return complex(np.cos(doubled_rad).mean(), np.sin(doubled_rad).mean())


def circular_mean_axial(angles_deg: npt.ArrayLike) -> float:
    """Mean of axial angles (period 180°, so 0° and 179° are neighbours), in [0, 180).

    The angles are doubled onto the full circle, averaged as unit vectors, and the direction is
    halved back. NaN when no value is finite or the resultant length is below 1e-9 (e.g. 0° and 90°:
    no mean direction exists).
    """
    v = _finite(angles_deg)
    if len(v) == 0:
        return math.nan
    r = _resultant(np.deg2rad(2.0 * v))
    if abs(r) < RESULTANT_MIN:
        return math.nan
    return float(math.degrees(math.atan2(r.imag, r.real)) / 2.0 % 180.0) % 180.0


def wrap_error(x: npt.ArrayLike) -> np.ndarray:
    """Signed angle differences wrapped to (−90°, 90°], the range of angle_error."""
    x = np.asarray(x, dtype=np.float64)
    return 90.0 - np.mod(90.0 - x, 180.0)


def circular_mean_error(errors_deg: npt.ArrayLike) -> float:
    """Circular mean of signed axial errors (degrees), in (−90, 90].

    Like circular_mean_axial, on the doubled circle; the result is wrapped to (−90, 90] like the
    errors themselves, so +85° and −85° average to +90° (never −90°, never 0°). NaN as there.
    """
    v = _finite(errors_deg)
    if len(v) == 0:
        return math.nan
    r = _resultant(np.deg2rad(2.0 * v))
    if abs(r) < RESULTANT_MIN:
        return math.nan
    return float(wrap_error(math.degrees(math.atan2(r.imag, r.real)) / 2.0))


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


@lru_cache(maxsize=64)
def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap indices (n_boot, n): they depend only on n, so groups of equal size share them."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    idx.flags.writeable = False
    return idx


def _intervals(values: np.ndarray, n_boot: int, level: float, seed: int) -> np.ndarray:
    """(2, M) percentile intervals of the column means of a finite (n, M) array, n >= 2."""
    means = values[_resamples(len(values), n_boot, seed)].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return np.quantile(means, [alpha, 1.0 - alpha], axis=0)


def bootstrap_interval(values: npt.ArrayLike, *, n_boot: int = N_BOOT, level: float = LEVEL,
                       seed: int = BOOT_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of the finite entries of ``values``.

    One finite value gives (v, v): with a single seed there is no spread to resample, and the
    interval is the point itself. No finite value gives (NaN, NaN).
    """
    _check(n_boot, level)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), float(v[0])
    lo, hi = _intervals(v[:, None], n_boot, level, seed)[:, 0]
    return float(lo), float(hi)


def _describe(values: np.ndarray, n_boot: int, level: float, seed: int) -> list[dict[str, float]]:
    """Mean, interval and count of the finite entries of each column of an (n_seeds, M) array."""
    finite = np.isfinite(values)
    out: list[dict[str, float]] = [{}] * values.shape[1]
    complete = np.flatnonzero(finite.all(axis=0))
    if len(values) > 1 and len(complete):
        # Columns without NaN share one resampling (the same indices bootstrap_interval would draw).
        sub = values[:, complete]
        bounds = _intervals(sub, n_boot, level, seed)
        for j, col in enumerate(complete):
            out[col] = {"mean": float(sub[:, j].mean()), "lo": float(bounds[0, j]), "hi": float(bounds[1, j]),
                        "n_seeds": len(values)}
    for col in range(values.shape[1]):
        if not out[col]:
            v = values[finite[:, col], col]
            lo, hi = bootstrap_interval(v, n_boot=n_boot, level=level, seed=seed)
            out[col] = {"mean": float(v.mean()) if len(v) else math.nan, "lo": lo, "hi": hi, "n_seeds": len(v)}
    return out


def _prepare(table: pd.DataFrame, metrics: Sequence[str] | None, keys: Sequence[str]) -> tuple[pd.DataFrame, list]:
    metrics = list(SUMMARY_METRICS if metrics is None else metrics)
    missing = [c for c in [*keys, "seed", *metrics] if c not in table.columns]
    if missing:
        raise ValueError(f"metrics table is missing columns {missing}; it has {list(table.columns)}")
    table = table.copy()
    # ICL rows carry no checkpoint: None in an object column, NaN once numeric. Make it NaN throughout.
    table["checkpoint"] = pd.to_numeric(table["checkpoint"], errors="raise").astype(np.float64)
    return table, metrics


def _check_unique(table: pd.DataFrame, keys: Sequence[str], what: str) -> None:
    dup = table.duplicated(list(keys), keep=False)
    if dup.any():
        first = table.loc[dup, list(keys)].iloc[0].to_dict()
        raise ValueError(f"{what}: {int(dup.sum())} rows share their key with another row, e.g. {first}; "
                         "one row per condition and seed is expected")


def summarize(table: pd.DataFrame, metrics: Sequence[str] | None = None, *, n_boot: int = N_BOOT,
              level: float = LEVEL, seed: int = BOOT_SEED) -> pd.DataFrame:
    """Mean and bootstrap interval across seeds of each metric, per condition group.

    ``table`` is a metrics table (``RUN/metrics.parquet``). Returns one row per (group, metric) with
    columns ``task, angle, method, order, shots, checkpoint, metric, mean, lo, hi, n_seeds``;
    ``n_seeds`` counts the seeds with a finite value (NaN values, e.g. an inferred angle of a
    one-class prediction, are left out), and where it is 1 the interval is the point itself.
    """
    _check(n_boot, level)
    keys = list(GROUP_COLUMNS)
    table, metrics = _prepare(table, metrics, keys)
    _check_unique(table, [*keys, "seed"], "summarize")
    rows = []
    for group, sub in table.groupby(keys, dropna=False, sort=True):
        described = _describe(sub[metrics].to_numpy(dtype=np.float64), n_boot, level, seed)
        rows.extend({**dict(zip(keys, group)), "metric": m, **d} for m, d in zip(metrics, described))
    return pd.DataFrame(rows, columns=[*keys, "metric", "mean", "lo", "hi", "n_seeds"])


def paired_differences(table: pd.DataFrame, metrics: Sequence[str] | None = None, *, baseline: str = BASELINE,
                       n_boot: int = N_BOOT, level: float = LEVEL, seed: int = BOOT_SEED) -> pd.DataFrame:
    """ICL − SFT difference of each metric, paired by seed, per (task, angle, order, K), SFT method
    and SFT checkpoint.

    For every SFT row the ICL row with the same task, angle, order, K and seed is its pair; the
    difference is ``baseline − method`` (positive: ICL higher). Returns one row per (group, metric)
    with columns ``task, angle, order, shots, method, checkpoint, metric, icl_mean, sft_mean, diff,
    lo, hi, n_pairs`` where icl_mean and sft_mean are over the same paired seeds and ``diff`` is
    their difference. Seeds missing in either arm, or with a NaN metric on either side, are left out;
    empty when the table has no ICL or no SFT rows.
    """
    _check(n_boot, level)
    pair = list(PAIR_COLUMNS)
    table, metrics = _prepare(table, metrics, [*pair, "method", "checkpoint"])
    columns = [*pair, "method", "checkpoint", "metric", "icl_mean", "sft_mean", "diff", "lo", "hi", "n_pairs"]
    base = table[table["method"] == baseline]
    other = table[table["method"] != baseline]
    _check_unique(base, [*pair, "seed"], f"paired_differences ({baseline} rows)")
    _check_unique(other, [*pair, "method", "checkpoint", "seed"], "paired_differences (SFT rows)")
    merged = other.merge(base[[*pair, "seed", *metrics]], on=[*pair, "seed"], suffixes=("", "@base"))
    rows = []
    for group, sub in merged.groupby([*pair, "method", "checkpoint"], dropna=False, sort=True):
        a = sub[[f"{m}@base" for m in metrics]].to_numpy(dtype=np.float64)
        b = sub[metrics].to_numpy(dtype=np.float64)
        ok = np.isfinite(a) & np.isfinite(b)  # a pair counts only where both sides have a value
        a, b = np.where(ok, a, np.nan), np.where(ok, b, np.nan)
        described = _describe(a - b, n_boot, level, seed)
        key = dict(zip([*pair, "method", "checkpoint"], group))
        for j, (metric, d) in enumerate(zip(metrics, described)):
            rows.append({
                **key, "metric": metric,
                "icl_mean": float(a[ok[:, j], j].mean()) if ok[:, j].any() else math.nan,
                "sft_mean": float(b[ok[:, j], j].mean()) if ok[:, j].any() else math.nan,
                "diff": d["mean"], "lo": d["lo"], "hi": d["hi"], "n_pairs": d["n_seeds"],
            })
    return pd.DataFrame(rows, columns=columns)
