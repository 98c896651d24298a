"""What a claim is, how its verdict is reached, and how a table of verdicts is written (SPEC §11).

Every claim reduces a run to one value per replication unit (a seed, or a task × seed for the
implicit suite): the effect in the direction the study claims, positive meaning "as claimed". Its
interval is a Student-t interval over those units (`iclsft.evaluate.stats`), valid at the 2–10
seeds people use, where a percentile bootstrap over a handful of seeds is not. The verdict:

- holds           the 95% interval lies above 0 and reaches beyond the negligible band ±margin
                  (for an equivalence claim: it lies inside ±margin);
- does not hold   the interval lies below 0, or inside ±margin (an effect too small to matter,
                  shown with confidence, even if also shown to be above 0); for an equivalence
                  claim, it lies entirely outside ±margin;
- inconclusive    anything else, including n < 2 units (no interval can be formed);
- untestable      the run lacks the conditions the test needs; `missing` names them.

Each claim is one pre-stated hypothesis from the studies, judged on its own 95% interval; the
table also gives Holm-adjusted p-values over its testable directional claims for readers who want
family-wise control (docs/claims.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from iclsft.evaluate.stats import holm, one_sample_t_test

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
UNTESTABLE = "untestable"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, UNTESTABLE)
LEVEL = 0.95


@dataclass(frozen=True)
class Claim:
    """A headline claim and its operational test."""

    id: str
    study: str  # "linear2d" (seed 002) or "implicit" (seed 000)
    statement: str
    test: str  # which metric, which conditions, which comparison, in words
    margin: float  # size of a negligible effect, in the effect's unit
    unit: str  # the effect's unit, e.g. "accuracy points"
    equivalence: bool = False  # claim of similarity: holds when the interval lies inside ±margin


@dataclass(frozen=True)
class Result:
    """A claim's verdict on one run; JSON-ready through `as_dict`."""

    claim: str
    study: str
    statement: str
    test: str
    verdict: str
    effect: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    margin: float = math.nan
    unit: str = ""
    method: str = ""
    n: dict = field(default_factory=dict)  # units (seeds/tasks), points, models
    conditions: str = ""
    missing: str = ""
    details: str = ""

    def as_dict(self) -> dict:
        out = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def untestable(claim: Claim, missing: str) -> Result:
    return Result(claim=claim.id, study=claim.study, statement=claim.statement, test=claim.test,
                  verdict=UNTESTABLE, margin=claim.margin, unit=claim.unit, missing=missing)


def verdict(claim: Claim, lo: float, hi: float) -> str:
    """The verdict rule of the module docstring, from a 95% interval of the effect."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    m = claim.margin
    if claim.equivalence:
        if -m < lo and hi < m:
            return HOLDS
        if lo >= m or hi <= -m:
            return FAILS
        return INCONCLUSIVE
    if -m < lo and hi < m:
        return FAILS  # shown to be negligible, even where it is also shown to be above 0
    if lo > 0:
        return HOLDS
    if hi < 0:
        return FAILS
    return INCONCLUSIVE


def judge(claim: Claim, units: Sequence[float], *, n: dict, conditions: str, details: str = "",
          unit_name: str = "seeds") -> Result:
    """A claim's result from its per-unit effects (NaN units are left out and not counted)."""
    values = np.asarray(units, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return untestable(claim, "no unit has a finite value for this test")
    t = one_sample_t_test(values, null=0.0, level=LEVEL)
    # One-sided p for the claimed direction; for an equivalence claim the two one-sided tests (TOST)
    # against ±margin, whose larger p is the equivalence p.
    p = _one_sided_p(values, claim)
    return Result(claim=claim.id, study=claim.study, statement=claim.statement, test=claim.test,
                  verdict=verdict(claim, t.lo, t.hi), effect=float(t.diff), lo=float(t.lo), hi=float(t.hi),
                  p=p, margin=claim.margin, unit=claim.unit,
                  method=f"{LEVEL:.0%} t-interval over {unit_name}, n = {len(values)}",
                  n={unit_name: int(len(values)), **n}, conditions=conditions, details=details)


def _one_sided_p(values: np.ndarray, claim: Claim) -> float:
    if len(values) < 2:
        return math.nan
    if claim.equivalence:
        upper = one_sample_t_test(values, null=claim.margin, level=LEVEL)  # H0: mean >= margin
        lower = one_sample_t_test(values, null=-claim.margin, level=LEVEL)  # H0: mean <= -margin
        return max(_half(upper.p, upper.diff < 0), _half(lower.p, lower.diff > 0))
    t = one_sample_t_test(values, null=0.0, level=LEVEL)
    return _half(t.p, t.diff > 0)


def _half(p_two_sided: float, right_side: bool) -> float:
    """One-sided p from a two-sided one, for the alternative on the side the estimate is on or not."""
    if not math.isfinite(p_two_sided):
        return math.nan
    return p_two_sided / 2 if right_side else 1 - p_two_sided / 2


def with_holm(results: Sequence[Result]) -> list[Result]:
    """Results with `p_holm` filled in over the testable claims that have a p-value."""
    p = np.array([r.p for r in results], dtype=np.float64)
    adjusted = holm(p)
    return [r if not math.isfinite(r.p) else _replace(r, p_holm=float(a)) for r, a in zip(results, adjusted)]


def _replace(r: Result, **changes) -> Result:
    from dataclasses import replace

    return replace(r, **changes)


def to_json(results: Sequence[Result]) -> str:
    return json.dumps({"claims": [r.as_dict() for r in results],
                       "rules": {"level": LEVEL, "verdicts": list(VERDICTS),
                                 "doc": "docs/claims.md"}}, indent=2)


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(v) else f"{v:+.{digits}f}"


def format_table(results: Sequence[Result]) -> str:
    """A terminal table: one line per claim, then the test and conditions of each below it."""
    lines = [f"{'claim':<34} {'verdict':<14} {'effect':>8} {'95% interval':>19} {'p':>7} {'n':<24}"]
    for r in results:
        interval = "" if r.verdict == UNTESTABLE else f"[{_fmt(r.lo)}, {_fmt(r.hi)}]"
        p = "" if not math.isfinite(r.p) else f"{r.p:.3f}"
        n = ", ".join(f"{k} {v}" for k, v in r.n.items())
        lines.append(f"{r.claim:<34} {r.verdict:<14} {_fmt(r.effect) if r.verdict != UNTESTABLE else '':>8} "
                     f"{interval:>19} {p:>7} {n:<24}")
    lines.append("")
    for r in results:
        lines.append(f"- {r.claim}: {r.statement}")
        lines.append(f"    test: {r.test} (negligible: ±{r.margin:g} {r.unit})")
        if r.verdict == UNTESTABLE:
            lines.append(f"    untestable: {r.missing}")
        else:
            lines.append(f"    {r.method}; conditions: {r.conditions}")
            if r.details:
                lines.append(f"    {r.details}")
    return "\n".join(lines)
