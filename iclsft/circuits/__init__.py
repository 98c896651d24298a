"""Circuit shift: which attention heads and MLP blocks carry a behaviour, and how much ICL or SFT moves them.

Operationalisation
------------------
Model: a Llama-architecture causal LM, or a peft model wrapping one (its active LoRA adapter is
applied in every forward).

Data: prompt pairs. Each pair has clean query tokens (the pattern holds) and corrupt query tokens
(the pattern broken) of the same length, an optional prefix shared by both (the ICL demonstrations;
prepended to each), and two answers: `target` (the clean answer) and `foil` (the answer the corrupt
prompt implies, or the shortcut answer). The answer position is the last query token. The metric is
the logit difference LD = log p(target | prompt) - log p(foil | prompt) at the answer position,
taken at the first token of each answer (the two first tokens must differ).

Components: every attention head of every layer (head h of layer l: its slice of the input to
`o_proj`, i.e. the per-head attention output before the output projection) and every MLP block (the
MLP module's output). Activations are taken at all positions of the query. Prefix positions are
left out: attention is causal, so their activations are identical in the clean and the corrupt run
and contribute nothing.

Score (attribution patching, Nanda's linear approximation of activation patching): for component c,

    s(c) = mean over pairs of  sum over query positions and dims of (a_corrupt(c) - a_clean(c)) * dLD_clean/da(c)

with the gradient taken in the clean run as a total derivative (all later components respond). It
estimates the change in LD when c alone is patched from clean to corrupt. One clean forward +
backward and one corrupt forward per batch of pairs. For validation, exact activation patching
(`patching_scores`) gives LD(clean run with c set to its corrupt activation at all query positions)
- LD(clean), averaged over pairs; it needs one forward per component and is meant for tiny models.

Shift of a condition (e.g. k-shot ICL, or the SFT adapter at 0 shots) from the base model (0 shots),
computed separately for heads (flattened layers x heads) and MLPs (layers):

    shift_cosine  = 1 - cos(s_base, s_cond)
    shift_jaccard = 1 - |T_base & T_cond| / |T_base | T_cond|

where T is the set of the top ceil(5% of components) by |s| (at least 1), ties broken by the lower
index. Both are scale-free; scores are normalised to unit L1 only for plots.

How good the linear estimate is (measured once on SmolLM2-135M, fp32, 4 IOI pairs "When A and B went
to the store, B gave a drink to" vs "..., A gave ...", target " A", foil " B"): over the 270 heads,
Pearson r = 0.91 with exact patching, the same top-5% set, and the sign of exact patching on all of
the top 15 components. Over the 30 MLPs r = 0.97 without MLP 0, but MLP 0 gets -0.11 where exact
patching gives -11.6: the known blind spot of attribution patching at the first MLP, which acts on
the changed token's embedding far from linearly. Read MLP shifts with that in mind.

Modules:

    iclsft.circuits.scores       PromptPair, ComponentScores (save/load .npz, written atomically)
    iclsft.circuits.attribution  attribution_scores, patching_scores (torch; imported on first use)
    iclsft.circuits.shift        circuit_shift, shift_cosine, shift_jaccard, top_components, normalised
"""

from __future__ import annotations

from iclsft.circuits.scores import ComponentScores, PromptPair
from iclsft.circuits.shift import (
    circuit_shift,
    l1_normalised,
    normalised,
    shift_cosine,
    shift_jaccard,
    top_components,
)

__all__ = ["ComponentScores", "PromptPair", "attribution_scores", "circuit_shift", "l1_normalised", "normalised",
           "patching_scores", "shift_cosine", "shift_jaccard", "top_components"]


def __getattr__(name: str):
    # torch is imported only when scores are computed, not to compare stored ones.
    if name in ("attribution_scores", "patching_scores"):
        from iclsft.circuits import attribution

        return getattr(attribution, name)
    raise AttributeError(f"module 'iclsft.circuits' has no attribute {name!r}")
