"""FLOP counting for the benchmark: model matmul FLOPs of a decoder forward, of the hf engine's packed
batches and of the naive loop, and the measured matmul peak they are compared with."""

from __future__ import annotations

import time
from collections.abc import Sequence


def forward_flops(config, tokens: int, cached: int = 0, head_rows: int | None = None, *,
                  keys: float | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of a decoder forward of `tokens` new tokens after `cached` cached ones.

    Counts the linear layers (q, k, v, o; gated MLP: gate, up, down), attention scores and values
    (4 * heads * head_dim per (token, key) pair and layer), and the output head on `head_rows` rows
    (default: every new token). `keys`: the (token, key) pairs attended, summed over the new tokens;
    default causal, each new token sees the cached ones, the new ones before it and itself. Norms,
    rotary embeddings, softmax and the embedding lookup are not matmuls and are left out.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    # q and o: hidden x heads*head_dim each; k and v: hidden x kv_heads*head_dim each; gate, up, down
    linear = 2 * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim + 3 * config.intermediate_size)
    if keys is None:
        keys = tokens * cached + tokens * (tokens + 1) / 2
    rows = tokens if head_rows is None else head_rows
    return layers * (tokens * linear + keys * 4 * heads * head_dim) + rows * 2 * hidden * config.vocab_size


def tree_flops(config, batches, prefix_len: int) -> tuple[float, int]:
    """FLOPs of the hf engine's packed batches (engine/hf.py `pack`), and their node count: each node
    attends to the prefix and to itself and its ancestors (depth + 1); the head runs at label rows."""
    flops, nodes = 0.0, 0
    for batch in batches:
        n = len(batch)
        rows = len({row for _, per_label in batch.reads for pairs in per_label for row, _ in pairs})
        keys = n * prefix_len + sum(d + 1 for d in batch.depth)
        flops += forward_flops(config, n, head_rows=rows, keys=keys)
        nodes += n
    return flops, nodes


def matmul_peak(dtype: str = "float32", n: int = 2048, seconds: float = 1.0, rounds: int = 3) -> float:
    """Measured GFLOP/s of square matmuls in `dtype`: the best of `rounds` rounds of about `seconds` each."""
    import torch

    torch_dtype = getattr(torch, dtype)
    a, b = torch.randn(n, n).to(torch_dtype), torch.randn(n, n).to(torch_dtype)
    t = time.perf_counter()
    a @ b  # warm-up, and the time of one product
    repeat = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = max(best, 2 * n**3 * repeat / (time.perf_counter() - t) / 1e9)
    return best


def naive_flops(config, prefix_len: int, queries: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> float:
    """The naive loop: one full forward (all logits) of prefix + query + label per (query, label)."""
    return sum(forward_flops(config, prefix_len + len(q) + len(label)) for q in queries for label in labels)
