"""The one verified checkpoint loader: every reader of a trained model (RSA, circuits, benchmarks)
checks the checkpoint's marker and checksums first, then attaches its LoRA adapter to the base
model it is given, or loads the full fine-tune it holds.

    with load_checkpoint(base, path) as model:   # LoRA: base + adapter; full: its own model
        ...                                      # on exit a LoRA adapter is taken out of `base` again

`verify_checkpoint(path)` is the check alone, for engines that attach adapters themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iclsft.errors import DeletedCheckpointError
from iclsft.models import ModelRef, load_model
from iclsft.sft.adapters import MARKER, checkpoint_problem, deletion, is_finished, read_marker


def verify_checkpoint(path: str | Path) -> dict:
    """The marker of the finished, undamaged checkpoint at `path`; one clear error otherwise:
    FileNotFoundError when it is missing or unfinished, ValueError when a file no longer matches
    the checksum in its marker."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; rerun the sft arm that trains it")
    if not is_finished(path):
        raise FileNotFoundError(f"checkpoint {path} is unfinished (no {MARKER}); rerun the sft arm that trains it")
    problem = checkpoint_problem(path)
    if problem and deletion(path) is not None:
        raise DeletedCheckpointError(problem)
    if problem:
        raise ValueError(f"{problem}; delete it and the conditions scored with it, then rerun the sft arm")
    try:
        return read_marker(path)
    except (OSError, ValueError) as e:  # checkpoint_problem read it a moment ago: only a race gets here
        raise ValueError(f"checkpoint {path} has an unreadable {MARKER} ({e}); rerun the sft arm") from e


def is_lora(path: str | Path) -> bool:
    """True for a LoRA adapter directory, False for a full model directory."""
    return (Path(path) / "adapter_config.json").is_file()


@contextmanager
def load_checkpoint(base, path: str | Path, *, dtype: str = "float32") -> Iterator:
    """The model of the verified checkpoint at `path` (verify_checkpoint's errors otherwise), in eval mode.

    A LoRA adapter is attached to `base` (a loaded causal LM; peft injects its layers into it) and taken
    out again on exit, so `base` is the untouched base model afterwards. A full fine-tune is loaded from
    its own directory in `dtype` on `base`'s device (`base` is then only that hint and is not changed)."""
    path = Path(path)
    verify_checkpoint(path)
    if not is_lora(path):
        device = str(base.get_input_embeddings().weight.device) if base is not None else None
        model, _ = load_model(ModelRef(name=str(path), path=path, fingerprint=""), dtype, device=device)
        yield model
        return
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ImportError("loading a LoRA checkpoint needs peft: pip install 'iclsft-eval[sft]'") from e
    with warnings.catch_warnings():
        # peft reads a transformers property that warns about its own deprecation on every load
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base, str(path)).eval()
    try:
        yield model
    finally:
        model.unload()  # takes the LoRA layers out of `base` again
