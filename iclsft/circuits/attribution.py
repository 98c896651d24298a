"""Attribution patching scores (cheap, linear) and exact activation patching (for validation).

Hook points, per decoder layer i of a Llama-like LM (`model.model.layers[i]`, also through a peft
wrapper, whose LoRA layers then act in every forward):

    head (i, h)  the input of `self_attn.o_proj`, columns h*d : (h+1)*d: head h's attention output
                 before the output projection (forward pre-hook)
    mlp i        the output of the `mlp` module (forward hook)

Pairs are grouped by prefix. A prefix's KV cache is computed once without gradients and expanded
to each batch of right-padded queries, whose positions continue after the prefix
(iclsft.engine.prefix_kv, as for RSA activations). That is exact, not an approximation: attention is causal, so prefix
activations are the same in the clean and the corrupt run (their difference, hence their score, is
0), and a gradient with respect to query activations never needs to flow into the prefix. Right
padding leaves every real token's attention as in an unpadded prompt, and padded positions are
masked out of the scores and patches.

The gradient is taken through a zero tensor added at every hook point (a_clean + 0), so
d LD / d a(c) is the total derivative, with every later component responding, for all components
from one backward pass; the model's parameter gradients are neither needed nor touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from iclsft.circuits.scores import ComponentScores, PromptPair, check_pairs
from iclsft.engine.prefix_kv import KV, decoder_of, padded, prefix_kv, run_batch

DEFAULT_BATCH = 16
Hook = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, activation) -> activation to use


def attribution_scores(model, pairs: Sequence[PromptPair], *, batch_size: int = DEFAULT_BATCH) -> ComponentScores:
    """Attribution patching score per head and MLP block, averaged over pairs:
    s(c) = sum over query positions and dims of (a_corrupt(c) - a_clean(c)) * dLD_clean/da(c).
    One clean forward + backward and one corrupt forward per batch of pairs."""
    return _scores(model, pairs, batch_size, _attribute)


def patching_scores(model, pairs: Sequence[PromptPair], *, alpha: float = 1.0,
                    batch_size: int = DEFAULT_BATCH) -> ComponentScores:
    """Exact activation patching per head and MLP block, averaged over pairs: LD of the clean run with
    that one component's activation at every query position set to a_clean + alpha * (a_corrupt -
    a_clean), minus LD of the clean run. alpha = 1 is plain patching (clean -> corrupt); as alpha -> 0,
    score / alpha -> the attribution score. Costs (layers x (heads + 1) + 2) forwards per batch: meant
    for tiny models and tests."""
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    return _scores(model, pairs, batch_size, lambda m, batch: _patch(m, batch, float(alpha)))


@dataclass
class _Batch:
    clean: torch.Tensor  # (b, w) query ids, right-padded
    corrupt: torch.Tensor  # (b, w)
    real: torch.Tensor  # (b, w) bool: a query token, not padding
    last: torch.Tensor  # (b,) answer position: the last query token
    target: torch.Tensor  # (b,) first token of the clean answer
    foil: torch.Tensor  # (b,) first token of the foil
    prefix_len: int
    kv: KV  # prefix keys and values per layer, batch 1; [] without prefix


class _Model:
    """The parts of a (possibly peft-wrapped) Llama-like causal LM that scoring needs."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = decoder_of(model)
        self.lm_head = base.get_output_embeddings()
        self.layers = self.decoder.layers
        first = self.layers[0]
        if not hasattr(first, "mlp") or not hasattr(getattr(first, "self_attn", None), "o_proj"):
            raise ValueError(f"{type(first).__name__} has no self_attn.o_proj and mlp: circuit scores need a "
                             "Llama-like decoder layer")
        self.n_heads = self.decoder.config.num_attention_heads
        self.device = self.decoder.embed_tokens.weight.device

    def batches(self, pairs: Sequence[PromptPair], batch_size: int) -> Iterator[_Batch]:
        groups: dict[tuple[int, ...], list[PromptPair]] = {}
        for pair in pairs:
            groups.setdefault(pair.prefix, []).append(pair)
        for prefix, group in groups.items():
            kv = prefix_kv(self.decoder, prefix, config=self.decoder.config)  # no gradients: see the docstring
            for start in range(0, len(group), batch_size):
                yield self._batch(group[start : start + batch_size], len(prefix), kv)

    def _batch(self, chunk: list[PromptPair], prefix_len: int, kv: KV) -> _Batch:
        dev = self.device
        clean, real = padded([p.clean for p in chunk], 0, dev)  # pad id 0: padded positions are masked everywhere
        corrupt, _ = padded([p.corrupt for p in chunk], 0, dev)
        return _Batch(clean=clean, corrupt=corrupt, real=real,
                      last=torch.tensor([len(p.clean) - 1 for p in chunk], device=dev),
                      target=torch.tensor([p.target[0] for p in chunk], device=dev),
                      foil=torch.tensor([p.foil[0] for p in chunk], device=dev), prefix_len=prefix_len, kv=kv)

    def ld(self, batch: _Batch, ids: torch.Tensor) -> torch.Tensor:
        """LD = log p(target) - log p(foil) at the answer position, per pair, for prefix + ids. Equal to
        the logit difference: the softmax normaliser cancels."""
        out = run_batch(self.decoder, batch.kv, batch.prefix_len, ids, batch.real, config=self.decoder.config)
        hidden = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), batch.last]
        logits = _wide(self.lm_head(hidden))
        return logits.gather(1, batch.target[:, None])[:, 0] - logits.gather(1, batch.foil[:, None])[:, 0]


@contextmanager
def _hooks(m: _Model, attn: Hook | None = None, mlp: Hook | None = None, layers: Sequence[int] | None = None):
    """While active, `attn` sees (and may replace) the input of o_proj and `mlp` the MLP output, in `layers`."""
    handles = []
    try:
        for i in range(len(m.layers)) if layers is None else layers:
            layer = m.layers[i]
            if attn is not None:
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                    lambda _mod, args, i=i: (attn(i, args[0]), *args[1:])))
            if mlp is not None:
                handles.append(layer.mlp.register_forward_hook(lambda _mod, _args, out, i=i: mlp(i, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def _capture(m: _Model, batch: _Batch, ids: torch.Tensor) -> tuple[torch.Tensor, dict[tuple[str, int], torch.Tensor]]:
    """LD and every hooked activation of a forward without gradients."""
    acts: dict[tuple[str, int], torch.Tensor] = {}

    def keep(kind: str) -> Hook:
        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            acts[kind, i] = x
            return x
        return hook

    with torch.no_grad(), _hooks(m, keep("attn"), keep("mlp")):
        ld = m.ld(batch, ids)
    return ld, acts


def _attribute(m: _Model, batch: _Batch):
    clean: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def add_zero(kind: str) -> Hook:
        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            zero = torch.zeros_like(x, requires_grad=True)  # d LD / d zero = d LD / d x
            clean[kind, i] = (x.detach(), zero)
            return x + zero
        return hook

    with torch.enable_grad(), _hooks(m, add_zero("attn"), add_zero("mlp")):
        ld_clean = m.ld(batch, batch.clean)
        keys = list(clean)
        # Pairs are independent rows, so the gradient of the sum holds each pair's own gradient.
        grads = dict(zip(keys, torch.autograd.grad(ld_clean.sum(), [clean[k][1] for k in keys])))
    ld_corrupt, corrupt = _capture(m, batch, batch.corrupt)
    real = batch.real[..., None]
    b, n_layers = batch.clean.shape[0], len(m.layers)
    heads, mlps = _empty(b, n_layers, m.n_heads), _empty(b, n_layers)
    for i in range(n_layers):
        for kind in ("attn", "mlp"):
            a_clean = clean[kind, i][0]
            terms = (_wide(corrupt[kind, i]) - _wide(a_clean)) * _wide(grads[kind, i]) * real
            if kind == "attn":
                heads[:, i] = terms.reshape(*terms.shape[:2], m.n_heads, -1).sum(dim=(1, 3)).cpu()
            else:
                mlps[:, i] = terms.sum(dim=(1, 2)).cpu()
    return heads, mlps, ld_clean.detach(), ld_corrupt


def _patch(m: _Model, batch: _Batch, alpha: float):
    ld_corrupt, corrupt = _capture(m, batch, batch.corrupt)
    real = batch.real[..., None]
    b, n_layers = batch.clean.shape[0], len(m.layers)
    heads, mlps = _empty(b, n_layers, m.n_heads), _empty(b, n_layers)

    def patched(kind: str, columns: slice) -> Hook:
        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            # Only the patched component is changed, so x here is still the clean activation.
            new = torch.lerp(x[..., columns], corrupt[kind, i][..., columns], alpha)  # exactly corrupt at alpha 1
            x = x.clone()
            x[..., columns] = torch.where(real, new, x[..., columns])
            return x
        return hook

    with torch.no_grad():
        ld_clean = m.ld(batch, batch.clean)
        for i in range(n_layers):
            d = corrupt["attn", i].shape[-1] // m.n_heads
            for h in range(m.n_heads):
                with _hooks(m, attn=patched("attn", slice(h * d, (h + 1) * d)), layers=[i]):
                    heads[:, i, h] = (m.ld(batch, batch.clean) - ld_clean).cpu()
            with _hooks(m, mlp=patched("mlp", slice(None)), layers=[i]):
                mlps[:, i] = (m.ld(batch, batch.clean) - ld_clean).cpu()
    return heads, mlps, ld_clean, ld_corrupt


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision models (sums over positions and dims), fp64 kept for fp64 models."""
    return x if x.dtype == torch.float64 else x.float()


def _empty(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float64)


@torch.inference_mode(False)
def _scores(model, pairs: Sequence[PromptPair], batch_size: int, per_batch) -> ComponentScores:
    check_pairs(pairs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    m = _Model(model)
    heads = np.zeros((len(m.layers), m.n_heads))
    mlps = np.zeros(len(m.layers))
    ld_clean = ld_corrupt = 0.0
    was_training = model.training
    model.eval()  # no dropout (LoRA dropout included): scores must not depend on chance
    try:
        for batch in m.batches(pairs, batch_size):
            h, mlp, clean, corrupt = per_batch(m, batch)
            heads += h.double().sum(0).numpy()
            mlps += mlp.double().sum(0).numpy()
            ld_clean += float(clean.double().sum())
            ld_corrupt += float(corrupt.double().sum())
    finally:
        model.train(was_training)
    n = len(pairs)
    return ComponentScores(heads=heads / n, mlps=mlps / n, n_pairs=n, ld_clean_mean=ld_clean / n,
                           ld_corrupt_mean=ld_corrupt / n)
