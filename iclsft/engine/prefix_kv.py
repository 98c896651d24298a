"""Prefix KV batching: run a shared prefix once, then run many queries after its cached keys and values.

Used by the hf engine (scoring and greedy generation), RSA activations and circuit attribution. The
prefix's per-layer keys and values are computed once (`prefix_kv`; a cached prefix that shares its
first tokens is extended, not recomputed); a batch of right-padded queries then runs after them
(`run_batch`), the cache expanded to the batch as a view, positions continuing after the prefix.
Right padding keeps every real token's attention that of an unpadded prompt: causal attention never
looks ahead to the pads.

The cache travels in the forward keyword `cache` where the model has it (transformers >= 5.2x renamed
`past_key_values`, which warns and goes away in 5.40), else in `past_key_values`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch

# Tokens per prefix forward, at fixed positions (0, 256, 512, ...). A prefix is computed block by block and
# only whole blocks of a cached prefix are reused, so its KV (and the scores after it) never depends on which
# prompt the engine cached before: a resumed run, or a scorer given work in another order, scores as the
# single-process run does, to the last bit.
PREFIX_BLOCK = 256
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): [batch, kv heads, tokens, head dim]


def decoder_of(model):
    """The decoder stack (`model.model` for Llama-like LMs), also through a peft wrapper. With a LoRA
    adapter attached, its linear layers carry the adapter, so calling the decoder applies it."""
    return _unwrapped(model).get_decoder()


def _unwrapped(model):
    # a peft model's forward takes **kwargs and hands them to the transformers model it wraps
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


@functools.cache
def _keyword(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters  # follows transformers' deprecation wrappers
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """The forward keyword that takes a KV cache: `cache` (newer transformers) or `past_key_values`."""
    return _keyword(type(_unwrapped(model)))


def as_cache(kv: KV, *, batch: int | None = None, config=None):
    """A transformers DynamicCache holding `kv`, expanded to `batch` rows when given (a view: the cache
    concatenates new keys onto it, so the prefix tensors are never written). `config`: build the
    model's own cache layers (sliding-window layers keep only their window); None: full layers, which
    the hf engine needs because it slices the prefix per layer itself."""
    from transformers import DynamicCache

    if not kv:
        return DynamicCache(config=config) if config is not None else DynamicCache()
    if batch is not None:
        kv = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    return DynamicCache(ddp_cache_data=kv, config=config) if config is not None else DynamicCache(ddp_cache_data=kv)


@torch.no_grad()
def prefix_kv(model, prefix: Sequence[int], *, reuse: tuple[Sequence[int], KV] | None = None,
              chunk: int | None = None, block: int | None = None, config=None, **forward) -> KV:
    """Per-layer keys and values of `prefix` (batch 1). `reuse`: the tokens and KV of an earlier prefix;
    only the tokens past the longest start they share are computed (a shorter prefix is a free slice).
    `chunk`: at most this many tokens per forward. `config`: as in `as_cache`. `forward`: extra
    keywords for the model call (e.g. logits_to_keep=1 for a causal LM: no output head over the prefix)."""
    prefix = [int(t) for t in prefix]
    tokens, kv = reuse if reuse is not None else ((), [])
    common = 0
    if kv:
        for a, b in zip(tokens, prefix):
            if a != b:
                break
            common += 1
    if block and not (reuse is not None and common == len(prefix) == len(reuse[0])):
        # whole blocks only (the same prompt again is reused whole): a block's KV then comes from one
        # forward over that very block, whatever prompt was cached before
        common -= common % block
    start = [(k[:, :, :common], v[:, :, :common]) for k, v in kv] if common else []
    if common == len(prefix):
        return start
    cache = as_cache(start, config=config)
    device = _input_device(model)
    step = block or chunk or len(prefix)
    keyword = cache_keyword(model)
    for begin in range(common, len(prefix), step):
        ids = torch.tensor([prefix[begin : begin + step]], device=device)
        model(input_ids=ids, use_cache=True, **{keyword: cache}, **forward)
    return [(layer.keys, layer.values) for layer in cache.layers]


def padded(queries: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded query ids (batch, width) and which positions hold a real token."""
    if any(len(q) == 0 for q in queries):
        raise ValueError("every query needs at least one token")
    b, width = len(queries), max(len(q) for q in queries)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    real = torch.zeros((b, width), dtype=torch.bool)
    for r, q in enumerate(queries):
        ids[r, : len(q)] = torch.tensor([int(t) for t in q])
        real[r, : len(q)] = True
    return ids.to(device), real.to(device)


def run_batch(decoder, kv: KV, prefix_len: int, ids: torch.Tensor, real: torch.Tensor, *, config=None):
    """One forward of a batch of right-padded queries (`ids`, `real`: as from `padded`) after a prefix of
    `prefix_len` tokens whose keys and values are `kv` (batch 1; [] without a prefix). Returns the
    model's output; gradients flow as the caller's autograd mode allows."""
    b, width = ids.shape
    mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long, device=ids.device), real.long()], dim=1)
    cache = as_cache(kv, batch=b, config=config) if kv else None
    return decoder(input_ids=ids, attention_mask=mask, use_cache=cache is not None,
                   position_ids=(torch.arange(width, device=ids.device) + prefix_len).expand(b, -1),
                   **{cache_keyword(decoder): cache})


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device
