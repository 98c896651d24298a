"""The hf engine against the naive reference (SPEC §4 scoring): the core correctness guard.

Everything runs the tiny random Llama of conftest (2 layers, GQA, large init, the real SmolLM2
vocabulary) on real prompt token ids. Its log-probs vary by whole nats between inputs, so a wrong
attention mask, position id, KV slice or label read moves them far beyond the fp32 tolerance.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from iclsft.engine.hf import HFEngine
from iclsft.engine.packing import PackedBatch, pack, query_paths
from iclsft.engine.reference import naive_score
from iclsft.prompts import PromptBuilder
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks.linear2d import exemplars

TOL = 1e-4  # fp32: absolute, on log-probs (measured differences are ~4e-6)
BOS = 1
ANGLE = 30.0

# Label pairs: " Baz" [389, 1437] / " Rud" [20729] (multi- and single-token);
# " Bazooka" [389, 1437, 790, 81] / " Bazel" [389, 1437, 299] share their first TWO tokens;
# " Bazaar" [389, 15540, 280] / " Bazinga" [389, 4750, 81] share their first token only.
LABELS = {
    "baz": ((" Baz", " Rud"), [[389, 1437], [20729]]),
    "bazooka": ((" Bazooka", " Bazel"), [[389, 1437, 790, 81], [389, 1437, 299]]),
    "bazaar": ((" Bazaar", " Bazinga"), [[389, 15540, 280], [389, 4750, 81]]),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _query_points() -> list[tuple[int, int]]:
    """40 grid points: hand-picked tries ("1 23" vs "12 3" vs "12 30": shared leading tokens,
    different depths) plus 6 random n1 values with 5 n2 each (queries sharing their n1 node)."""
    special = [(1, 23), (12, 3), (12, 30), (12, 31), (1, 2), (0, 0), (99, 99), (5, 50), (50, 5), (7, 7)]
    rng = np.random.default_rng(2024)
    pts = list(special)
    for n1 in rng.choice(np.arange(13, 99), size=6, replace=False):
        for n2 in rng.choice(100, size=5, replace=False):
            pts.append((int(n1), int(n2)))
    assert len(set(pts)) == len(pts) == 40
    return pts


POINTS = _query_points()


@pytest.fixture(scope="module")
def tok(smollm_tokenizer):
    return smollm_tokenizer


def make_builder(tok, labels: str = "baz", bos: str = "never") -> PromptBuilder:
    b = PromptBuilder(tok, TemplateSpec(bos=bos), LABELS[labels][0])
    assert b.label_ids == LABELS[labels][1]  # the token facts the cases rely on
    return b


def stream_prefix(b: PromptBuilder, shots: int, seed: int = 0) -> list[int]:
    if shots == 0:
        return b.prefix([], [], [])
    ex = exemplars(TaskSpec(angle=ANGLE), seed, shots)
    return b.prefix(ex["n1"], ex["n2"], ex["truth"])


def query_ids(b: PromptBuilder, pts=POINTS) -> list[list[int]]:
    return b.queries([p[0] for p in pts], [p[1] for p in pts])


# case -> (label pair, template bos, shots per class; 0 = no exemplars)
# The naive reference costs one full forward per (query, label): the long K=20 prefix is used for the
# main case, shorter ones elsewhere to keep the module fast.
CASES = {
    "baz-never-K20": ("baz", "never", 20),
    "baz-always-K4": ("baz", "always", 4),
    "baz-never-empty": ("baz", "never", 0),  # prefix []
    "baz-always-bosonly": ("baz", "always", 0),  # prefix [BOS]
    "bazooka-never-K3": ("bazooka", "never", 3),
    "bazaar-always-K3": ("bazaar", "always", 3),
}


@pytest.fixture(scope="module")
def reference(tok, tiny_model):
    """case -> (prefix, queries, label ids, naive fp32 scores), computed once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            labels, bos, shots = CASES[case]
            b = make_builder(tok, labels, bos)
            prefix = stream_prefix(b, shots)
            queries = query_ids(b)
            cache[case] = (prefix, queries, b.label_ids, naive_score(tiny_model, prefix, queries, b.label_ids))
        return cache[case]

    return get


# -- packed scoring equals the naive reference ---------------------------------------------------


@pytest.mark.parametrize("budget", [16, 32, 64, 4096])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_matches_naive(reference, tiny_model, case, budget):
    prefix, queries, labels, expected = reference(case)
    labels_name, bos, shots = CASES[case]
    if shots == 0:
        assert prefix == ([BOS] if bos == "always" else [])
    else:
        assert (prefix[0] == BOS) == (bos == "always") and len(prefix) > 7 * 2 * shots
    n_batches = len(pack(queries, labels, budget))
    assert n_batches == 1 if budget == 4096 else n_batches >= 3  # small budgets really split the queries
    got = HFEngine(tiny_model, token_budget=budget, progress=False).score(prefix, queries, labels)
    assert got.shape == (len(queries), 2)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("case", ["baz-never-K20", "bazooka-never-K3"])
def test_batches_on_two_workers_match_naive_and_one_worker(reference, tiny_model, case, monkeypatch):
    """Two packed batches at once on two Python threads (one torch thread each, as on a 2-core CPU):
    the naive reference's scores, the same bits as one worker at one thread, torch's threads restored,
    and really two threads at work."""
    import threading

    prefix, queries, labels, expected = reference(case)
    assert len(pack(queries, labels, 16)) >= 8
    one = HFEngine(tiny_model, token_budget=16, progress=False, workers=1).score(prefix, queries, labels)
    engine = HFEngine(tiny_model, token_budget=16, progress=False, workers=2)
    seen, batch = set(), engine._score_batch
    monkeypatch.setattr(engine, "_score_batch", lambda *a: (seen.add((threading.get_ident(),
                                                                       torch.get_num_threads())), batch(*a))[1])
    torch.set_num_threads(2)
    two = engine.score(prefix, queries, labels)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert len({t for t, _ in seen}) == 2 and {n for _, n in seen} == {1}
    np.testing.assert_allclose(two, expected, rtol=0, atol=TOL)
    np.testing.assert_array_equal(two, one)


def test_workers_must_be_a_positive_integer(tiny_model):
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        HFEngine(tiny_model, workers=0)


@pytest.mark.parametrize("case", ["baz-never-K20", "bazooka-never-K3", "baz-never-empty"])
def test_reference_values_are_not_trivially_equal(reference, case):
    """A bug in masks or positions must show: values spread across queries far beyond TOL."""
    _, queries, _, expected = reference(case)
    assert np.isfinite(expected).all() and (expected < 0).all()
    for j in range(2):
        assert np.ptp(expected[:, j]) > 0.1
        assert np.std(expected[:, j]) > 1e-2
    assert np.ptp(expected[:, 0] - expected[:, 1]) > 0.1
    # queries sharing a trie node still get distinct numbers (n1 = 12: "12 3", "12 30", "12 31")
    i3, i30, i31 = (POINTS.index(p) for p in [(12, 3), (12, 30), (12, 31)])
    assert np.abs(expected[i3] - expected[i30]).max() > 10 * TOL
    assert np.abs(expected[i30] - expected[i31]).max() > 10 * TOL


def test_query_order_and_duplicates(reference, tiny_model):
    """Results come back in the caller's order, whatever order packing uses; duplicates agree."""
    prefix, queries, labels, expected = reference("baz-never-K20")
    perm = np.random.default_rng(1).permutation(len(queries))
    shuffled = [queries[i] for i in perm] + [queries[3], queries[3]]
    got = HFEngine(tiny_model, token_budget=64, progress=False).score(prefix, shuffled, labels)
    np.testing.assert_allclose(got[: len(queries)], expected[perm], rtol=0, atol=TOL)
    np.testing.assert_allclose(got[len(queries) :], expected[[3, 3]], rtol=0, atol=TOL)


def test_no_queries(tiny_model):
    got = HFEngine(tiny_model, progress=False).score([5, 6, 7], [], [[389, 1437], [20729]])
    assert got.shape == (0, 2)


def test_labels_must_have_tokens(tiny_model):
    engine = HFEngine(tiny_model, progress=False)
    with pytest.raises(ValueError, match="at least one token"):
        engine.score([5, 6], [[7, 8]], [[389], []])
    with pytest.raises(ValueError, match="at least one token"):
        engine.score([5, 6], [[7, 8]], [])


# -- prefix reuse across K -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reuse_setup(tok, tiny_model):
    b = make_builder(tok)
    queries = query_ids(b, POINTS[:12])
    prefixes = {k: stream_prefix(b, k) for k in (5, 10, 20)}
    fresh = {
        k: HFEngine(tiny_model, token_budget=32, progress=False).score(p, queries, b.label_ids)
        for k, p in prefixes.items()
    }
    # the shot count matters, so reusing the wrong slice would show
    assert np.abs(fresh[5] - fresh[20]).max() > 1e-2
    assert np.abs(fresh[10] - fresh[20]).max() > 1e-2
    return b, queries, prefixes, fresh


@pytest.mark.parametrize("order", [(20, 5, 10), (5, 20, 10), (5, 10, 20), (10, 5, 20, 10)])
def test_prefix_reuse_matches_fresh_engines(tiny_model, reuse_setup, order):
    b, queries, prefixes, fresh = reuse_setup
    engine = HFEngine(tiny_model, token_budget=32, progress=False)
    for k in order:
        got = engine.score(prefixes[k], queries, b.label_ids)
        np.testing.assert_allclose(got, fresh[k], rtol=0, atol=TOL, err_msg=f"K={k} in order {order}")
    # the cache keeps the longest prefix seen (shorter ones are slices of it)
    assert engine._prefix_kv[None][0] == prefixes[max(order)]


def test_prefix_diverging_midway(tok, tiny_model, reuse_setup):
    """A prefix sharing only its first exemplars with the cached one: recompute from the fork."""
    b, queries, prefixes, fresh = reuse_setup
    other = stream_prefix(b, 20, seed=1)
    forked = prefixes[10] + other[len(prefixes[10]) :]  # K=10 of seed 0, then seed-1 text
    expected = HFEngine(tiny_model, token_budget=32, progress=False).score(forked, queries, b.label_ids)
    engine = HFEngine(tiny_model, token_budget=32, progress=False)
    engine.score(prefixes[20], queries, b.label_ids)
    np.testing.assert_allclose(engine.score(forked, queries, b.label_ids), expected, rtol=0, atol=TOL)
    # and back: the cache now holds the forked prefix; K=5 shares its first tokens, K=20 diverges
    np.testing.assert_allclose(engine.score(prefixes[5], queries, b.label_ids), fresh[5], rtol=0, atol=TOL)
    np.testing.assert_allclose(engine.score(prefixes[20], queries, b.label_ids), fresh[20], rtol=0, atol=TOL)
    np.testing.assert_allclose(
        engine.score([], queries, b.label_ids), naive_score(tiny_model, [], queries, b.label_ids), rtol=0, atol=TOL
    )


def test_prefix_matters(tok, tiny_model, reuse_setup):
    """Sanity: the prompt of another seed gives clearly different numbers."""
    b, queries, prefixes, fresh = reuse_setup
    other = HFEngine(tiny_model, token_budget=32, progress=False).score(
        stream_prefix(b, 20, seed=1), queries, b.label_ids
    )
    assert np.abs(other - fresh[20]).max() > 1e-3


# -- pack() ---------------------------------------------------------------------------------------


def chain(batch: PackedBatch, node: int) -> list[int]:
    """node and its ancestors, root first."""
    out = []
    while node >= 0:
        out.append(node)
        node = batch.parent[node]
    return out[::-1]


def check_batch(batch: PackedBatch, queries, labels) -> None:
    n = len(batch)
    assert len(batch.parent) == len(batch.depth) == n
    mask = batch.ancestor_mask()
    assert mask.shape == (n, n) and mask.dtype == bool
    assert not np.triu(mask, k=1).any()  # lower-triangular: parents come before children
    paths = set()
    for i in range(n):
        anc = chain(batch, i)
        assert set(np.flatnonzero(mask[i]).tolist()) == set(anc)
        assert batch.depth[i] == len(anc) - 1
        path = tuple(batch.tokens[j] for j in anc)
        assert path not in paths  # a trie: every token path appears once
        paths.add(path)
    for q, per_label in batch.reads:
        assert len(per_label) == len(labels)
        for label, pairs in zip(labels, per_label, strict=True):
            assert [tok for _, tok in pairs] == list(label)
            for t, (row, _) in enumerate(pairs):
                # the row predicting label[t] is the node of query + label[:t]
                assert [batch.tokens[j] for j in chain(batch, row)] == list(queries[q]) + list(label[:t])


def test_pack_by_hand():
    queries = [[1, 5], [1, 2, 4], [1, 2, 3]]
    labels = [[7], [8, 9]]
    # nodes: 1, 2, 3, 8|3, 4, 8|4, 5, 8|5 = 8 (paths hold 4 + 4 + 3 = 11 tokens)
    (batch,) = pack(queries, labels, token_budget=8)
    assert len(batch) == 8
    assert [q for q, _ in batch.reads] == [2, 1, 0]  # sorted by tokens
    assert batch.tokens == [1, 2, 3, 8, 4, 8, 5, 8]
    assert batch.parent == [-1, 0, 1, 2, 1, 4, 0, 6]
    assert batch.depth == [0, 1, 2, 3, 2, 3, 1, 2]
    check_batch(batch, queries, labels)
    # budget 7: [1,2,3]+[1,2,4] take 6 nodes, [1,5] would make 8
    first, second = pack(queries, labels, token_budget=7)
    assert len(first) == 6 and [q for q, _ in first.reads] == [2, 1]
    assert len(second) == 3 and [q for q, _ in second.reads] == [0]
    assert second.tokens == [1, 5, 8]


def test_pack_single_oversized_query():
    queries = [[1, 2, 3, 4, 5, 6], [9]]
    (big, small) = pack(queries, [[7, 7, 7], [8]], token_budget=4)
    assert len(big) == 8 and [q for q, _ in big.reads] == [0]  # alone, over budget
    assert len(small) == 3 and [q for q, _ in small.reads] == [1]


def test_new_nodes_counts_what_insert_adds():
    rng = np.random.default_rng(0)
    batch = PackedBatch()
    for _ in range(30):
        query = rng.integers(0, 4, size=rng.integers(1, 5)).tolist()
        labels = [[5, 6, 7], [5, 8]]
        cost = batch.new_nodes(query_paths(query, labels))
        before = len(batch)
        batch.add_query(0, query, labels)
        assert len(batch) - before == cost


@pytest.mark.parametrize("labels_name", ["baz", "bazooka", "bazaar"])
@pytest.mark.parametrize("budget", [16, 50, 64, 4096])
def test_pack_real_queries(tok, labels_name, budget):
    b = make_builder(tok, labels_name)
    pts = [(n1, n2) for n1 in (3, 12, 47, 88) for n2 in range(0, 100, 7)]
    queries = query_ids(b, pts)
    labels = b.label_ids
    batches = pack(queries, labels, budget)
    seen = sorted(q for batch in batches for q, _ in batch.reads)
    assert seen == list(range(len(queries)))  # every query exactly once
    total = 0
    for batch in batches:
        assert len(batch) <= budget or len(batch.reads) == 1
        check_batch(batch, queries, labels)
        total += len(batch)
    flat = sum(len(p) for q in queries for p in query_paths(q, labels))
    assert total < flat  # queries sharing n1 (and labels sharing tokens) share nodes
    if budget == 4096:
        assert len(batches) == 1
        # one "n1 " chain per n1 value: the root holds the first digits of 3, 12, 47, 88 only
        roots = [batches[0].tokens[i] for i, p in enumerate(batches[0].parent) if p == -1]
        assert sorted(roots) == sorted({q[0] for q in queries}) and len(roots) == 4


# -- bf16 -------------------------------------------------------------------------------------------

# Measured (packed bf16 vs naive fp32, token budgets 16/64/4096): K=20 " Baz"/" Rud": max 0.094-0.110,
# mean 0.033 nats; K=3 " Bazooka"/" Bazel" (4- and 3-token sums): max 0.148, mean 0.06 nats. The naive
# reference run in bf16 is off from fp32 by the same amounts (0.110 / 0.145), so this is bf16 rounding
# itself (8 significant bits, ~4e-3 relative per op, on log-probs of -10..-25 nats through a 2-layer model
# with a large init), not packing. The bound leaves 2x headroom; a mask/position/cache bug moves values
# by whole nats (another seed's prefix: up to 5.7 nats).
BF16_TOL = 0.3


@pytest.mark.parametrize("kernel", ["flash", "gemm"])
@pytest.mark.parametrize("case", ["baz-never-K20", "bazooka-never-K3"])
def test_bf16_close_to_fp32_reference(reference, tiny_model, case, kernel):
    """Both prefix kernels: flash (the default) and gemm (--prefix-kernel gemm)."""
    prefix, queries, labels, expected = reference(case)
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    got = HFEngine(model, token_budget=64, progress=False, prefix_kernel=kernel).score(prefix, queries, labels)
    assert np.isfinite(got).all()
    err = np.abs(got - expected)
    assert err.max() < BF16_TOL
    assert err.mean() < BF16_TOL / 3
    assert err.max() > 0  # really computed in bf16
    # the fp32 session model is untouched
    assert next(tiny_model.parameters()).dtype == torch.float32


# -- peft adapters --------------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(vocab: int, seed: int, path) -> str:
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(vocab, seed=0)  # (reseeds torch itself)
    torch.manual_seed(seed)  # the LoRA weights' random init
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(path)
    return str(path)


def naive_with_adapter(vocab: int, adapter: str, prefix, queries, labels) -> np.ndarray:
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_tiny_llama(vocab, seed=0), adapter).eval()
    return naive_score(model, prefix, queries, labels)


def test_adapters(tok, tiny_model, tmp_path):
    pytest.importorskip("peft")
    vocab = len(tok)
    b = make_builder(tok)
    prefix = stream_prefix(b, 3)
    queries = query_ids(b, POINTS[:10])
    labels = b.label_ids
    adapter_a = save_adapter(vocab, 123, tmp_path / "a")
    adapter_b = save_adapter(vocab, 456, tmp_path / "b")

    base_ref = naive_score(tiny_model, prefix, queries, labels)
    ref_a = naive_with_adapter(vocab, adapter_a, prefix, queries, labels)
    ref_b = naive_with_adapter(vocab, adapter_b, prefix, queries, labels)
    assert np.abs(ref_a - base_ref).max() > 1e-3 and np.abs(ref_b - ref_a).max() > 1e-3

    model = make_tiny_llama(vocab, seed=0)  # a fresh copy: the engine wraps it in place
    for p, q in zip(model.parameters(), tiny_model.parameters(), strict=True):
        assert torch.equal(p, q)
    engine = HFEngine(model, token_budget=32, progress=False)

    def check(adapter, expected, what):
        got = engine.score(prefix, queries, labels, adapter=adapter)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL, err_msg=what)
        return got

    base = check(None, base_ref, "base before any adapter")
    with_a = check(adapter_a, ref_a, "adapter a")
    check(None, base_ref, "base after adapter a")
    check(adapter_b, ref_b, "adapter b")
    check(adapter_a, ref_a, "adapter a again")
    check(None, base_ref, "base at the end")
    assert np.abs(with_a - base).max() > 1e-3
    # a longer prefix for the adapter extends the adapter's own cached prefix
    longer = stream_prefix(b, 4)
    np.testing.assert_allclose(
        engine.score(longer, queries[:3], labels, adapter=adapter_a),
        naive_with_adapter(vocab, adapter_a, longer, queries[:3], labels),
        rtol=0,
        atol=TOL,
    )


# -- the engine contract ---------------------------------------------------------------------------


def test_every_engine_implements_the_whole_contract():
    """An abstract method left out would make the class impossible to build; the engines must not need
    vLLM installed to be imported."""
    from iclsft.engine.base import Engine
    from iclsft.engine.vllm_engine import VLLMEngine
    from iclsft.engine.vllm_server import VLLMServerEngine

    assert set(Engine.__abstractmethods__) == {"score", "generate", "release", "check_model", "close"}
    for cls in (HFEngine, VLLMEngine, VLLMServerEngine):
        assert issubclass(cls, Engine) and not cls.__abstractmethods__, cls


def test_check_model_by_directory_or_content(tiny_model_dir, tmp_path):
    import shutil

    from iclsft.engine.base import open_engine
    from iclsft.models import fingerprint
    from iclsft.spec import EngineSpec

    engine = open_engine(EngineSpec(name="hf"), tiny_model_dir, progress=False)
    want = fingerprint(tiny_model_dir)
    engine.check_model(tiny_model_dir, want)
    copy_dir = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    engine.check_model(copy_dir, want)  # another directory with the same content
    other = tmp_path / "other"
    make_tiny_llama(64, seed=1).save_pretrained(other)
    with pytest.raises(ValueError, match=f"holds the model at {tiny_model_dir} .*not the run's model {other}"):
        engine.check_model(other, fingerprint(other))
    with pytest.raises(ValueError, match="cannot tell which model it holds"):
        HFEngine(make_tiny_llama(64), progress=False).check_model(tiny_model_dir, want)  # built in memory


def test_clear_prefix_cache_recomputes_the_prefix(tiny_model, monkeypatch):
    engine = HFEngine(tiny_model, progress=False)
    first = engine.score([1, 5, 6, 7], [[3], [8]], [[4]])
    calls = []
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda **kw: calls.append(kw["input_ids"].shape[1]) or forward(**kw))
    engine.score([1, 5, 6, 7], [[3], [8]], [[4]])
    engine.clear_prefix_cache()
    again = engine.score([1, 5, 6, 7], [[3], [8]], [[4]])
    monkeypatch.undo()
    assert calls == [2, 4, 2]  # the 2-node batch; then the prefix's 4 tokens and the batch again
    np.testing.assert_array_equal(again, first)


def test_closed_engine_says_so(tiny_model):
    engine = HFEngine(tiny_model, progress=False)
    engine.score([1, 2], [[3]], [[4]])
    engine.close()
    with pytest.raises(ValueError, match="this hf engine is closed"):
        engine.score([1, 2], [[3]], [[4]])
    with pytest.raises(ValueError, match="this hf engine is closed"):
        engine.generate([1, 2], [[3]], stop_ids=[], max_new_tokens=2)
    engine.release("anything")  # nothing held: nothing to do
    engine.close()  # twice is fine


def test_generate_refuses_bad_input(tiny_model):
    engine = HFEngine(tiny_model, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0 \\(hf engine\\)"):
        engine.generate([1], [[3]], stop_ids=[], max_new_tokens=0)
    with pytest.raises(ValueError, match="query 0 has no tokens"):
        engine.generate([1], [[]], stop_ids=[], max_new_tokens=1)
    assert engine.generate([1], [], stop_ids=[], max_new_tokens=1) == []


def test_generation_equals_transformers_generate(tok, tiny_model):
    """Queries of different lengths sharing their first tokens, after an ICL prefix and after none:
    every answer equals transformers' own greedy search, cut at the first stop token."""
    from transformers import GenerationConfig

    builder = make_builder(tok)
    ex = exemplars(TaskSpec(angle=ANGLE), 0, 3)
    queries = builder.queries([1, 12, 12, 50, 7], [23, 3, 30, 5, 7])
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    engine = HFEngine(tiny_model, token_budget=16, progress=False)  # several packed batches
    for prefix in (builder.prefix(ex.n1, ex.n2, ex.truth), builder.start()):
        free = engine.generate(prefix, queries, stop_ids=[], max_new_tokens=5)
        stop = [free[0][2], free[3][1]]  # tokens some answers reach: they stop there
        got = engine.generate(prefix, queries, stop_ids=stop, max_new_tokens=5)
        assert sum(len(a) < 5 for a in got) >= 2
        for q, answer, run in zip(queries, got, free):
            ids = torch.tensor([prefix + q])
            with torch.no_grad():
                want = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            want = want[0, ids.shape[1]:].tolist()
            assert run == want
            assert answer == next((want[:i] for i, t in enumerate(want) if t in stop), want)
        assert len({tuple(r) for r in free}) > 1  # the queries' answers differ: a mix-up would show
