"""Attention for a token tree over a cached prefix, without an attention mask.

A packed batch of n tree nodes attends to P prefix tokens (every node sees all of them) and to
its own ancestors in the tree (at most a handful: a query is ~6 tokens). A dense mask over
n x (P + n) keys makes the kernel compute all n x n node pairs and throw almost all of them
away: at a 1,024-node batch that is 24% of the attention work at K=200 (P = 3,317), 86% at K=10
(P = 166), and all of it with no prefix. So the two parts are computed apart and merged:

- prefix part: one unmasked attention per batch and layer, the query heads that share a KV head
  folded into rows (no repeated K/V), giving outputs and their log-sum-exp: torch's flash kernel,
  or (the engine's `prefix_kernel="gemm"`) two GEMMs around an fp32 softmax, compiled;
- tree part: each node's keys gathered from its ancestors (n x L, L = tree depth + 1), scored
  directly;
- merge: the two partial softmaxes combined by their log-sum-exps (exact, as in flash attention's
  blockwise softmax).

Sliding-window layers (engine/windows.py): a node at depth d sits at position P + d, so it sees
the prefix from P + d - window + 1 on: nodes are grouped by depth, one flash call per depth on
that slice of the prefix; ancestors more than window - 1 steps up are masked out of the tree part.

It plugs into transformers through `AttentionInterface` (models with
`_supports_attention_backend`: Llama, Qwen2, Mistral, ...): the engine runs the model without a
KV cache and passes the prefix K/V and the ancestor table in the `iclsft_tree` keyword, which
transformers hands to every attention call. CPU only: it uses torch's CPU flash-attention kernel
(the one that returns the log-sum-exp).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from iclsft.engine.windows import cuts
from iclsft.names import PREFIX_KERNELS

logger = logging.getLogger(__name__)

NAME = "iclsft_tree"
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class TreeContext:
    """What every layer's attention needs for one packed batch."""

    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): [1, G, P, D]
    ancestors: torch.Tensor  # [n, L] node indices: the node itself, its parent, ... (padded)
    bias: torch.Tensor  # [n, L] fp32: 0 where `ancestors` holds a real ancestor, -inf on padding
    windows: Sequence[int | None] = ()  # per layer: its sliding window (None: full attention); () = all full
    depth: torch.Tensor | None = None  # [n] each node's depth (position P + depth)
    # window -> per depth, (node indices at that depth, first visible prefix position): only for windows that cut
    prefix_slices: dict[int, list[tuple[torch.Tensor, int]]] = field(default_factory=dict)
    window_bias: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> `bias` with far ancestors -inf
    prefix_kernel: str = "flash"  # how the prefix part is computed (`prefix_attention`)

    @classmethod
    def build(cls, prefix_kv, parent: Sequence[int], device, windows: Sequence[int | None] = (),
              prefix_kernel: str = "flash") -> TreeContext:
        ancestors, valid = ancestor_table(parent)
        bias = np.where(valid, 0.0, -np.inf).astype(np.float32)
        depth = valid.sum(axis=1) - 1
        prefix_len = prefix_kv[0][0].shape[2] if prefix_kv else 0
        slices, window_bias = {}, {}
        for window in {w for w in windows if w is not None}:
            if not cuts(window, prefix_len, int(depth.max()) if len(depth) else 0):
                continue
            slices[window] = [(torch.from_numpy(np.flatnonzero(depth == d)).to(device),
                               max(0, prefix_len + int(d) - window + 1)) for d in np.unique(depth)]
            far = bias.copy()
            far[:, window:] = -np.inf  # column c holds the ancestor c steps up: c >= window is out of reach
            window_bias[window] = torch.from_numpy(far).to(device)
        return cls(prefix_kv, torch.from_numpy(ancestors).to(device), torch.from_numpy(bias).to(device),
                   tuple(windows), torch.from_numpy(depth).to(device), slices, window_bias, prefix_kernel)


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
    """The model routes attention through transformers' AttentionInterface with full or sliding-window
    attention (no score soft-capping), and runs on a CPU that has the kernel."""
    devices = {p.device.type for p in model.parameters()}
    if _FLASH is None or devices != {"cpu"} or not getattr(model, "_supports_attention_backend", False):
        return False
    return getattr(model.config, "attn_logit_softcapping", None) is None


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
    unsupported = [k for k in ("softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:  # `supported` keeps such models on the mask path; never compute something else silently
        raise NotImplementedError(f"tree attention does not implement {', '.join(unsupported)}")
    ctx = iclsft_tree
    layer = getattr(module, "layer_idx", None)
    window = ctx.windows[layer] if ctx.windows else None
    if kwargs.get("sliding_window") != window:  # the layer's own window must be the one the engine read
        raise NotImplementedError(f"layer {layer} asks for sliding window {kwargs.get('sliding_window')}"
                                  f" but the engine read {window} from the model's masks")
    _, heads, n, dim = query.shape
    groups = key.shape[1]
    rep = heads // groups
    scale = dim**-0.5 if scaling is None else scaling
    # heads h = g * rep + j use KV head g (transformers' repeat_kv order): fold j into the rows
    q = query.reshape(1, groups, rep * n, dim)

    # tree part, in fp32: scores of each node against itself and its ancestors, [G, n, rep, L]
    k_anc = key[0][:, ctx.ancestors].float()  # [G, n, L, D]
    v_anc = value[0][:, ctx.ancestors].float()
    qf = q[0].float().view(groups, rep, n, dim).transpose(1, 2)  # [G, n, rep, D]
    bias = ctx.window_bias.get(window, ctx.bias)
    scores = torch.matmul(qf, k_anc.transpose(-1, -2)).mul_(scale).add_(bias[:, None, :])
    top = scores.amax(-1)  # [G, n, rep]; the node itself is always there, so finite
    prefix_k, prefix_v = ctx.prefix_kv[module.layer_idx] if ctx.prefix_kv else (None, None)
    if prefix_k is not None and prefix_k.shape[2]:
        if window in ctx.prefix_slices:
            o_pre, lse_pre = _windowed_prefix(query, prefix_k, prefix_v, scale, ctx.prefix_slices[window],
                                              ctx.prefix_kernel)
        else:
            o_pre, lse_pre = prefix_attention(q, prefix_k, prefix_v, scale, ctx.prefix_kernel)
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


PREFIX_SCORES = 2**19  # scores per KV head of one compiled call (2 MiB of fp32: rows x prefix keys stay in cache)
PREFIX_CHUNK = 128  # rows per compiled call at least (each call costs Python and dispatch)
_compiled = None  # the compiled prefix part; False once compiling failed on this machine (flash from then on)


def _prefix_part(q, k, v, scale: float):
    """Exact attention of rows q [1, G, m, D] to every key: bf16 GEMMs (fp32 accumulation inside), the
    softmax in fp32. Returns outputs [1, G, m, D] fp32 and log-sum-exps [1, G, m]."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    top = scores.amax(-1, keepdim=True)
    weights = (scores - top).exp()
    total = weights.sum(-1, keepdim=True)
    return torch.matmul(weights.to(v.dtype), v).float() / total, (top + total.log()).squeeze(-1)


def prefix_attention(q, k, v, scale: float, kernel: str = "flash"):
    """Rows q [1, G, m, D] against the prefix k, v [1, G, P, D]: (outputs, log-sum-exps). `flash`: torch's
    CPU flash kernel. `gemm`: the same sums as two GEMMs in q's dtype around an fp32 softmax, fused by
    torch.compile and run in chunks of rows; in bf16 on CPUs with native bf16 1.2-1.4x the bf16 flash
    kernel (which is no faster than its fp32 one), but its q.k products are rounded to bf16 before the
    softmax (docs/throughput.md). Where compiling fails (no C++ compiler) gemm falls back to flash, said once."""
    global _compiled
    if kernel not in PREFIX_KERNELS:
        raise ValueError(f"prefix kernel {kernel!r} is not one of {', '.join(PREFIX_KERNELS)}")
    if kernel == "gemm" and _compiled is None:
        _compiled = torch.compile(_prefix_part, dynamic=True)
    if kernel == "flash" or _compiled is False:
        return _FLASH(q, k, v, scale=scale)[:2]
    try:
        rows = max(PREFIX_CHUNK, PREFIX_SCORES // max(k.shape[2], 1) // PREFIX_CHUNK * PREFIX_CHUNK)
        parts = [_compiled(q[:, :, s:s + rows], k, v, scale) for s in range(0, q.shape[2], rows)]
    except torch._dynamo.exc.BackendCompilerFailed as e:
        logger.warning("the compiled prefix attention is not available here (%s): using torch's flash kernel",
                       str(e).strip().splitlines()[0])
        _compiled = False
        return _FLASH(q, k, v, scale=scale)[:2]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


def _windowed_prefix(query, prefix_k, prefix_v, scale: float, slices,
                     kernel: str = "flash") -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix part under a sliding window: per depth, its nodes against the prefix slice they see.
    Returns outputs [G, n, rep, D] and log-sum-exps [G, n, rep] (-inf, with zero outputs, for a node
    that sees no prefix key: its weight in the merge is then 0)."""
    _, heads, n, dim = query.shape
    groups = prefix_k.shape[1]
    rep = heads // groups
    out = query.new_zeros((groups, n, rep, dim), dtype=torch.float32)
    lse = torch.full((groups, n, rep), -torch.inf, dtype=torch.float32, device=query.device)
    prefix_len = prefix_k.shape[2]
    for nodes, start in slices:
        if start >= prefix_len:
            continue
        m = len(nodes)
        q = query[:, :, nodes].reshape(1, groups, rep * m, dim)
        o, s = prefix_attention(q, prefix_k[:, :, start:], prefix_v[:, :, start:], scale, kernel)
        out[:, nodes] = o[0].float().view(groups, rep, m, dim).transpose(1, 2)
        lse[:, nodes] = s[0].float().view(groups, rep, m).transpose(1, 2)
    return out, lse
