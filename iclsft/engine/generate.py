"""Greedy generation on the `hf` engine, for tasks whose answers are open (no closed label set).

The prefix's KV cache is the engine's (computed once, shared with scoring). Queries run in batches
of similar length: each batch extends a copy of the prefix cache, the queries left-padded up to
the batch's longest so that every row's last token is in the last column (pads are masked out and
positions continue after the prefix per row), then one forward per generated token for the whole
batch. Decoding a token costs one read of every weight, so batching is what makes it cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from iclsft.engine.hf import HFEngine

GENERATE_BATCH = 16


@torch.inference_mode()
def generate(engine: HFEngine, prefix: Sequence[int], queries: Sequence[Sequence[int]], *,
             stop: Sequence[int], adapter: str | None = None, max_new_tokens: int = 8,
             batch_size: int = GENERATE_BATCH) -> list[list[int]]:
    """Greedy continuation of prefix + each query, up to a token in `stop` (left out) or the limit."""
    if any(len(q) == 0 for q in queries):
        raise ValueError("every query needs at least one token")
    key = engine._activate(adapter)
    stop_ids = torch.tensor(sorted(set(int(t) for t in stop)), dtype=torch.long)
    out: list[list[int]] = [[] for _ in queries]
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    with engine._context(key):
        kv = engine.prefix_kv(prefix, key)
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            for r, new in zip(rows, _batch(engine, kv, len(prefix), [queries[i] for i in rows], stop_ids,
                                           max_new_tokens)):
                out[r] = new
    return out


def _batch(engine: HFEngine, kv, prefix_len: int, queries: list[Sequence[int]], stop_ids: torch.Tensor,
           max_new_tokens: int) -> list[list[int]]:
    b, width = len(queries), max(len(q) for q in queries)
    ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    positions = torch.full((b, width), prefix_len, dtype=torch.long)
    for r, q in enumerate(queries):
        n = len(q)
        ids[r, width - n:] = torch.tensor(list(q))
        mask[r, prefix_len + width - n:] = 1
        positions[r, width - n:] = torch.arange(prefix_len, prefix_len + n)
    next_pos = positions[:, -1] + 1
    cache = engine._cache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv]) if prefix_len else None
    new: list[list[int]] = [[] for _ in queries]
    done = torch.zeros(b, dtype=torch.bool)
    device = engine.device
    for _ in range(max_new_tokens):
        output = engine.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                              position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                              logits_to_keep=1)
        cache = output.past_key_values
        token = output.logits[:, -1].argmax(-1).cpu()
        done |= torch.isin(token, stop_ids)
        for r in torch.nonzero(~done).flatten().tolist():
            new[r].append(int(token[r]))
        if bool(done.all()):
            break
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
        positions = next_pos[:, None].clone()
        next_pos += 1
    return new
