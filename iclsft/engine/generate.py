"""Greedy generation on the `hf` engine, for tasks whose answers are open (no closed label set).

Like scoring (engine/hf.py), a batch of queries is one token tree after the engine's once-computed
prefix: queries that start alike (every code question starts with the same lines) share those
nodes. One forward over the tree gives each query's first token; then each step appends one node
per unfinished query to the same batch-1 cache, the mask letting it see the prefix, its query's
ancestors and its own earlier tokens. Nothing is copied per query: the prefix is never expanded,
and one step reads every weight once for all queries of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from iclsft.engine import windows
from iclsft.engine.hf import HFEngine, pack


@torch.inference_mode()
def generate(engine: HFEngine, prefix: Sequence[int], queries: Sequence[Sequence[int]], *,
             stop: Sequence[int], adapter: str | None = None, max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy continuation of prefix + each query, up to a token in `stop` (left out) or the limit."""
    if any(len(q) == 0 for q in queries):
        raise ValueError("every query needs at least one token")
    longest = len(prefix) + max(len(q) for q in queries) + max_new_tokens
    narrowest = min((w for w in engine.windows if w is not None), default=None)
    if narrowest is not None and windows.cuts(narrowest, 0, longest - 1):
        # The step masks below are plain causal-tree masks: past the window they would let a token see
        # keys the model's own attention hides, so refuse rather than generate from another model.
        raise ValueError(f"greedy generation does not apply sliding-window attention: the model's window is "
                         f"{narrowest} tokens and prompt + answer reach {longest}; use a shorter prompt (fewer "
                         "shots) or a model without sliding-window layers")
    key = engine._activate(adapter)
    stop_ids = torch.tensor(sorted(set(int(t) for t in stop)), dtype=torch.long)
    out: list[list[int]] = [[] for _ in queries]
    with engine._context(key):
        kv = engine.prefix_kv(prefix, key)
        for batch in pack(queries, [[0]], engine.token_budget):  # one 1-token "label": paths = queries
            index = [q for q, _ in batch.reads]
            last = [per_label[0][0][0] for _, per_label in batch.reads]
            for q, new in zip(index, _decode(engine, kv, len(prefix), batch, last, stop_ids, max_new_tokens)):
                out[q] = new
    return out


def _decode(engine: HFEngine, kv, prefix_len: int, batch, last: list[int], stop_ids: torch.Tensor,
            max_new_tokens: int) -> list[list[int]]:
    device = engine.device
    n = len(batch)
    tree = torch.from_numpy(batch.ancestor_mask())
    mask = torch.cat([torch.ones(n, prefix_len, dtype=torch.bool), tree], dim=1)
    cache = engine._cache(kv) if prefix_len else None
    output = engine.model(input_ids=torch.tensor([batch.tokens], device=device),
                          position_ids=torch.tensor([batch.depth], device=device) + prefix_len,
                          attention_mask=mask[None, None].to(device), past_key_values=cache, use_cache=True,
                          logits_to_keep=torch.tensor(last, device=device))
    cache = output.past_key_values
    token = output.logits[0].argmax(-1).cpu()
    rows = len(last)
    new: list[list[int]] = [[] for _ in range(rows)]
    own: list[list[int]] = [[] for _ in range(rows)]  # cache columns of each row's generated tokens
    ancestors = tree[last]  # (rows, n): each row's query path
    position = np.array([batch.depth[node] + 1 for node in last]) + prefix_len
    width = prefix_len + n
    active = list(range(rows))
    for step in range(max_new_tokens):
        stopped = torch.isin(token, stop_ids).tolist()
        active_next = []
        for r, tok, halt in zip(active, token.tolist(), stopped):
            if not halt:
                new[r].append(tok)
                active_next.append((r, tok))
        if not active_next or step == max_new_tokens - 1:
            break
        a = len(active_next)
        step_mask = torch.zeros(a, width + a, dtype=torch.bool)
        step_mask[:, :prefix_len] = True
        for i, (r, _) in enumerate(active_next):
            step_mask[i, prefix_len: prefix_len + n] = ancestors[r]
            step_mask[i, own[r]] = True
            step_mask[i, width + i] = True
            own[r].append(width + i)
        active = [r for r, _ in active_next]
        output = engine.model(input_ids=torch.tensor([[t for _, t in active_next]], device=device),
                              position_ids=torch.from_numpy(position[active])[None].to(device),
                              attention_mask=step_mask[None, None].to(device), past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        token = output.logits[0, :, :].argmax(-1).cpu()
        position[active] += 1
        width += a
    return new
