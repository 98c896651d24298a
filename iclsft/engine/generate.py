"""Greedy generation for the `hf` engine (its implementation module: `HFEngine.generate` calls it).

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
from iclsft.engine.prefix_kv import KV, as_cache


def check_windows(layer_windows: Sequence[int | None], longest: int) -> None:
    """Refuse generation whose prompt + answer (`longest` tokens) outgrows a sliding window: the step
    masks below are plain causal-tree masks, and past the window they would let a token see keys the
    model's own attention hides."""
    narrowest = min((w for w in layer_windows if w is not None), default=None)
    if narrowest is not None and windows.cuts(narrowest, 0, longest - 1):
        raise ValueError(f"greedy generation does not apply sliding-window attention: the model's window is "
                         f"{narrowest} tokens and prompt + answer reach {longest}; use a shorter prompt (fewer "
                         "shots) or a model without sliding-window layers")


def decode(model, kv: KV, prefix_len: int, tokens: Sequence[int], depth: Sequence[int], tree: np.ndarray,
           last: Sequence[int], stop_ids: torch.Tensor, max_new_tokens: int, *, device,
           keyword: str) -> list[list[int]]:
    """Greedy tokens after each query of one packed tree (`tokens`, `depth`, ancestor mask `tree`;
    `last`: each query's last node), up to a token in `stop_ids` (left out) or `max_new_tokens`.
    `keyword`: the model's cache keyword (engine/prefix_kv.py)."""
    n = len(tokens)
    tree = torch.from_numpy(tree)
    mask = torch.cat([torch.ones(n, prefix_len, dtype=torch.bool), tree], dim=1)
    cache = as_cache(kv)  # batch 1, full layers; every step appends to it
    output = model(input_ids=torch.tensor([list(tokens)], device=device),
                   position_ids=torch.tensor([list(depth)], device=device) + prefix_len,
                   attention_mask=mask[None, None].to(device), use_cache=True, **{keyword: cache},
                   logits_to_keep=torch.tensor(list(last), device=device))
    token = output.logits[0].argmax(-1).cpu()
    rows = len(last)
    new: list[list[int]] = [[] for _ in range(rows)]
    own: list[list[int]] = [[] for _ in range(rows)]  # cache columns of each row's generated tokens
    ancestors = tree[list(last)]  # (rows, n): each row's query path
    position = np.array([depth[node] + 1 for node in last]) + prefix_len
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
        output = model(input_ids=torch.tensor([[t for _, t in active_next]], device=device),
                       position_ids=torch.from_numpy(position[active])[None].to(device),
                       attention_mask=step_mask[None, None].to(device), use_cache=True, **{keyword: cache})
        token = output.logits[0, :, :].argmax(-1).cpu()
        position[active] += 1
        width += a
    return new
