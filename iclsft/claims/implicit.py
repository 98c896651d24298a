"""The implicit-pattern study's headline claims (seed 000) as operational tests on a run's tables.

The replication unit is a task × seed (the four tasks are the study's replications; a CPU run often
has one seed), so intervals are t-intervals over those units.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from iclsft.claims.core import Claim, Result, judge, untestable

STUDY = "implicit"
FT_PREFERENCE = ("full-original", "full", "lora")  # the study's recipe first, then ours (full, LoRA)

ICL_BEATS_FT = Claim(
    "icl_beats_finetuning_implicit", STUDY, "ICL captures implicit patterns better than fine-tuning",
    "accuracy on the pattern-holds variant, ICL at its largest K − the fine-tuned model (full where the run "
    "has it, else LoRA), on the same evaluation items, per task and seed (the largest K, not the best K, "
    "so ICL gets no selection advantage)",
    margin=0.05, unit="accuracy")
CIRCUIT_SHIFT = Claim(
    "icl_shifts_circuit_more", STUDY, "ICL shifts the model's circuit more than fine-tuning (circuit shift theory)",
    "circuit shift from the base model (1 − cosine of attribution scores, mean of heads and MLPs; "
    "docs/implicit.md), ICL state − fine-tuned state, per task",
    margin=0.02, unit="1 − cosine")

CLAIMS: tuple[Claim, ...] = (ICL_BEATS_FT, CIRCUIT_SHIFT)


@dataclass(frozen=True)
class Evidence:
    """The implicit run's metrics table (RUN/metrics.parquet) and circuit shifts (RUN/circuits/shift.json,
    None if never computed)."""

    metrics: pd.DataFrame
    shift: pd.DataFrame | None


def evaluate(evidence: Evidence) -> list[Result]:
    m = evidence.metrics
    ft = [x for x in FT_PREFERENCE if (m["method"] == x).any()]
    primary = ft[0] if ft else None
    return [_icl_beats_ft(m, primary), _circuit(evidence.shift, primary)]


def _icl_beats_ft(m: pd.DataFrame, ft: str | None) -> Result:
    if ft is None or not (m["method"] == "icl").any():
        lacking = " and ".join(x for x, ok in (("ICL", (m["method"] == "icl").any()), ("a fine-tuned method", ft))
                               if not ok)
        return untestable(ICL_BEATS_FT, f"the run has no finished {lacking} conditions")
    holds = m[m["variant"] == "holds"]
    icl = holds[holds["method"] == "icl"]
    icl = icl[icl["shots"] == icl.groupby(["task", "seed"])["shots"].transform("max")]
    tuned = holds[holds["method"] == ft]
    p = icl.merge(tuned[["task", "seed", "accuracy", "n_items"]], on=["task", "seed"], suffixes=("", "@ft"))
    if p.empty:
        return untestable(ICL_BEATS_FT, f"no task has both ICL and {ft} results at the same seed")
    effect = (p["accuracy"] - p["accuracy@ft"]).to_numpy()
    broken = m[m["variant"] == "broken"]
    details = ""
    if not broken.empty:
        b_icl = broken[(broken["method"] == "icl")]
        b_icl = b_icl[b_icl["shots"] == b_icl.groupby(["task", "seed"])["shots"].transform("max")]
        bp = b_icl.merge(broken[broken["method"] == ft][["task", "seed", "accuracy"]], on=["task", "seed"],
                         suffixes=("", "@ft"))
        if not bp.empty:
            mean = float((bp["accuracy"] - bp["accuracy@ft"]).mean())
            details = f"pattern-broken variant, same comparison: mean {mean:+.3f} over {len(bp)} task×seed units"
    shots = ",".join(f"{t}:K{int(k)}" for t, k in zip(p["task"], p["shots"]))
    n_items = int(p["n_items"].sum() + p["n_items@ft"].sum()) if "n_items" in p else 0
    return judge(ICL_BEATS_FT, effect, n={"items": n_items, "models": int(p["model"].nunique())},
                 conditions=f"icl ({shots}) vs {ft} · variant holds · tasks {','.join(sorted(p['task'].unique()))}",
                 details=details, unit_name="task×seed units")


def _circuit(shift: pd.DataFrame | None, ft: str | None) -> Result:
    if shift is None or shift.empty:
        return untestable(CIRCUIT_SHIFT, "no circuit shifts: run `iclsft-eval circuits RUN`")
    icl_states = sorted(s for s in shift["state"].unique() if str(s).startswith("icl"))
    tuned = [x for x in FT_PREFERENCE if (shift["state"] == x).any()]
    if not icl_states or not tuned:
        return untestable(CIRCUIT_SHIFT, "the circuit table needs an ICL state and a fine-tuned state "
                          f"(it has {sorted(shift['state'].unique())})")
    ft = ft if ft in tuned else tuned[0]
    s = shift.assign(value=(shift["heads_cosine"] + shift["mlps_cosine"]) / 2.0)
    a = s[s["state"] == icl_states[0]].set_index("task")["value"]
    b = s[s["state"] == ft].set_index("task")["value"]
    effect = (a - b).dropna()
    if effect.empty:
        return untestable(CIRCUIT_SHIFT, f"no task has circuit scores for both {icl_states[0]} and {ft}")
    pairs = int(s.loc[s["task"].isin(effect.index), "n_pairs"].max()) if "n_pairs" in s else 0
    return judge(CIRCUIT_SHIFT, effect.to_numpy(), n={"prompt pairs per state": pairs},
                 conditions=f"{icl_states[0]} vs {ft} · tasks {','.join(effect.index)}", unit_name="tasks")
