"""Attention for a token tree over a cached prefix, without an attention mask.

A packed batch of n tree nodes attends to P prefix tokens (every node sees all of them) and to
its own ancestors in the tree (at most a handful: a query is ~6 tokens). A dense mask over
n x (P + n) keys makes the kernel compute all n x n node pairs and throw almost all of them
away: at a 1,024-node batch that is 24% of the attention work at K=200 (P = 3,317), 86% at K=10
(P = 166), and all of it with no prefix. So the two parts are computed apart and merged:

- prefix part: one unmasked flash-attention call per batch and layer, the query heads that share
  a KV head folded into rows (no repeated K/V), giving outputs and their log-sum-exp;
- tree part: each node's keys gathered from its ancestors (n x L, L = tree depth + 1), scored
  directly;
- merge: the two partial softmaxes combined by their log-sum-exps (exact, as in flash attention's
  blockwise softmax).

It plugs into transformers through `AttentionInterface` (models with
`_supports_attention_backend`: Llama, Qwen2, Mistral, ...): the engine runs the model without a
KV cache and passes the prefix K/V and the ancestor table in the `iclsft_tree` keyword, which
transformers hands to every attention call. CPU only: it uses torch's CPU flash-attention kernel
(the one that returns the log-sum-exp).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

NAME = "iclsft_tree"
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class TreeContext:
    """What every layer's attention needs for one packed batch."""

    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): [1, G, P, D]
    ancestors: torch.Tensor  # [n, L] node indices: the node itself, its parent, ... (padded)
    bias: torch.Tensor  # [n, L] fp32: 0 where `ancestors` holds a real ancestor, -inf on padding

    @classmethod
    def build(cls, prefix_kv, parent: Sequence[int], device) -> TreeContext:
        ancestors, valid = ancestor_table(parent)
        bias = np.where(valid, 0.0, -np.inf).astype(np.float32)
        return cls(prefix_kv, torch.from_numpy(ancestors).to(device), torch.from_numpy(bias).to(device))


def ancestor_table(parent: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per node: itself and its ancestors (nearest first), padded with the node itself; and a validity mask."""
    parent = np.asarray(parent, dtype=np.int64)
    n = len(parent)
    columns, valid = [np.arange(n)], [np.ones(n, dtype=bool)]
    current, alive = np.arange(n), np.ones(n, dtype=bool)
    while n:
        nxt = np.where(alive, parent[current], -1)
        alive = nxt >= 0
        if not alive.any():
            break
        current = np.where(alive, nxt, current)
        columns.append(np.where(alive, current, np.arange(n)))
        valid.append(alive)
    return np.stack(columns, axis=1), np.stack(valid, axis=1)


def supported(model) -> bool:
    """The model routes attention through transformers' AttentionInterface with plain full attention (no
    sliding window, no score soft-capping), and runs on a CPU that has the kernel."""
    device = next(model.parameters()).device
    if _FLASH is None or device.type != "cpu" or not getattr(model, "_supports_attention_backend", False):
        return False
    config = model.config
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return not windowed and getattr(config, "attn_logit_softcapping", None) is None


@contextmanager
def activated(config):
    """Route the model's attention through `tree_attention` for the duration (the config is shared)."""
    _register()
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, tree_attention)
        _registered = True


def tree_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, iclsft_tree=None,
                   **kwargs):
    """query [1, H, n, D]; key, value [1, G, n, D]: the batch's own nodes (no cache is passed).
    Returns [1, n, H, D], as transformers' attention functions do."""
    if iclsft_tree is None:
        raise RuntimeError("tree attention called without its iclsft_tree context")
    unsupported = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:  # `supported` keeps such models on the mask path; never compute something else silently
        raise NotImplementedError(f"tree attention does not implement {', '.join(unsupported)}")
    _, heads, n, dim = query.shape
    groups = key.shape[1]
    rep = heads // groups
    scale = dim**-0.5 if scaling is None else scaling
    # heads h = g * rep + j use KV head g (transformers' repeat_kv order): fold j into the rows
    q = query.reshape(1, groups, rep * n, dim)

    # tree part, in fp32: scores of each node against itself and its ancestors, [G, n, rep, L]
    ctx = iclsft_tree
    k_anc = key[0][:, ctx.ancestors].float()  # [G, n, L, D]
    v_anc = value[0][:, ctx.ancestors].float()
    qf = q[0].float().view(groups, rep, n, dim).transpose(1, 2)  # [G, n, rep, D]
    scores = torch.matmul(qf, k_anc.transpose(-1, -2)).mul_(scale).add_(ctx.bias[:, None, :])
    top = scores.amax(-1)  # [G, n, rep]; the node itself is always there, so finite
    prefix_k, prefix_v = ctx.prefix_kv[module.layer_idx] if ctx.prefix_kv else (None, None)
    if prefix_k is not None and prefix_k.shape[2]:
        o_pre, lse_pre = _FLASH(q, prefix_k, prefix_v, scale=scale)[:2]
        o_pre = o_pre[0].float().view(groups, rep, n, dim).transpose(1, 2)  # [G, n, rep, D]
        lse_pre = lse_pre[0].float().view(groups, rep, n).transpose(1, 2)
        top = torch.maximum(top, lse_pre)
        w_pre = (lse_pre - top).exp_()
    weights = (scores - top[..., None]).exp_()
    # softmax over prefix and tree keys together: prefix part carries weight exp(lse_pre - top)
    total = weights.sum(-1)
    out = torch.matmul(weights, v_anc)  # [G, n, rep, D]
    if prefix_k is not None and prefix_k.shape[2]:
        out = out.add_(o_pre * w_pre[..., None])
        total = total.add_(w_pre)
    out = out.div_(total[..., None])
    # [G, n, rep, D] -> [1, n, H, D] with h = g * rep + j
    return out.permute(1, 0, 2, 3).reshape(1, n, heads, dim).to(query.dtype), None
