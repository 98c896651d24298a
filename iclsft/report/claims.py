"""The report's "Claims" section: the verdict table of `iclsft-eval claims` for the run (SPEC §11)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from iclsft.claims.core import FAILS, HOLDS, UNTESTABLE, Result
from iclsft.report.html import Section, fmt, table

VERDICT_CLASS = {HOLDS: "pos", FAILS: "neg"}


def claims_section(evaluate: Callable[[], Sequence[Result]]) -> Section:
    """The table of the claims `evaluate()` returns (one study's, from the data the page has loaded)."""
    s = Section("Claims", "Each headline claim of the study as an operational test on this run. Effects are "
                "oriented so that positive means 'as claimed'; the interval is a 95% t-interval over the "
                "replication units (seeds, or tasks × seeds) with n given; holds = interval above 0 and beyond "
                "the negligible margin (similarity claims: inside ±margin), does not hold = below 0 or shown "
                "negligible, untestable = the run lacks the conditions named. p: one-sided (similarity: TOST); "
                "p_H: Holm-adjusted over this table's claims with a p. Definitions: docs/claims.md; also "
                "RUN/claims.json via `iclsft-eval claims RUN`.")
    try:
        results = evaluate()
    except (ValueError, OSError) as e:  # the rest of the report stands without this section
        s.note(f"claims could not be evaluated: {e}")
        return s
    s.raw(table(["claim", "verdict", "effect", "95% interval", "margin", "p", "p_H", "n", "test and conditions"],
                [_row(r) for r in results], n_keys=2))
    return s


def _row(r: Result) -> Sequence:
    n = ", ".join(f"{k} {v}" for k, v in r.n.items())
    if r.verdict == UNTESTABLE:
        what = f"{r.statement}. Untestable: {r.missing}"
        return [r.claim, r.verdict, "", "", f"±{r.margin:g}", "", "", "", (what, "wrap")]
    interval = "–" if not math.isfinite(r.lo) else f"[{fmt(r.lo)}, {fmt(r.hi)}]"
    what = f"{r.statement}. Test: {r.test}. {r.method}; {r.conditions}. {r.details}".strip()
    return [r.claim, (r.verdict, VERDICT_CLASS.get(r.verdict, "")), fmt(r.effect), interval,
            f"±{r.margin:g} {r.unit}", fmt(r.p), fmt(r.p_holm), n, (what, "wrap")]

