"""The hf engine's token budget (tree nodes per packed forward) for the device, and multi-GPU plans.

On CPUs the budget is 1,024 (measured: docs/throughput.md; larger batches gain nothing there). On
CUDA it is the largest n whose transient memory fits in a share of the free memory:

    a * n**2 + b * n  <=  FREE_SHARE * free - fixed                      (bytes)

    b = s * (8 * hidden + 4 * intermediate)   one layer's activations per node (residual, norm, q, k, v,
                                              attention out, projections; the MLP's gate, up, product)
      + s * 2 * layers * kv_dim               the batch's keys and values, kept in the cache for all layers
      + (s + 8) * vocab                       one output row per node: logits (s bytes), fp32 copy, log-softmax
      + (s + 3) * P                           the mask's prefix columns (bool, SDPA's float bias, a copy)
    a = (s + 3)                               the mask's node columns (same three copies)
    fixed = s * 2 * layers * kv_dim * P       the cache's copy of the prefix keys and values

with s the bytes per weight element (2 for bf16), kv_dim = key-value heads x head dim, P = PREFIX_TOKENS
(the budget is set once per engine, before any prefix is seen: 8,192 covers a K=200 prompt of the
2D task, ~3,300 tokens, with room). `free` is the smallest free memory over the GPUs that hold the
model (each layer's activations live on its own GPU; counting all of them on the fullest is the
safe side), plus what torch's allocator has reserved but not used. The result is rounded down to a
multiple of 64 and kept within [MIN_BUDGET, MAX_BUDGET]: past 8,192 nodes the dense ancestor mask,
built on the host, costs more than the fewer forwards save.
"""

from __future__ import annotations

import math

from iclsft.models import free_cuda_bytes

CPU_BUDGET = 1024
MIN_BUDGET = 64
MAX_BUDGET = 8192
FREE_SHARE = 0.8  # of the free memory; the rest absorbs allocator fragmentation and the prefix's own passes
PREFIX_TOKENS = 8192


def cuda_budget(*, free_bytes: int, element_bytes: int, hidden: int, intermediate: int, layers: int, kv_dim: int,
                vocab: int, prefix_tokens: int = PREFIX_TOKENS) -> int:
    """The CUDA token budget from free memory and the model's shape (formula in the module docstring)."""
    s = element_bytes
    b = s * (8 * hidden + 4 * intermediate) + s * 2 * layers * kv_dim + (s + 8) * vocab + (s + 3) * prefix_tokens
    a = s + 3
    room = FREE_SHARE * free_bytes - s * 2 * layers * kv_dim * prefix_tokens
    if room <= 0:
        return MIN_BUDGET
    n = (-b + math.sqrt(b * b + 4 * a * room)) / (2 * a)
    return int(min(MAX_BUDGET, max(MIN_BUDGET, n // 64 * 64)))


def model_shape(config) -> dict[str, int]:
    """The sizes `cuda_budget` needs, from a transformers config (its text part for multimodal ones)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return dict(hidden=hidden, intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
                layers=int(text.num_hidden_layers), kv_dim=kv_heads * head_dim, vocab=int(text.vocab_size))


def model_devices(model) -> list:
    """The devices that hold the model's parameters, in first-use order."""
    import torch

    seen: dict[str, torch.device] = {}
    for p in model.parameters():
        seen.setdefault(str(p.device), p.device)
    return list(seen.values())


def auto_token_budget(model) -> int:
    """CPU_BUDGET when any of the model is on the CPU; else the CUDA budget for its GPUs' free memory."""
    devices = model_devices(model)
    if any(d.type != "cuda" for d in devices):
        return CPU_BUDGET
    free = min(free_cuda_bytes(d) for d in devices)
    element_bytes = next(model.parameters()).element_size()
    return cuda_budget(free_bytes=free, element_bytes=element_bytes, **model_shape(model.config))
