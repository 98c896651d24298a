"""The benchmark's FLOP counter, the hf engine's fast paths against the naive forward, and the
`bench` command, on the tiny random Llama of conftest (2 layers, GQA, large init, real vocabulary).

Fast paths guarded here (each against `naive_score`, one full forward per (query, label)):
tree attention (engine/tree_attention.py) vs the dense-mask SDPA path, with and without a prefix,
and LoRA adapters merged into the weights vs unmerged. fp32 tolerance 1e-4 as in
test_engine_hf.py (measured differences ~4e-6; a wrong mask, position or adapter moves the tiny
model's log-probs by 0.1 to whole nats).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_llama

from iclsft import bench
from iclsft.engine import tree_attention
from iclsft.engine.hf import HFEngine, pack
from iclsft.engine.reference import naive_score
from iclsft.prompts import PromptBuilder
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks.linear2d import exemplars

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
# bf16 vs the fp32 naive reference: test_engine_hf.py measured 0.09-0.15 nats on this tiny model for the
# mask path and for naive bf16 itself (bf16 rounding through a large-init model, not packing); tree
# attention keeps its own softmax and merge in fp32, so the same bound applies.
BF16_TOL = 0.3
POINTS = [(1, 23), (12, 3), (12, 30), (12, 31), (99, 99), (5, 50), (50, 5), (7, 7), (40, 41), (40, 42)]


# -- FLOP counting -----------------------------------------------------------------------------------------


def test_forward_flops_hand_count(tiny_model):
    """hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads. Per token and layer, linear layers:
    2 * (q 64*64 + k, v 2*64*32 + o 64*64 + gate, up, down 3*64*128) = 73,728; per attended
    (token, key) pair and layer: 4 * 4 heads * 16 = 256; per head row: 2 * 64 * vocab."""
    config = tiny_model.config
    vocab = config.vocab_size
    # 5 new tokens after 3 cached ones, causal: 5*3 + (1+2+3+4+5) = 30 pairs; head on 2 rows
    assert bench.forward_flops(config, 5, 3, head_rows=2) == 2 * (5 * 73_728 + 30 * 256) + 2 * 2 * 64 * vocab
    assert bench.forward_flops(config, 5, 3, head_rows=2, keys=7) == 2 * (5 * 73_728 + 7 * 256) + 256 * vocab
    assert bench.forward_flops(config, 1) == 2 * (73_728 + 256) + 128 * vocab  # head on every token by default


def test_forward_flops_matches_torch_flop_counter(smollm_tokenizer):
    """torch's FlopCounterMode counts the same matmuls in a real forward (eager attention: it sees the
    score and value matmuls over the full 7 x 7 square, i.e. keys = 49)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_tiny_llama(len(smollm_tokenizer))
    model.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(input_ids=torch.arange(7)[None])
    assert counter.get_total_flops() == bench.forward_flops(model.config, 7, keys=49)


def test_tree_flops_counts_ancestors_and_label_rows(tiny_model):
    queries, labels = [[1, 5], [1, 2, 4], [1, 2, 3]], [[7], [8, 9]]
    (batch,) = pack(queries, labels, token_budget=64)  # 8 nodes, depths 0,1,2,3,2,3,1,2 (test_engine_hf)
    rows = {r for _, per_label in batch.reads for pairs in per_label for r, _ in pairs}
    assert len(rows) == 6  # 3 last query nodes + 3 "8" nodes
    flops, nodes = bench.tree_flops(tiny_model.config, [batch], prefix_len=10)
    keys = 8 * 10 + sum(d + 1 for d in batch.depth)
    assert nodes == 8
    assert flops == bench.forward_flops(tiny_model.config, 8, head_rows=6, keys=keys)


# -- tree attention ------------------------------------------------------------------------------------------


def test_ancestor_table():
    # 0 <- 1 <- 2, 1 <- 3, root 4
    ancestors, valid = tree_attention.ancestor_table([-1, 0, 1, 1, -1])
    assert ancestors.shape == valid.shape == (5, 3)
    got = [[int(a) for a, v in zip(row, ok) if v] for row, ok in zip(ancestors, valid)]
    assert got == [[0], [1, 0], [2, 1, 0], [3, 1, 0], [4]]
    ancestors, valid = tree_attention.ancestor_table([])
    assert ancestors.shape[0] == 0


@pytest.fixture(scope="module")
def cases(smollm_tokenizer, tiny_model):
    """prefix length -> (prefix, queries, labels, naive fp32 scores)."""
    b = PromptBuilder(smollm_tokenizer, TemplateSpec(bos="never"), (" Baz", " Rud"))
    queries = b.queries([p[0] for p in POINTS], [p[1] for p in POINTS])
    ex = exemplars(TaskSpec(angle=30.0), 0, 6)
    out = {}
    for prefix in ([], b.prefix(ex.n1, ex.n2, ex.truth)):
        out[len(prefix)] = (prefix, queries, b.label_ids, naive_score(tiny_model, prefix, queries, b.label_ids))
    return out


@pytest.mark.parametrize("attention", ["tree", "mask"])
@pytest.mark.parametrize("budget", [12, 4096])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_attention_paths_match_naive(cases, tiny_model, attention, budget, with_prefix):
    prefix, queries, labels, expected = cases[max(cases)] if with_prefix else cases[0]
    assert np.ptp(expected[:, 0] - expected[:, 1]) > 0.1  # a bug would show
    engine = HFEngine(tiny_model, token_budget=budget, attention=attention, progress=False)
    assert engine.attention == attention
    np.testing.assert_allclose(engine.score(prefix, queries, labels), expected, rtol=0, atol=TOL)


def test_auto_attention_is_tree_on_cpu(tiny_model):
    assert HFEngine(tiny_model, progress=False).attention == "tree"
    with pytest.raises(ValueError, match="attention 'flash' is not one of"):
        HFEngine(tiny_model, attention="flash")


def test_tree_attention_bf16(cases, tiny_model):
    import copy

    prefix, queries, labels, expected = cases[max(cases)]
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    got = HFEngine(model, attention="tree", progress=False).score(prefix, queries, labels)
    err = np.abs(got - expected)
    assert 0 < err.max() < BF16_TOL and err.mean() < BF16_TOL / 3


def test_tree_context_leaves_the_model_as_it_was(cases, tiny_model):
    """The attention implementation is switched for the forward only; plain calls still use SDPA."""
    prefix, queries, labels, _ = cases[max(cases)]
    before = tiny_model.config._attn_implementation
    HFEngine(tiny_model, attention="tree", progress=False).score(prefix, queries[:2], labels)
    assert tiny_model.config._attn_implementation == before == "sdpa"


# -- merged LoRA ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(smollm_tokenizer, tmp_path_factory, tiny_model_dir):
    pytest.importorskip("peft")
    return str(bench.random_adapter(tiny_model_dir, tmp_path_factory.mktemp("bench-adapter") / "a", rank=4, seed=3))


@pytest.mark.parametrize("merge_lora", [True, False])
def test_adapter_paths_match_naive(cases, smollm_tokenizer, adapter, merge_lora):
    from peft import PeftModel

    vocab = len(smollm_tokenizer)
    prefix, queries, labels, base_expected = cases[max(cases)]
    expected = naive_score(PeftModel.from_pretrained(make_tiny_llama(vocab), adapter).eval(), prefix, queries, labels)
    assert np.abs(expected - base_expected).max() > 0.1  # the adapter matters
    model = make_tiny_llama(vocab)
    weights = {name: p.clone() for name, p in model.named_parameters()}
    engine = HFEngine(model, token_budget=16, merge_lora=merge_lora, progress=False)
    np.testing.assert_allclose(engine.score(prefix, queries, labels, adapter=adapter), expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(engine.score(prefix, queries, labels), base_expected, rtol=0, atol=TOL)
    engine.release(adapter)
    # the base weights are back, bit for bit (merging swaps tensors; it never adds and subtracts in place)
    assert all(torch.equal(p, weights[name]) for name, p in engine.model.named_parameters())


# -- the benchmark and its command ---------------------------------------------------------------------------


@pytest.fixture
def fast_peak(monkeypatch):
    from iclsft.bench import run

    monkeypatch.setattr(run, "matmul_peak", lambda dtype, n=0, **_: 100.0 if dtype == "float32" else 10.0)


def test_run_bench_on_tiny_model(tiny_model_dir, fast_peak, tmp_path):
    pytest.importorskip("peft")
    spec = bench.BenchSpec(model=str(tiny_model_dir), shots=(2,), queries=30, adapters=1, lora_rank=4,
                           methods=("naive", "hf", "hf-mask"), naive_sample=2, vllm_sample=3)
    results = bench.run_bench(spec)
    rows = {(r["work"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {(w, m) for w in ("ICL K=2", "adapters r=4") for m in ("naive", "hf", "hf-mask")}
    for (work, method), r in rows.items():
        assert r["qps"] > 0 and r["gflops"] > 0
        assert r["queries_timed"] == (2 if method == "naive" else 30)
        assert r["extrapolated"] == (method == "naive")
        if method != "naive":
            assert r["max_abs_diff_vs_naive"] < TOL
            assert r["speedup"]["naive"] == pytest.approx(r["qps"] / rows[(work, "naive")]["qps"])
    assert rows[("ICL K=2", "hf")]["prefix_tokens"] > 0 and rows[("adapters r=4", "hf")]["prefix_tokens"] == 0
    json_path, md_path = bench.write_results(results, tmp_path / "tp")
    assert json.loads(json_path.read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    table = md_path.read_text()
    assert "| ICL K=2 (P=" in table and "2* |" in table and "fp32 100.0 GFLOP/s" in table


def test_bench_spec_rejects_bad_input():
    with pytest.raises(ValueError, match="methods"):
        bench.BenchSpec(methods=("hf", "fast"))
    with pytest.raises(ValueError, match="queries 0"):
        bench.BenchSpec(queries=0)
    with pytest.raises(ValueError, match="naive_sample 50"):
        bench.BenchSpec(queries=20, naive_sample=50)


def test_bench_command(tiny_model_dir, fast_peak, tmp_path):
    from iclsft.cli import main

    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny_model_dir), "--queries", "20", "--shots", "2",
                                       "--naive-sample", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| ICL K=2 (P=" in result.output and "hf engine (ours)" in result.output
    assert (out / "throughput.json").is_file() and (out / "throughput.md").is_file()
    bad = CliRunner().invoke(main, ["bench", "--model", str(tiny_model_dir), "--queries", "0"])
    assert bad.exit_code == 1 and "queries 0" in bad.output


def test_softcapped_attention_stays_on_the_mask_path(smollm_tokenizer):
    """Tree attention implements full and sliding-window attention (tests/test_engine_window.py), not score
    soft-capping: such a model keeps SDPA with the mask; and the attention function refuses a window it
    was not given rather than ignore it."""
    model = make_tiny_llama(len(smollm_tokenizer))
    model.config.attn_logit_softcapping = 50.0
    assert not tree_attention.supported(model) and HFEngine(model, progress=False).attention == "mask"
    with pytest.raises(ValueError, match="attention='tree' needs"):
        HFEngine(model, attention="tree")
    context = tree_attention.TreeContext.build([], [-1], "cpu")
    with pytest.raises(NotImplementedError, match="sliding window 64"):
        q, kv = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 1, 16)
        tree_attention.tree_attention(None, q, kv, kv, iclsft_tree=context, sliding_window=64)
