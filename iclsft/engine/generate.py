"""Greedy generation on the `hf` engine, for tasks whose answers are open (no closed label set).

The prefix's KV cache is the engine's (computed once, shared with scoring); each query then runs
on its own: one forward over the query's tokens, one per generated token. A new cache object per
query extends the shared prefix tensors by concatenation, so the prefix itself is never written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from iclsft.engine.hf import HFEngine


@torch.inference_mode()
def generate(engine: HFEngine, prefix: Sequence[int], queries: Sequence[Sequence[int]], *,
             stop: Sequence[int], adapter: str | None = None, max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy continuation of prefix + each query, up to a token in `stop` (left out) or the limit."""
    if not queries:
        return []
    key = engine._activate(adapter)
    stop = set(int(t) for t in stop)
    out: list[list[int]] = []
    with engine._context(key):
        kv = engine.prefix_kv(prefix, key)
        for query in queries:
            cache = engine._cache(kv) if prefix else None
            ids, pos, new = list(query), len(prefix), []
            for _ in range(max_new_tokens):
                logits = engine.model(
                    input_ids=torch.tensor([ids], device=engine.device),
                    position_ids=torch.arange(pos, pos + len(ids), device=engine.device)[None],
                    past_key_values=cache, use_cache=True, logits_to_keep=1,
                )
                cache = logits.past_key_values
                token = int(logits.logits[0, -1].argmax())
                if token in stop:
                    break
                new.append(token)
                pos += len(ids)
                ids = [token]
            out.append(new)
    return out
