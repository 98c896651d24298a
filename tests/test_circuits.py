"""Circuit scores and shift: attribution patching against exact activation patching on a tiny random
Llama (real SmolLM2 tokenizer), prefix and batching invariance, LoRA, and the shift metrics."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from iclsft.circuits import (
    ComponentScores,
    PromptPair,
    attribution_scores,
    circuit_shift,
    normalised,
    patching_scores,
    shift_cosine,
    shift_jaccard,
    top_components,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# (clean, corrupt, target, foil): clean and corrupt tokenize to the same length; the answers' first tokens differ.
TEXTS = [
    ("red is to apple as yellow is to", "red is to cherry as yellow is to", " banana", " lemon"),
    ("The cat sat on the mat. The cat sat on the", "The dog sat on the rug. The cat sat on the", " mat", " rug"),
    ("A B A B A B A", "A B A C A B A", " B", " C"),
    ("one two three four five", "one two three five four", " six", " three"),
]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def pairs(smollm_tokenizer) -> list[PromptPair]:
    out = [PromptPair(*(_ids(smollm_tokenizer, t) for t in texts)) for texts in TEXTS]
    assert all(len(p.clean) == len(p.corrupt) for p in out)
    assert len({len(p.clean) for p in out}) > 1  # different lengths: batches are padded
    return out


def _flat(scores: ComponentScores) -> np.ndarray:
    return np.concatenate([scores.heads.ravel(), scores.mlps])


@pytest.fixture
def fp64_norm(monkeypatch):
    """HF's LlamaRMSNorm computes in fp32 whatever the model dtype; that rounding (~1e-7 relative) would
    swamp a finite difference at alpha = 1e-3, so for the gradient check the norm keeps the input dtype."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def test_attribution_is_the_exact_linearisation_of_patching(smollm_tokenizer, pairs, fp64_norm):
    """Patching a component only a step alpha from clean towards corrupt, divided by alpha, is the
    directional derivative that attribution computes from the gradient. Measured in fp64 at alpha =
    1e-3 over all 8 heads and 2 MLPs: the central difference (patch(+alpha) - patch(-alpha)) / 2 alpha,
    error O(alpha^2), is within 4.6e-6 relative of each score; the one-sided patch(alpha) / alpha,
    error O(alpha), within 2.6e-4 of the largest |score| (1.7e-2 of the smallest score, 0.005), both
    shrinking with alpha as their order says (4.6e-8 and 2.6e-5 at alpha = 1e-4). A wrong gradient,
    sign, position mask or head slice is off by O(1)."""
    model = make_tiny_llama(len(smollm_tokenizer)).double()
    alpha = 1e-3
    attr = _flat(attribution_scores(model, pairs, batch_size=3))
    up = _flat(patching_scores(model, pairs, alpha=alpha, batch_size=3))
    down = _flat(patching_scores(model, pairs, alpha=-alpha, batch_size=3))
    assert attr.shape == (2 * 4 + 2,) and np.all(np.abs(attr) > 1e-3)  # every component matters: rel. error meaningful
    central = (up - down) / (2 * alpha)
    np.testing.assert_allclose(central, attr, rtol=1e-4, atol=0)
    one_sided = up / alpha
    assert np.abs(one_sided - attr).max() <= 1e-3 * np.abs(attr).max()


def _scaled_tiny_llama(vocab_size: int, seed: int, scale: float):
    """make_tiny_llama with every weight matrix times `scale`: the same model as initialising with std
    0.2 x scale (same seed, same draws), norms untouched."""
    model = make_tiny_llama(vocab_size, seed=seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.mul_(scale)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_attribution_tracks_full_patching(smollm_tokenizer, pairs, seed):
    """Full clean -> corrupt patching vs attribution, its linear estimate. The estimate is only as good
    as the model is linear over the patch. With make_tiny_llama's init (std 0.2) attention saturates:
    single patches move LD by up to 1.6 and attribution overshoots up to 3x; Pearson r over the 10
    components, measured on these 4 pairs at seeds 0-3, was 0.67, 0.29, 0.95, 0.64 (single pairs
    0.33-0.99), so it is no test of the code. At std 0.05 (weights x 0.25) patches move LD by at most
    0.05-0.12, as single components of a trained model move a logit difference by a fraction of its
    size, and r was 0.996, 0.993, 0.93, 0.99 (single pairs >= 0.86); at std 0.02, r >= 0.995. So: std
    0.05, seeds 0 and 1, r >= 0.9, and the 3 largest components by |patching| have the sign of
    attribution. A wrong gradient, sign or component gives r near 0 or below."""
    model = _scaled_tiny_llama(len(smollm_tokenizer), seed, 0.25)
    attr, exact = attribution_scores(model, pairs), patching_scores(model, pairs)
    x, y = _flat(attr), _flat(exact)
    r = np.corrcoef(x, y)[0, 1]
    assert r >= 0.9, f"Pearson r = {r:.3f}"
    top = np.argsort(-np.abs(y), kind="stable")[:3]
    assert np.all(np.sign(x[top]) == np.sign(y[top])), (x[top], y[top])
    # the unpatched logit differences are shared by both methods, and the corrupt prompts move LD
    assert attr.ld_clean_mean == pytest.approx(exact.ld_clean_mean, abs=1e-6)
    assert attr.ld_corrupt_mean == pytest.approx(exact.ld_corrupt_mean, abs=1e-6)
    assert abs(attr.ld_clean_mean - attr.ld_corrupt_mean) > 0.05
    assert attr.n_pairs == len(pairs)


def test_prefix_batching_and_padding_change_nothing(smollm_tokenizer, pairs):
    """A shared prefix (run once, its KV reused) scores as prefix + query concatenated by hand; pairs
    grouped by prefix and padded into batches score as the mean of each pair alone."""
    model = make_tiny_llama(len(smollm_tokenizer))
    demo = _ids(smollm_tokenizer, "Q: A B A B A\nA: B\nQ: red is to apple\nA: cherry\n")
    with_prefix = [PromptPair(p.clean, p.corrupt, p.target, p.foil, prefix=demo) for p in pairs]
    by_hand = [PromptPair(demo + list(p.clean), demo + list(p.corrupt), p.target, p.foil) for p in pairs]
    for score in (attribution_scores, patching_scores):
        a, b = score(model, with_prefix, batch_size=3), score(model, by_hand, batch_size=3)
        np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-4, atol=1e-5)
        assert a.ld_clean_mean == pytest.approx(b.ld_clean_mean, abs=1e-5)
        assert a.ld_corrupt_mean == pytest.approx(b.ld_corrupt_mean, abs=1e-5)
    # the prefix changes the scores (so the comparison above is not vacuous)
    assert np.abs(_flat(attribution_scores(model, pairs)) - _flat(a)).max() > 1e-2

    mixed = [with_prefix[0], pairs[1], with_prefix[2], dataclasses.replace(pairs[3], prefix=demo[:5])]
    together = attribution_scores(model, mixed, batch_size=2)
    alone = [attribution_scores(model, [p]) for p in mixed]
    np.testing.assert_allclose(_flat(together), np.mean([_flat(s) for s in alone], axis=0), rtol=1e-4, atol=1e-5)
    assert together.ld_clean_mean == pytest.approx(np.mean([s.ld_clean_mean for s in alone]), abs=1e-5)


def test_lora_adapter_is_applied(smollm_tokenizer, pairs):
    """A peft model with non-zero LoRA weights scores as the same adapter merged into the weights (so the
    hooks sit on the adapted model, o_proj's LoRA wrapper included), and unlike the base model. LoRA
    dropout would make scores random in train mode: scoring runs in eval mode and restores the mode."""
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(len(smollm_tokenizer))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    lora = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    lora.train()
    adapted = attribution_scores(lora, pairs)
    assert lora.training
    merged = attribution_scores(copy.deepcopy(lora).merge_and_unload(), pairs)
    np.testing.assert_allclose(_flat(adapted), _flat(merged), rtol=1e-4, atol=1e-5)
    plain = attribution_scores(base, pairs)
    assert np.abs(_flat(adapted) - _flat(plain)).max() > 1e-2
    assert circuit_shift(plain, adapted)["heads"]["cosine"] > 1e-4


def test_bad_pairs_are_refused(smollm_tokenizer):
    model = make_tiny_llama(len(smollm_tokenizer))
    good = PromptPair([5, 6, 7], [5, 8, 7], [10], [11])
    with pytest.raises(ValueError, match=r"pair 1: .*same length.* 3 and 2 tokens"):
        attribution_scores(model, [good, PromptPair([5, 6, 7], [5, 8], [10], [11])])
    with pytest.raises(ValueError, match=r"pair 0: target and foil start with the same token 10"):
        patching_scores(model, [PromptPair([5, 6], [5, 8], [10, 12], [10, 13])])
    with pytest.raises(ValueError, match="at least one prompt pair"):
        attribution_scores(model, [])
    with pytest.raises(ValueError, match="batch_size"):
        attribution_scores(model, [good], batch_size=0)


def test_shift_metrics():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(30, 9))
    assert shift_cosine(s, s) == pytest.approx(0, abs=1e-12) and shift_jaccard(s, s) == 0
    assert shift_cosine(s, -s) == pytest.approx(2) and shift_jaccard(s, -s) == 0  # |s| ranks the same
    assert shift_cosine(s, 3 * s) == pytest.approx(0, abs=1e-12)  # scale-free
    assert len(top_components(s)) == 14  # ceil(5% of 270)
    assert len(top_components(np.ones(30))) == 2 and len(top_components(np.ones(8))) == 1
    assert len(top_components(np.ones(20))) == 1  # exactly 5%: no rounding up from 1.0000000000000002

    disjoint_a, disjoint_b = np.zeros(40), np.zeros(40)
    disjoint_a[[0, 1]], disjoint_b[[2, 3]] = [5, -4], [1, 1]
    assert shift_jaccard(disjoint_a, disjoint_b) == 1  # top 2 of 40: {0, 1} vs {2, 3}

    # by hand, top 25% of 8 = 2 components
    base = np.array([[3.0, 0, 1, 0], [0, 2, 0, 0]])
    cond = np.array([[2.0, 0, 0, 0], [0, 0, 1, 2]])  # top: index 0 and 7 (|2| each; index 6 holds 1)
    assert shift_cosine(base, cond) == pytest.approx(1 - 6 / (math.sqrt(14) * 3))
    assert shift_jaccard(base, cond, top_frac=0.25) == pytest.approx(1 - 1 / 3)  # {0, 5} vs {0, 7}
    np.testing.assert_array_equal(top_components(np.ones(8), 0.25), [0, 1])  # ties: lower index

    a = ComponentScores(heads=base, mlps=np.array([1.0, -1.0]), n_pairs=2, ld_clean_mean=1.0, ld_corrupt_mean=-1.0)
    b = ComponentScores(heads=cond, mlps=np.array([-1.0, 1.0]), n_pairs=2, ld_clean_mean=1.0, ld_corrupt_mean=-1.0)
    shift = circuit_shift(a, b, top_frac=0.25)
    assert shift["heads"] == {"cosine": pytest.approx(1 - 2 / math.sqrt(14)), "jaccard": pytest.approx(2 / 3)}
    assert shift["mlps"] == {"cosine": pytest.approx(2), "jaccard": 0.0}
    assert math.isnan(shift_cosine(np.zeros(3), np.ones(3)))
    with pytest.raises(ValueError, match=r"different shapes.*\(2, 4\) and \(8,\)"):
        shift_cosine(base, cond.ravel())
    with pytest.raises(ValueError, match="top_frac"):
        top_components(base, 0)

    unit = normalised(a)
    assert np.abs(unit.heads).sum() == pytest.approx(1) and np.abs(unit.mlps).sum() == pytest.approx(1)
    assert circuit_shift(unit, normalised(b), top_frac=0.25) == shift


def test_scores_roundtrip(tmp_path):
    scores = ComponentScores(heads=np.arange(6.0).reshape(2, 3), mlps=np.array([0.5, -0.5]), n_pairs=7,
                             ld_clean_mean=1.25, ld_corrupt_mean=-0.75)
    path = tmp_path / "circuit.npz"
    scores.save(path)
    back = ComponentScores.load(path)
    np.testing.assert_array_equal(back.heads, scores.heads)
    np.testing.assert_array_equal(back.mlps, scores.mlps)
    assert (back.n_pairs, back.ld_clean_mean, back.ld_corrupt_mean) == (7, 1.25, -0.75)
    assert [p.name for p in tmp_path.iterdir()] == ["circuit.npz"]  # no temporary file left behind
    with pytest.raises(ValueError, match="heads must be"):
        ComponentScores(heads=np.zeros(3), mlps=np.zeros(3), n_pairs=1, ld_clean_mean=0, ld_corrupt_mean=0)
