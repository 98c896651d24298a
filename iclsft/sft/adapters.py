"""Trained-model artifacts: content-hash names, atomic saves, vLLM compatibility.

A checkpoint directory is named by the hash of everything that determines its weights: the base
model's fingerprint, the exact training token ids (exemplars, template, labels, BOS) in the order
training takes them (each batch's examples sorted: `iclsft.sft.batches.canonical_order`), the method
and hyper-parameters, the seed and the fraction of training. Trainings whose batches hold the same
examples (an order probe whose pairs never cross a batch boundary) thus have one name and are
trained once. A run directory's checkpoints named before the sort (examples in stream order,
`stream_order_key`) are still found and used by `resume_dir`. It is written under a
temporary name and renamed into place after its marker file, so a directory without the marker
is never used, and a finished one is never trained again. The marker lists the size and sha256 of
every file beside it: a checkpoint whose files no longer match is set aside and trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from iclsft.artifacts import atomic_write_json, manifest, manifest_problems, publish_dir, set_aside
from iclsft.faults import fault_point
from iclsft.sft.batches import canonical_order
from iclsft.spec import SftSpec

logger = logging.getLogger(__name__)

MARKER = "iclsft-adapter.json"
ADAPTERS_DIR = "adapters"


Examples = Sequence[tuple[Sequence[int], Sequence[int]]]


# A training's key names checkpoints on disk, which `iclsft-eval migrate` cannot rename (the key hashes the
# tokenized examples): it keeps the form it had at condition version v1, whatever HASH_VERSION is now.
TRAINING_KEY_VERSION = "v1"


def _recipe(sft: SftSpec) -> dict:
    """The recipe as the key hashes it: its fields, `precision` left out at fp32 (the key form of v1, from
    before precision existed)."""
    recipe = sft.model_dump(mode="json")
    if recipe["precision"] == "fp32":
        del recipe["precision"]
    return recipe


def training_key(base_fingerprint: str, examples: Examples, sft: SftSpec, seed: int, loss: str = "label") -> str:
    """Identity of one training run (all its checkpoints): base, recipe, seed, loss mask and the sequence of
    batches as multisets of examples (`examples` in stream order; hashed in `canonical_order`, which is
    the order training takes them in, so the key names exactly what is trained)."""
    return stream_order_key(base_fingerprint, canonical_order(examples, sft.batch_size), sft, seed, loss)


def stream_order_key(base_fingerprint: str, examples: Examples, sft: SftSpec, seed: int, loss: str = "label") -> str:
    """The hash of `examples` in the order given: `training_key` of the canonical order, and the key
    checkpoints were named by before training sorted its batches (stream order; `resume_dir`)."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": TRAINING_KEY_VERSION, "base": base_fingerprint, "sft": _recipe(sft),
                         "seed": seed}, sort_keys=True).encode())
    for prompt, label in examples:
        h.update(json.dumps([list(map(int, prompt)), list(map(int, label))]).encode())
    key = h.hexdigest()
    if loss != "label":  # the loss mask determines the weights too: keep such models apart
        key = hashlib.sha256(f"{key}|loss={loss}".encode()).hexdigest()
    return key


def resume_dir(run_path: Path, key: str, old_key: str, fraction: float) -> tuple[str, Path]:
    """The key and directory that serve checkpoint `fraction`: the one named by `old_key` (a stream-order
    key) where an earlier version finished it there and it is undamaged, else the one named by `key`.
    Such an older checkpoint was trained in stream order: it differs from the sorted training's only
    by floating-point summation order, and it is what the run's finished conditions were scored with."""
    old = checkpoint_dir(run_path, old_key, fraction)
    if old_key != key and is_finished(old) and checkpoint_problem(old) is None:
        return old_key, old
    return key, checkpoint_dir(run_path, key, fraction)


def checkpoint_name(key: str, fraction: float) -> str:
    return hashlib.sha256(f"{key}|{fraction:.6f}".encode()).hexdigest()[:20]


def checkpoint_dir(run_path: Path, key: str, fraction: float) -> Path:
    return Path(run_path) / ADAPTERS_DIR / checkpoint_name(key, fraction)


def is_finished(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def save_checkpoint(model, path: Path, info: dict, tokenizer_dir: Path | None = None) -> Path:
    """Save a peft adapter (LoRA) or full weights into `path`, atomically, marker last."""
    path = Path(path)
    if is_finished(path):
        return path
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer_dir is not None:  # full models are served as model directories: give them a tokenizer
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        if (tmp / "adapter_config.json").is_file():
            check_vllm_compatible(tmp)
        atomic_write_json(tmp / MARKER, {**info, "files": manifest(tmp)})  # last: it makes the directory count
        fault_point("adapter-save")
        try:
            publish_dir(tmp, path)
        except OSError:
            if not is_finished(path):  # not another writer's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def checkpoint_problem(path: Path) -> str | None:
    """None for a finished checkpoint whose files match its marker (or an unfinished one); else what is
    wrong. Markers written before checksums were recorded have no file list and pass."""
    path = Path(path)
    if not is_finished(path):
        return None
    try:
        marker = read_marker(path)
    except (OSError, ValueError) as e:
        return f"checkpoint {path} has an unreadable {MARKER} ({e})"
    info = deletion(path, marker)
    if info is not None:
        return deleted_message(path, info)
    files = marker.get("files", {})
    bad = manifest_problems(path, files)
    if bad:
        return f"checkpoint {path} is damaged ({', '.join(bad)} missing or not matching the checksum in {MARKER})"
    return None


RETRAIN = "rerun with --retrain-deleted (sweep: retrain_deleted: true) to train it again"


def deletion(path: Path, marker: dict | None = None) -> dict | None:
    """What a finished checkpoint's marker says of its deletion on purpose (policy, time, files;
    `iclsft.sft.retention`), or None. Markers of `drop_full_weights` (before the policy) count as `none`."""
    if marker is None:
        if not is_finished(path):
            return None
        try:
            marker = read_marker(path)
        except (OSError, ValueError):
            return None
    if "deleted" in marker:
        return marker["deleted"]
    if marker.get("weights_dropped"):
        return {"policy": "none", "files": marker["weights_dropped"]}
    return None


def deleted_message(path: Path, info: dict) -> str:
    when = f" on {info['time']}" if info.get("time") else ""
    return (f"checkpoint {Path(path).name} was deleted on purpose (checkpoints_keep: {info.get('policy', 'none')}"
            f"{when}) once everything that read it was written; {RETRAIN}")


def set_aside_damaged(paths: Sequence[Path]) -> list[Path]:
    """Rename each damaged checkpoint to `.damaged-<name>-<time>` beside it (kept for inspection, never
    read), so that it counts as unfinished and is trained again; logs a warning for each. A checkpoint
    deleted on purpose is not damaged: it stays (`iclsft.sft.retention`). Call with the run's lock held."""
    moved = []
    for path in paths:
        problem = checkpoint_problem(Path(path))
        if problem and deletion(Path(path)) is None:
            aside = set_aside(Path(path), "damaged")
            logger.warning("%s: set aside as %s; it is trained again", problem, aside.name)
            moved.append(aside)
    return moved


def check_vllm_compatible(adapter_dir: Path) -> None:
    """Refuse adapters that vLLM rejects or silently misreads (notes/vllm-facts.md §3)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r} (vLLM only supports None)")
    if config.get("use_dora"):
        problems.append("use_dora=True (vLLM has no DoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r} (vLLM drops per-layer patterns silently)")
    if config.get("layers_to_transform") is not None:
        problems.append("layers_to_transform is set (vLLM ignores it)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (train with bias='none')")
    if problems:
        raise ValueError(f"adapter {adapter_dir} would not load correctly in vLLM: " + "; ".join(problems))
