"""Activations for RSA (SPEC §7): HF forward hooks at every decoder layer, at each query's last token.

Two hook points per layer: the decoder layer's output (the residual stream after the layer) and
its MLP's output. The prompts are those of scoring: prefix (ICL prompt at K, or just BOS/header
for a fine-tuned model) then the query's tokens.

The prefix is computed once; its KV cache is then expanded to a batch of right-padded queries whose
positions continue after the prefix (iclsft.engine.prefix_kv). Right padding keeps every real
token's attention exactly that of an unpadded prompt, so the hidden state at a query's last real
token is the one of a plain forward over prefix + query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from iclsft.engine.prefix_kv import decoder_of, padded, prefix_kv, run_batch

# Expanding the prefix KV copies it once per query in the batch (DynamicCache concatenates), so the
# automatic batch size keeps batch x (prefix + query) tokens under this budget: about 1.5 GB of KV
# for SmolLM2-135M (30 layers x 3 KV heads x 64 dims, fp32) at a 1,700-token prefix.
KV_TOKEN_BUDGET = 2**15
MAX_BATCH = 256


def auto_batch_size(prefix_len: int, query_len: int = 8) -> int:
    return max(1, min(MAX_BATCH, KV_TOKEN_BUDGET // (prefix_len + query_len)))


@torch.inference_mode()
def activations(model, prefix: Sequence[int], queries: Sequence[Sequence[int]], *, batch_size: int | None = None,
                pad_id: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream after each decoder layer and MLP output of each layer, at the last token of
    every query after `prefix`. Returns two fp32 tensors of shape (layers, len(queries), hidden) on
    the model's device, in the order of `queries`."""
    if any(len(q) == 0 for q in queries):
        raise ValueError("every query needs at least one token")
    decoder = decoder_of(model)
    layers = decoder.layers
    device = decoder.embed_tokens.weight.device
    shape = (len(layers), len(queries), decoder.config.hidden_size)
    resid = torch.empty(shape, dtype=torch.float32, device=device)
    mlp = torch.empty_like(resid)
    where: dict[str, torch.Tensor] = {}  # set while a query batch runs: output rows, batch rows, positions

    def capture(buffer: torch.Tensor, layer: int):
        def hook(_module, _inputs, output):
            if where:  # not during the prefix
                hidden = output[0] if isinstance(output, tuple) else output
                buffer[layer, where["rows"]] = hidden[where["batch"], where["pos"]].float()
        return hook

    handles = [m.register_forward_hook(capture(resid, i)) for i, m in enumerate(layers)]
    handles += [m.mlp.register_forward_hook(capture(mlp, i)) for i, m in enumerate(layers)]
    try:
        kv = prefix_kv(decoder, prefix, config=decoder.config)
        p = len(prefix)
        size = batch_size or auto_batch_size(p, max((len(q) for q in queries), default=1))
        bar = _progress(len(queries), progress)
        for start in range(0, len(queries), size):
            chunk = queries[start : start + size]
            ids, real = padded(chunk, pad_id, device)
            b = len(chunk)
            where.update(rows=torch.arange(start, start + b, device=device), batch=torch.arange(b, device=device),
                         pos=torch.tensor([len(q) - 1 for q in chunk], device=device))
            run_batch(decoder, kv, p, ids, real, config=decoder.config)
            where.clear()
            bar.update(b)
        bar.close()
    finally:
        where.clear()
        for h in handles:
            h.remove()
    return resid, mlp


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="q", desc="activations", leave=False)
