"""Greedy generation for the `hf` engine (its implementation module: `HFEngine.generate` calls it).

Like scoring (engine/hf.py), a batch of queries is one token tree after the engine's once-computed
prefix: queries that start alike (every code question starts with the same lines) share those
nodes. One forward over the tree gives each query's first token; then each step appends one node
per unfinished query to the same batch-1 cache, the mask letting it see the prefix, its query's
ancestors and its own earlier tokens. Nothing is copied per query: the prefix is never expanded,
and one step reads every weight once for all queries of the batch.

Sliding-window layers (engine/windows.py) get their own masks: a cache column is visible to a token at
position p only if its position is above p - window (each column's position is kept: prefix tokens,
tree nodes at P + depth, generated tokens where they were appended). The cache keeps full layers, so
every layer's mask covers every column.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from iclsft.engine import windows
from iclsft.engine.prefix_kv import KV, as_cache


def decode(model, kv: KV, prefix_len: int, tokens: Sequence[int], depth: Sequence[int], tree: np.ndarray,
           last: Sequence[int], stop_ids: torch.Tensor, max_new_tokens: int, *, device,
           keyword: str, layer_windows: Sequence[int | None] = (None,), config=None) -> list[list[int]]:
    """Greedy tokens after each query of one packed tree (`tokens`, `depth`, ancestor mask `tree`;
    `last`: each query's last node), up to a token in `stop_ids` (left out) or `max_new_tokens`.
    `keyword`: the model's cache keyword (engine/prefix_kv.py); `layer_windows`: each layer's sliding
    window (None: full attention), `config` the model's (needed when layers differ)."""
    n = len(tokens)
    mask = windows.model_masks(config, layer_windows, prefix_len, depth, tree, device)
    tree = torch.from_numpy(tree)
    cache = as_cache(kv)  # batch 1, full layers; every step appends to it
    output = model(input_ids=torch.tensor([list(tokens)], device=device),
                   position_ids=torch.tensor([list(depth)], device=device) + prefix_len,
                   attention_mask=mask, use_cache=True, **{keyword: cache},
                   logits_to_keep=torch.tensor(list(last), device=device))
    token = output.logits[0].argmax(-1).cpu()
    rows = len(last)
    new: list[list[int]] = [[] for _ in range(rows)]
    own: list[list[int]] = [[] for _ in range(rows)]  # cache columns of each row's generated tokens
    ancestors = tree[list(last)]  # (rows, n): each row's query path
    position = np.array([depth[node] + 1 for node in last]) + prefix_len
    width = prefix_len + n
    columns = [torch.arange(prefix_len), torch.as_tensor(np.asarray(depth, dtype=np.int64)) + prefix_len]
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
        at = torch.from_numpy(position[active])  # the new tokens' positions
        columns.append(at)
        seen = torch.cat(columns)  # each cache column's position, the new tokens' included
        output = model(input_ids=torch.tensor([[t for _, t in active_next]], device=device),
                       position_ids=at[None].to(device),
                       attention_mask=windows.per_layer(config, layer_windows,
                                                        functools.partial(_within, step_mask, seen, at, device=device)),
                       use_cache=True, **{keyword: cache})
        token = output.logits[0, :, :].argmax(-1).cpu()
        position[active] += 1
        width += a
    return new


def _within(mask: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor, window: int | None, *,
            device) -> torch.Tensor:
    """[1, 1, a, width]: `mask` where each row (a token at position `rows[i]`) also sees only the columns
    whose positions are inside its window."""
    if window is not None:
        mask = mask & (columns[None, :] > rows[:, None] - window)
    return mask[None, None].to(device)
