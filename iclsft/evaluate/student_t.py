"""Student's t distribution for integer degrees of freedom, without scipy.

Across-seed statistics only ever need ν = n − 1 for a whole number of seeds, and for integer ν the
distribution function has an exact finite series (Abramowitz & Stegun 26.7.3–26.7.4), so no
incomplete-beta continued fraction is needed. The quantile inverts it by bisection.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt


def _check_df(df: int) -> int:
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df!r}")
    return int(df)


def central_probability(t: npt.ArrayLike, df: int) -> np.ndarray:
    """P(|T| < |t|) for T ~ Student t with ``df`` degrees of freedom (A&S 26.7.3/4), elementwise.

    Infinite |t| gives 1; NaN stays NaN.
    """
    df = _check_df(df)
    t = np.abs(np.asarray(t, dtype=np.float64))
    theta = np.arctan(t / math.sqrt(df))  # arctan(inf) = π/2, so |t| = inf gives exactly 1
    c2 = np.cos(theta) ** 2
    s = np.sin(theta)
    # Both series are Σ_k a_k cos^{2k}θ with a_0 = 1 and a_k / a_{k−1} = (2k − 1 ± 1) / (2k ± 1 − 1)·…;
    # the terms are positive, so summing them in order loses no precision.
    if df % 2 == 0:
        term = np.ones_like(t)
        total = term.copy()
        for k in range(1, df // 2):  # a_k = (1·3···(2k−1)) / (2·4···2k)
            term = term * c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    term = np.cos(theta)
    total = term.copy()
    for k in range(1, (df - 1) // 2):  # a_k = (2·4···2k) / (3·5···(2k+1)), times cos θ
        term = term * c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * total)


def two_sided_p(t: npt.ArrayLike, df: int) -> np.ndarray:
    """Two-sided p-value P(|T| ≥ |t|), elementwise."""
    return np.clip(1.0 - central_probability(t, df), 0.0, 1.0)


@lru_cache(maxsize=256)
def quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with ``df`` degrees of freedom, 0 < q < 1."""
    df = _check_df(df)
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level q must lie in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    target = abs(2.0 * q - 1.0)  # P(|T| < t) that the upper quantile leaves
    hi = 1.0
    while float(central_probability(hi, df)) < target:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):  # bisection to machine precision; the function is monotone in t
        mid = 0.5 * (lo + hi)
        if float(central_probability(mid, df)) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    value = 0.5 * (lo + hi)
    return value if q > 0.5 else -value
