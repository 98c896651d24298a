"""The prefix-KV helper (iclsft/engine/prefix_kv.py) that the hf engine, RSA and circuits share,
against plain forwards of the whole prompt on the tiny random Llama of conftest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iclsft.engine.prefix_kv import as_cache, cache_keyword, decoder_of, padded, prefix_kv, run_batch

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5  # fp32: the same function computed in pieces

PREFIX = [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309]
QUERIES = [[400, 401, 402], [403], [404, 405], [400, 401, 402, 406, 407]]


@torch.no_grad()
def plain_kv(model, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values from one forward of the whole sequence, the model making its own cache."""
    out = model(input_ids=torch.tensor([tokens]), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_kv_close(got, want) -> None:
    assert len(got) == len(want)
    for (k, v), (k2, v2) in zip(got, want):
        assert k.shape == k2.shape
        torch.testing.assert_close(k, k2, rtol=0, atol=TOL)
        torch.testing.assert_close(v, v2, rtol=0, atol=TOL)


@pytest.mark.parametrize("chunk", [None, 3])
def test_prefix_kv_equals_a_plain_forward(tiny_model, chunk):
    assert_kv_close(prefix_kv(tiny_model, PREFIX, chunk=chunk), plain_kv(tiny_model, PREFIX))
    assert prefix_kv(tiny_model, []) == []


def test_prefix_kv_reuses_what_it_shares(tiny_model, monkeypatch):
    """A longer prefix computes only its new tokens; a shorter one is a slice; a diverging one recomputes
    from where it parts. Each equals a plain forward of its own tokens."""
    first = prefix_kv(tiny_model, PREFIX[:6])
    calls = []
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda **kw: calls.append(kw["input_ids"].shape[1]) or forward(**kw))
    longer = prefix_kv(tiny_model, PREFIX, reuse=(PREFIX[:6], first))
    shorter = prefix_kv(tiny_model, PREFIX[:4], reuse=(PREFIX, longer))
    diverging = PREFIX[:8] + [500, 501]
    parted = prefix_kv(tiny_model, diverging, reuse=(PREFIX, longer))
    monkeypatch.undo()
    assert calls == [len(PREFIX) - 6, 2]  # the five new tokens, then the two past the shared eight; no slice call
    assert_kv_close(longer, plain_kv(tiny_model, PREFIX))
    assert_kv_close(shorter, plain_kv(tiny_model, PREFIX[:4]))
    assert_kv_close(parted, plain_kv(tiny_model, diverging))


@pytest.mark.parametrize("prefix", [PREFIX, []], ids=["prefix", "no-prefix"])
def test_run_batch_equals_plain_forwards(tiny_model, prefix):
    """Right-padded queries of different lengths after the shared prefix: each query's hidden states at
    its real tokens equal those of a plain forward of prefix + query alone."""
    decoder = decoder_of(tiny_model)
    kv = prefix_kv(decoder, prefix, config=decoder.config)
    ids, real = padded(QUERIES, pad_id=7)
    assert ids.tolist()[1] == [403, 7, 7, 7, 7] and real.sum(1).tolist() == [3, 1, 2, 5]
    with torch.no_grad():
        got = run_batch(decoder, kv, len(prefix), ids, real, config=decoder.config).last_hidden_state
        for r, q in enumerate(QUERIES):
            want = decoder(input_ids=torch.tensor([prefix + q])).last_hidden_state[0, len(prefix):]
            torch.testing.assert_close(got[r, : len(q)], want, rtol=0, atol=TOL)
    assert kv == [] or kv[0][0].shape[0] == 1  # the prefix itself was never expanded in place


def test_as_cache_expands_without_writing_the_prefix(tiny_model):
    kv = prefix_kv(tiny_model, PREFIX)
    before = [(k.clone(), v.clone()) for k, v in kv]
    cache = as_cache(kv, batch=3)
    assert cache.layers[0].keys.shape[0] == 3 and cache.get_seq_length() == len(PREFIX)
    decoder = decoder_of(tiny_model)
    with torch.no_grad():
        run_batch(decoder, kv, len(PREFIX), *padded(QUERIES[:3]))
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kv, before))  # never written
    assert kv[0][0].shape == (1, *before[0][0].shape[1:])
    assert as_cache([]).get_seq_length() == 0


def test_cache_keyword_follows_the_models_forward():
    class NewStyle(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return None

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    class Wrapper(torch.nn.Module):  # a peft model: forward(**kwargs), the transformers model inside
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):
            return self.inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    assert cache_keyword(NewStyle()) == "cache"
    assert cache_keyword(OldStyle()) == "past_key_values"
    assert cache_keyword(Wrapper(NewStyle())) == "cache"


def test_padded_refuses_an_empty_query():
    with pytest.raises(ValueError, match="every query needs at least one token"):
        padded([[1], []])
    np.testing.assert_array_equal(padded([[5, 6]])[0].numpy(), [[5, 6]])
