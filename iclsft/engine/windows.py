"""Sliding-window attention in the hf engine's own attention paths.

A model called with a custom 4D attention mask uses it as given: its sliding-window rule
(Mistral-style `sliding_window` on every layer; Gemma 2/3 and Qwen2 `layer_types` with
"sliding_attention" layers) is not applied on top. So the engine builds the window into every
mask it passes, per layer type where layers differ, and the tree-attention path cuts the prefix
and the ancestors per layer (engine/tree_attention.py).

The rule is transformers' (`masking_utils.sliding_window_overlay`): the token at sequence position
q sees the key at position k iff k <= q and k > q - window, positions counted along the flat
sequence the naive forward would see (prefix tokens 0..P-1, then a tree node at P + depth).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SLIDING = "sliding_attention"
FULL = "full_attention"


def layer_windows(config) -> list[int | None]:
    """Per decoder layer, its attention window in tokens (None: full causal attention).

    Raises ValueError for a layer type the engine does not implement (e.g. chunked or linear
    attention), naming the layer and the type."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:  # Qwen2-style switch: the window is off
        window = None
    types = getattr(text, "layer_types", None)
    if types is None:  # Mistral-style: one window (or none) for every layer
        return [window] * layers
    out: list[int | None] = []
    for i, kind in enumerate(types):
        if kind == FULL:
            out.append(None)
        elif kind == SLIDING:
            if window is None:
                raise ValueError(f"layer {i} is a {SLIDING} layer but the config has no sliding_window")
            out.append(int(window))
        else:
            raise ValueError(f"layer {i} has attention type {kind!r}; the hf engine implements "
                             f"{FULL!r} and {SLIDING!r} layers only")
    return out


PROBE_WINDOW = 8  # the stand-in window while probing: a 2 x 8-token sequence shows which layers slide


def model_windows(model) -> list[int | None]:
    """Per decoder layer, the window the model's own masks apply (None: full causal attention).

    The config says how big a window is, but not always whether the model uses it: a Llama config may
    carry a `sliding_window` its attention ignores, while Mistral windows every layer. So when the
    config names a window, the model's decoder is run once on 16 tokens with its layers stood in by
    recorders, the config's window set to 8 for the duration: a layer that gets an 8-wide band mask
    slides (with the config's real window), one that gets a causal mask (or none: SDPA's causal
    shortcut) does not; any other mask is refused by name."""
    claimed = layer_windows(model.config)
    if all(w is None for w in claimed):
        return claimed
    text = model.config.get_text_config(decoder=True)
    window = int(text.sliding_window)
    seen = _probe_masks(model, text, 2 * PROBE_WINDOW)
    out: list[int | None] = []
    for i, mask in enumerate(seen):
        width = _band_width(mask, 2 * PROBE_WINDOW)
        if width not in (None, PROBE_WINDOW):
            raise ValueError(f"layer {i}'s attention mask is neither causal nor a sliding window (config "
                             f"sliding_window {window}); the hf engine cannot score this model")
        out.append(window if width == PROBE_WINDOW else None)
    return out


class _Probed(Exception):
    pass


@torch.inference_mode()
def _probe_masks(model, text_config, length: int) -> list:
    """The attention_mask each decoder layer receives for a plain forward of `length` tokens."""
    layers = model.get_decoder().layers
    seen: dict[int, object] = {}

    def recorder(i: int):
        def forward(hidden_states, *args, **kwargs):
            seen[i] = kwargs.get("attention_mask", "not given")
            if i == len(layers) - 1:
                raise _Probed  # nothing after the last layer is needed
            return hidden_states
        return forward

    before = text_config.sliding_window
    # a layer's own instance `forward` (accelerate's device hooks put one there) is put back afterwards
    own = [layer.__dict__.get("forward") for layer in layers]
    try:
        text_config.sliding_window = PROBE_WINDOW
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        ids = torch.zeros((1, length), dtype=torch.long, device=model.get_input_embeddings().weight.device)
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _Probed:
        pass
    finally:
        text_config.sliding_window = before
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = forward
    missing = [i for i in range(len(layers)) if isinstance(seen.get(i, "not given"), str)]
    if missing:
        raise ValueError(f"layer {missing[0]} was called without an attention_mask keyword; the hf engine cannot "
                         "read this model's sliding windows")
    return [seen[i] for i in range(len(layers))]


def _band_width(mask, length: int) -> int | None:
    """None for a plain causal mask (or no mask); w for a causal band of width w; -1 for anything else."""
    if mask is None:
        return None
    if isinstance(mask, dict) or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return -1
    m = mask[0, 0].cpu()
    if m.dtype != torch.bool:  # additive masks: 0 where seen, the dtype's minimum where not
        m = m > torch.finfo(m.dtype).min / 2
    if tuple(m.shape) != (length, length):
        return -1
    width = int(m[-1].sum())
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    if not torch.equal(m, (k <= q) & (k > q - width)):
        return -1
    return None if width >= length else width


def cuts(window: int | None, prefix_len: int, max_depth: int) -> bool:
    """Whether `window` hides any key from any token: the last position is P + max_depth."""
    return window is not None and prefix_len + max_depth >= window


def tree_mask(prefix_len: int, depth: Sequence[int], ancestors: np.ndarray, window: int | None) -> torch.Tensor:
    """[n, P + n] boolean: node i sees prefix token j and node k (its ancestor or itself) within the window."""
    depth = np.asarray(depth, dtype=np.int64)
    n = len(depth)
    if not cuts(window, prefix_len, int(depth.max()) if n else 0):
        prefix = np.ones((n, prefix_len), dtype=bool)
        return torch.from_numpy(np.concatenate([prefix, ancestors], axis=1))
    position = prefix_len + depth  # each node's place in the flat sequence
    prefix = np.arange(prefix_len)[None, :] > position[:, None] - window
    near = (depth[:, None] - depth[None, :]) < window  # ancestors only: their depth is smaller or equal
    return torch.from_numpy(np.concatenate([prefix, ancestors & near], axis=1))


def model_masks(config, windows: Sequence[int | None], prefix_len: int, depth: Sequence[int],
                ancestors: np.ndarray, device) -> torch.Tensor | dict[str, torch.Tensor]:
    """The `attention_mask` argument for one packed forward: a [1, 1, n, P + n] mask when every layer
    sees the same, else a dict by layer type (the form transformers' models with `layer_types` take)."""
    return per_layer(config, windows, lambda w: tree_mask(prefix_len, depth, ancestors, w)[None, None].to(device))


def per_layer(config, windows: Sequence[int | None], mask_for) -> torch.Tensor | dict[str, torch.Tensor]:
    """`mask_for(window)` for each distinct window of the layers: one mask when every layer has the same
    window, else a dict by layer type."""
    distinct = sorted(set(windows), key=lambda w: -1 if w is None else w)
    masks = {w: mask_for(w) for w in distinct}
    if len(distinct) == 1:
        return masks[distinct[0]]
    types = config.get_text_config(decoder=True).layer_types
    return {kind: masks[windows[i]] for i, kind in enumerate(types)}
