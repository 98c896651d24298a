"""The 2D study's headline claims (seed 002), each as an operational test on a run's tables.

Every test pairs conditions that saw the same exemplars: an ICL and an SFT condition with the same
task, angle, order, K and seed (SPEC §3), or two conditions of one arm that differ only in the probed
factor. Per seed, the paired differences are averaged over the cells the test uses (tasks, angles,
K), giving one effect per seed; `core.judge` turns those into an interval and a verdict. Only final
SFT checkpoints count; RSA claims use the collapse index of the residual stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from iclsft.claims.core import INCONCLUSIVE, UNTESTABLE, Claim, Result, judge, untestable
from iclsft.evaluate.metrics import pattern_label
from iclsft.tasks.linear2d import RANDOM_ORDER

SFT_PREFERENCE = ("full", "lora", "full-frozen-unembed")  # the study's main SFT is full fine-tuning
CARDINAL = (0.0, 45.0, 90.0, 135.0)  # the axes and the diagonals (135° mirrors 45°)
PAIR_KEYS = ["task", "angle", "order", "shots", "seed"]
ANGLE_TASKS = ("linear2d", "semantic")  # tasks with one boundary angle (xor has none)
ONE_LABEL = 0.02  # a condition whose raw predictions are ≥ 98% one label has no task behaviour to probe

STUDY = "linear2d"
SIMILAR_HOLDOUT = Claim(
    "similar_holdout_accuracy", STUDY, "ICL and SFT reach similar hold-out accuracy",
    "hold-out accuracy, ICL − SFT, at the largest K both arms have; cells: every task and angle, random "
    "order, final checkpoint; averaged per seed; holds if the interval lies within ±margin",
    margin=0.05, unit="accuracy", equivalence=True)
SIMILAR_SPEED = Claim(
    "similar_learning_speed", STUDY, "ICL and SFT learn at a similar speed (shot by shot)",
    "area under the hold-out-accuracy-against-K curve (mean over the K both arms have, ≥ 2 K), ICL − SFT; "
    "random order, final checkpoint; holds if the interval lies within ±margin",
    margin=0.05, unit="accuracy", equivalence=True)
SFT_CONFIDENT = Claim(
    "sft_more_confident", STUDY, "SFT is more confident than ICL at the same K",
    "prior-free confidence (cal_confidence: mean sigmoid(|d − median d|), which does not reward a label "
    "preference), SFT − ICL, averaged over tasks, angles and K (random order, final checkpoint)",
    margin=0.02, unit="probability")
CARDINAL_BETTER = Claim(
    "icl_better_at_cardinal_angles", STUDY, "ICL classifies better at θ = 0°/45°/90° than at other angles",
    "ICL hold-out accuracy at θ ∈ {0, 45, 90, 135}° minus at the other angles (linear2d/semantic, random "
    "order), averaged over K per seed",
    margin=0.02, unit="accuracy")
DIAGONAL_PULL = Claim(
    "icl_diagonal_pull", STUDY, "ICL's inferred angle is pulled towards the diagonal (30° over-, 60° under-estimated)",
    "signed angle error towards the nearest diagonal (45° or 135°) at angles off the axes and diagonals, "
    "ICL, averaged over angles and K per seed (circular-wrapped errors; raw predictions, prior-corrected "
    "ones where raw angles are undefined)",
    margin=2.0, unit="degrees")
WEAKER_PULL = Claim(
    "sft_weaker_diagonal_pull", STUDY, "SFT's pull towards the diagonal is weaker than ICL's",
    "diagonal pull (as above) ICL − SFT, paired by condition, averaged per seed",
    margin=2.0, unit="degrees")
PERIOD2 = Claim(
    "period2_pattern_matching", STUDY, "A period-2 label order makes ICL follow the pattern instead of the task",
    "ICL under order 12/21: pattern-following rate (share of raw predictions equal to the label the pattern "
    "gives the query's position) minus the share of that label under random order, same task/angle/K/seed",
    margin=0.05, unit="share of predictions")
LONG_PERIODS = Claim(
    "long_periods_barely_matter", STUDY, "Label orders with longer periods barely change ICL",
    "as for period 2, for patterns of period ≥ 4 (e.g. 1221, 12121221); holds if the interval lies within "
    "±margin",
    margin=0.05, unit="share of predictions", equivalence=True)
SEEN_FEATURE = Claim(
    "icl_seen_feature_bias", STUDY, "ICL extrapolates exemplar labels along seen rows and columns",
    "seen-feature effect (iclsft/evaluate/seen.py: errors towards exemplars sharing the query's row or "
    "column minus errors towards distance-matched other exemplars), ICL − SFT on the same exemplars "
    "(ICL alone where the run has no SFT arm), random order, averaged per seed",
    margin=0.05, unit="error rate")
COLLAPSE = Claim(
    "sft_collapse_from_middle_layers", STUDY,
    "SFT collapses representations along the label axis from the middle layers; ICL preserves input structure",
    "collapse index (mean within-class − between-class cosine, residual stream, last query token) averaged "
    "over the second half of the layers, SFT − ICL at the same task/angle/K/seed, averaged per seed",
    margin=0.02, unit="cosine")
LORA_MITIGATES = Claim(
    "lora_mitigates_collapse", STUDY, "LoRA mitigates the collapse",
    "late-layer collapse index (as above), full fine-tuning − LoRA, same task/angle/K/seed",
    margin=0.02, unit="cosine")
FROZEN_PERSISTS = Claim(
    "collapse_with_frozen_unembedding", STUDY, "The collapse persists with a frozen unembedding",
    "late-layer collapse index (as above), full fine-tuning with frozen unembedding − ICL, same "
    "task/angle/K/seed",
    margin=0.02, unit="cosine")

CLAIMS: tuple[Claim, ...] = (SIMILAR_HOLDOUT, SIMILAR_SPEED, SFT_CONFIDENT, CARDINAL_BETTER, DIAGONAL_PULL,
                             WEAKER_PULL, PERIOD2, LONG_PERIODS, SEEN_FEATURE, COLLAPSE, LORA_MITIGATES,
                             FROZEN_PERSISTS)


@dataclass(frozen=True)
class Evidence:
    """What the 2D claims read: the metrics table (RUN/metrics.parquet), optionally with per-condition
    columns `collapse_early`, `collapse_late` (RSA) and `seen_feature_effect` merged in by `condition`."""

    metrics: pd.DataFrame


def evaluate(evidence: Evidence) -> list[Result]:
    m = evidence.metrics.copy()
    m["checkpoint"] = pd.to_numeric(m["checkpoint"]).astype(np.float64)
    m = m[m["checkpoint"].isna() | (m["checkpoint"] == 1.0)]
    sft = [x for x in SFT_PREFERENCE if (m["method"] == x).any()]
    primary = sft[0] if sft else None
    return [
        _similar_holdout(m, primary), _similar_speed(m, primary), _confidence(m, primary), _cardinal(m),
        _pull(m), _weaker_pull(m, primary), _order(m, PERIOD2, lambda p: len(p) == 2),
        _order(m, LONG_PERIODS, lambda p: len(p) >= 4), _seen(m, primary),
        _collapse(m, COLLAPSE, primary, "icl"), _collapse(m, LORA_MITIGATES, "full", "lora"),
        _collapse(m, FROZEN_PERSISTS, "full-frozen-unembed", "icl"),
    ]


# -- helpers -----------------------------------------------------------------------------------------

def _n(frame: pd.DataFrame) -> dict:
    out = {"models": int(frame["model"].nunique()) if "model" in frame else 1}
    if "n_points" in frame:  # both sides of a paired frame
        out["points"] = int(sum(pd.to_numeric(frame[c]).sum() for c in ("n_points", "n_points@b") if c in frame))
    return out


def _describe(frame: pd.DataFrame, methods: Sequence[str], extra: str = "") -> str:
    angles = ",".join(f"{a:g}" for a in sorted(frame["angle"].unique()))
    shots = ",".join(str(int(k)) for k in sorted(frame["shots"].unique()))
    orders = ",".join(sorted(frame["order"].unique()))
    return (f"{' vs '.join(methods)} · tasks {','.join(sorted(frame['task'].unique()))} · θ {angles}° · K {shots} · "
            f"order {orders}{' · ' + extra if extra else ''} · final checkpoints")


def _pairs(m: pd.DataFrame, a: str, b: str, columns: Sequence[str]) -> pd.DataFrame:
    """Rows of method `a` joined to the rows of method `b` at the same task/angle/order/K/seed;
    columns `<col>` (from a) and `<col>@b`; `n_points` summed over both."""
    left = m[m["method"] == a]
    right = m[m["method"] == b][[*PAIR_KEYS, *columns, "n_points"]]
    return left.merge(right, on=PAIR_KEYS, suffixes=("", "@b"))


def _per_seed(frame: pd.DataFrame, effect: pd.Series) -> np.ndarray:
    """Mean of the finite effects per seed (NaN cells are left out; a seed without any is dropped)."""
    e = pd.Series(np.asarray(effect, dtype=np.float64), index=frame.index)
    e = e[np.isfinite(e)]
    return frame.loc[e.index].assign(_e=e).groupby("seed")["_e"].mean().to_numpy()


def _need_methods(claim: Claim, m: pd.DataFrame, methods: Sequence[str | None]) -> Result | None:
    lacking = [x for x in methods if x is None or not (m["method"] == x).any()]
    if not lacking:
        return None
    names = ["an SFT method (lora, full or full-frozen-unembed)" if x is None else f"method {x}" for x in lacking]
    return untestable(claim, f"the run has no finished conditions of {' and '.join(names)}")


def _brief(r: Result) -> str:
    """'effect [lo, hi]' of a secondary comparison, for a claim's details."""
    f = lambda v: "–" if not np.isfinite(v) else f"{v:+.3f}"  # noqa: E731
    return f"{f(r.effect)} [{f(r.lo)}, {f(r.hi)}]"


def _random(m: pd.DataFrame) -> pd.DataFrame:
    return m[m["order"] == RANDOM_ORDER]


# -- claims ------------------------------------------------------------------------------------------

def _similar_holdout(m: pd.DataFrame, sft: str | None) -> Result:
    if (r := _need_methods(SIMILAR_HOLDOUT, m, ["icl", sft])) is not None:
        return r
    p = _pairs(_random(m), "icl", sft, ["holdout_accuracy"])
    if p.empty:
        return untestable(SIMILAR_HOLDOUT, f"no ICL and {sft} conditions share task, angle, K and seed in random order")
    p = p[p["shots"] == p["shots"].max()]
    return judge(SIMILAR_HOLDOUT, _per_seed(p, p["holdout_accuracy"] - p["holdout_accuracy@b"]), n=_n(p),
                 conditions=_describe(p, ["icl", sft]))


def _similar_speed(m: pd.DataFrame, sft: str | None) -> Result:
    if (r := _need_methods(SIMILAR_SPEED, m, ["icl", sft])) is not None:
        return r
    p = _pairs(_random(m), "icl", sft, ["holdout_accuracy"])
    if p["shots"].nunique() < 2:
        return untestable(SIMILAR_SPEED, "needs at least two shot counts K shared by ICL and SFT (random order)")
    return judge(SIMILAR_SPEED, _per_seed(p, p["holdout_accuracy"] - p["holdout_accuracy@b"]), n=_n(p),
                 conditions=_describe(p, ["icl", sft]))


def _confidence(m: pd.DataFrame, sft: str | None) -> Result:
    if (r := _need_methods(SFT_CONFIDENT, m, ["icl", sft])) is not None:
        return r
    metric = "cal_confidence" if "cal_confidence" in m else "confidence"
    p = _pairs(_random(m), sft, "icl", [metric, "confidence"])
    if p.empty:
        return untestable(SFT_CONFIDENT, f"no ICL and {sft} conditions share task, angle, K and seed in random order")
    raw = judge(SFT_CONFIDENT, _per_seed(p, p["confidence"] - p["confidence@b"]), n={}, conditions="")
    details = f"raw max-softmax confidence (rewards a label preference): {_brief(raw)}"
    return judge(SFT_CONFIDENT, _per_seed(p, p[metric] - p[f"{metric}@b"]), n=_n(p),
                 conditions=_describe(p, [sft, "icl"], f"metric {metric}"), details=details)


def _cardinal(m: pd.DataFrame) -> Result:
    icl = _random(m)
    icl = icl[(icl["method"] == "icl") & icl["task"].isin(ANGLE_TASKS)]
    on = icl["angle"].isin(CARDINAL)
    if not on.any() or on.all():
        return untestable(CARDINAL_BETTER, "needs ICL conditions at θ ∈ {0, 45, 90}° and at another angle "
                          "(e.g. 30° or 60°) of linear2d or semantic, random order")
    # per seed: mean over the cardinal cells minus mean over the others (at the K both sets have)
    shots = set(icl.loc[on, "shots"]) & set(icl.loc[~on, "shots"])
    icl = icl[icl["shots"].isin(shots)]
    on = icl["angle"].isin(CARDINAL)
    a = icl[on].groupby("seed")["holdout_accuracy"].mean()
    b = icl[~on].groupby("seed")["holdout_accuracy"].mean()
    effect = (a - b).dropna()
    result = judge(CARDINAL_BETTER, effect.to_numpy(), n=_n(icl), conditions=_describe(icl, ["icl"]))
    # accuracy of a one-label prediction is that label's share of the grid at every angle: no evidence
    return _one_label_guard(result, icl.get("label_share"), "(raw predictions)", "an angle to favour")


def _towards_diagonal(angle: pd.Series, error: pd.Series) -> pd.Series:
    """Signed error in the direction of the nearest diagonal: +error below 45° (or 135°), −error above."""
    diagonal = np.where(angle < 90.0, 45.0, 135.0)
    return pd.Series(np.sign(diagonal - angle) * error, index=angle.index)


def _angle_column(frame: pd.DataFrame) -> str:
    """Raw angle errors unless raw predictions leave most conditions without an angle (one-class)."""
    raw = pd.to_numeric(frame.get("angle_error", pd.Series(dtype=float)))
    return "angle_error" if raw.notna().mean() >= 0.5 or "cal_angle_error" not in frame else "cal_angle_error"


def _off_axes(m: pd.DataFrame) -> pd.DataFrame:
    sel = _random(m)
    return sel[sel["task"].isin(ANGLE_TASKS) & ~sel["angle"].isin(CARDINAL)]


def _pull(m: pd.DataFrame) -> Result:
    icl = _off_axes(m)
    icl = icl[icl["method"] == "icl"]
    if icl.empty:
        return untestable(DIAGONAL_PULL, "needs ICL conditions at angles off the axes and diagonals (e.g. 30°, 60°) "
                          "of linear2d or semantic, random order")
    col = _angle_column(icl)
    return judge(DIAGONAL_PULL, _per_seed(icl, _towards_diagonal(icl["angle"], icl[col])), n=_n(icl),
                 conditions=_describe(icl, ["icl"], f"metric {col}"))


def _weaker_pull(m: pd.DataFrame, sft: str | None) -> Result:
    if (r := _need_methods(WEAKER_PULL, m, ["icl", sft])) is not None:
        return r
    off = _off_axes(m)
    if off.empty:
        return untestable(WEAKER_PULL, "needs conditions at angles off the axes and diagonals (e.g. 30°, 60°)")
    col = _angle_column(off[off["method"] == "icl"])
    p = _pairs(off, "icl", sft, [col])
    if p.empty:
        return untestable(WEAKER_PULL, f"no ICL and {sft} conditions share an off-axis angle, K and seed")
    effect = _towards_diagonal(p["angle"], p[col]) - _towards_diagonal(p["angle"], p[f"{col}@b"])
    return judge(WEAKER_PULL, _per_seed(p, effect), n=_n(p), conditions=_describe(p, ["icl", sft], f"metric {col}"))


def _order(m: pd.DataFrame, claim: Claim, period_ok) -> Result:
    icl = m[m["method"] == "icl"]
    probes = icl[(icl["order"] != RANDOM_ORDER) & icl["order"].map(lambda o: period_ok(str(o)))]
    if probes.empty:
        want = "12 (period 2)" if claim is PERIOD2 else "a pattern of period ≥ 4 (e.g. 1221)"
        return untestable(claim, f"needs ICL conditions with order {want}")
    if "pattern_following" not in m or "label_share" not in m:
        return untestable(claim, "the metrics table predates pattern_following/label_share: "
                          "run `iclsft-eval metrics RUN`")
    base = icl[icl["order"] == RANDOM_ORDER][["task", "angle", "shots", "seed", "label_share", "n_points"]]
    if base.empty:
        return untestable(claim, "needs ICL conditions in random order as the reference")
    p = probes.merge(base, on=["task", "angle", "shots", "seed"], suffixes=("", "@random"))
    if p.empty:
        return untestable(claim, "no order-probe condition has a random-order twin (same task, angle, K, seed)")
    label = np.array([pattern_label(str(o), int(k)) for o, k in zip(p["order"], p["shots"])])
    share_random = np.where(label == 0, p["label_share@random"], 1.0 - p["label_share@random"])
    effect = p["pattern_following"] - share_random
    result = judge(claim, _per_seed(p, effect), n=_n(p), conditions=_describe(p, ["icl"], "vs random order"))
    # A model that gives every query one label under random order has no task behaviour for an order
    # to change: "no effect" would be trivially true and says nothing about order.
    return _one_label_guard(result, p["label_share@random"], "under random order", "an order to change")


def _one_label_guard(result: Result, label_share: pd.Series | None, where: str, what: str) -> Result:
    """Inconclusive, saying why, when ICL's raw predictions are one label in most cells used."""
    if label_share is None:  # a table from before label_share: nothing to check
        return result
    share = pd.to_numeric(label_share).to_numpy(dtype=np.float64)
    one_label = float(np.mean(np.minimum(share, 1.0 - share) <= ONE_LABEL)) if len(share) else 0.0
    if one_label <= 0.5 or result.verdict == UNTESTABLE:
        return result
    return replace(result, verdict=INCONCLUSIVE,
                   details=f"ICL gives one label to ≥ {1 - ONE_LABEL:.0%} of the grid {where} in {one_label:.0%} of "
                           f"these cells: no task behaviour for {what}")


def _seen(m: pd.DataFrame, sft: str | None) -> Result:
    if "seen_feature_effect" not in m:
        return untestable(SEEN_FEATURE, "no per-query scores were read for this test")
    sel = _random(m)
    if not (sel["method"] == "icl").any():
        return untestable(SEEN_FEATURE, "needs ICL conditions in random order")
    # a constant prediction has no seen-feature effect by construction (exactly 0): no evidence either way
    why = ("(raw predictions)", "a seen-feature bias to show")
    if sft is not None and (sel["method"] == sft).any():
        p = _pairs(sel, "icl", sft, ["seen_feature_effect"])
        result = judge(SEEN_FEATURE, _per_seed(p, p["seen_feature_effect"] - p["seen_feature_effect@b"]), n=_n(p),
                       conditions=_describe(p, ["icl", sft]))
        return _one_label_guard(result, p.get("label_share"), *why)
    icl = sel[sel["method"] == "icl"]
    result = judge(SEEN_FEATURE, _per_seed(icl, icl["seen_feature_effect"]), n=_n(icl),
                   conditions=_describe(icl, ["icl"], "no SFT arm: ICL alone"))
    return _one_label_guard(result, icl.get("label_share"), *why)


def _collapse(m: pd.DataFrame, claim: Claim, a: str | None, b: str) -> Result:
    if (r := _need_methods(claim, m, [a, b])) is not None:
        return r
    if "collapse_late" not in m or m.loc[m["method"].isin([a, b]), "collapse_late"].isna().all():
        return untestable(claim, "no RSA arrays for these conditions: run `iclsft-eval rsa RUN`")
    p = _pairs(_random(m), a, b, ["collapse_late", "collapse_early"])
    p = p[p["collapse_late"].notna() & p["collapse_late@b"].notna()]
    if p.empty:
        return untestable(claim, f"no {a} and {b} conditions with RSA share task, angle, K and seed")
    early = judge(claim, _per_seed(p, p["collapse_early"] - p["collapse_early@b"]), n={}, conditions="")
    details = f"first half of the layers: {_brief(early)}"
    return judge(claim, _per_seed(p, p["collapse_late"] - p["collapse_late@b"]), n=_n(p),
                 conditions=_describe(p, [a, b]), details=details)
