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
    distinct = sorted(set(windows), key=lambda w: -1 if w is None else w)
    masks = {w: tree_mask(prefix_len, depth, ancestors, w)[None, None].to(device) for w in distinct}
    if len(distinct) == 1:
        return masks[distinct[0]]
    types = config.get_text_config(decoder=True).layer_types
    return {kind: masks[windows[i]] for i, kind in enumerate(types)}
