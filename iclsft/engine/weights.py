"""Whether a full fine-tune's weights fit the model an engine holds, read from the files alone (the
safetensors headers and config.json), so that a swap that cannot fit is refused before anything is loaded."""

from __future__ import annotations

import json
import struct
from pathlib import Path

# config.json keys that fix the tensors' shapes or how they are read
SHAPE_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
TIED_HEAD = "lm_head.weight"  # left out of a tied model's files by save_pretrained, or kept by a converter


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's *.safetensors files (their JSON headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def shape_config(model_dir: str | Path) -> dict:
    """The SHAPE_KEYS of the directory's config.json (a nested text_config's win: multimodal wrappers)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    config = json.loads(path.read_text())
    text = config.get("text_config") or {}
    return {k: text.get(k, config.get(k)) for k in SHAPE_KEYS}


def check_swappable(base: str | Path, weights: str | Path, engine: str) -> None:
    """Raise ValueError unless the model directory `weights` has the architecture, shape settings and tensors
    (names and shapes) of `base`; a tied output head may be in one directory's files and not the other's."""
    a, b = shape_config(base), shape_config(weights)
    differ = [f"{k} {a[k]!r} vs {b[k]!r}" for k in SHAPE_KEYS if a[k] != b[k]]
    if not differ:
        x, y = tensor_shapes(base), tensor_shapes(weights)
        if a["tie_word_embeddings"] is not False:
            x.pop(TIED_HEAD, None)
            y.pop(TIED_HEAD, None)
        differ = [f"{k}: missing" for k in sorted(set(x) - set(y))][:3]
        differ += [f"{k}: not in the model" for k in sorted(set(y) - set(x))][:3]
        differ += [f"{k}: shape {list(y[k])}, the model's {list(x[k])}" for k in sorted(set(x) & set(y))
                   if x[k] != y[k]][:3]
    if differ:
        raise ValueError(f"weights in {weights} do not fit the {engine} engine's model {base} ({'; '.join(differ)}): "
                         "a full fine-tune swaps only into its own base architecture")
