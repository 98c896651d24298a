"""Which full fine-tune checkpoints a run keeps (`checkpoints_keep`), and deleting them on purpose.

A full fine-tune's checkpoint is a whole model (538 MB for SmolLM2-135M in fp32, ~16 GB for an 8B
model in bf16), so a sweep may keep all of them (`all`, the default), only each training's last
(`final`), or none (`none`). LoRA adapters are always kept: they are small. A checkpoint is deleted only
once everything that reads it is written (its conditions' scores, their RSA, its circuit states), by
the driver that holds the run's lock:

1. its marker is rewritten first, saying it was deleted on purpose (policy, time, the files) and keeping
   the size and sha256 of every file it held, so the run still names exactly what was scored;
2. then the weight files go.

A kill between the two leaves a marker that says "deleted" beside files that are still there: the
checkpoint is never read again either way (`is_deleted`), and the next run deletes what is left. A
deleted checkpoint is neither damaged (never set aside) nor unfinished (never trained again by itself):
work that needs it again — a condition scored anew, RSA or circuits added later — is refused with one
line naming `retrain_deleted` (`--retrain-deleted`), which trains it again and recomputes what was
scored with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from iclsft.artifacts import atomic_write_json, set_aside
from iclsft.errors import DeletedCheckpointError
from iclsft.faults import fault_point
from iclsft.models import WEIGHT_SUFFIXES
from iclsft.names import CHECKPOINTS_KEEP
from iclsft.sft.adapters import ADAPTERS_DIR, MARKER, RETRAIN, deletion, is_finished, read_marker

logger = logging.getLogger(__name__)

REDO_DIR = ".redo"  # conditions scored with a deleted checkpoint, set aside by retrain_deleted

def deletable(policy: str, fraction: float, lora: bool) -> bool:
    """Whether `policy` deletes a checkpoint at `fraction` of its training once it is no longer needed."""
    if policy not in CHECKPOINTS_KEEP:
        raise ValueError(f"checkpoints_keep {policy!r} is not allowed; allowed: {', '.join(CHECKPOINTS_KEEP)}")
    return not lora and (policy == "none" or (policy == "final" and fraction < 1.0))


def is_deleted(path: str | Path) -> bool:
    return deletion(Path(path)) is not None


def delete_checkpoint(path: str | Path, policy: str) -> int:
    """Delete a finished checkpoint's weight files on purpose, marker first (it keeps their sizes and
    checksums), and return the bytes freed. Deleting again finishes a deletion a kill interrupted."""
    path = Path(path)
    marker = read_marker(path)
    weights = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if "deleted" not in marker:
        info = {"policy": policy, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": [f.name for f in weights]}
        atomic_write_json(path / MARKER, {**marker, "deleted": info})  # first: from here on it is never read
    fault_point("checkpoint-delete")
    freed = 0
    for f in weights:
        freed += f.stat().st_size
        f.unlink()
        fault_point("checkpoint-delete-file")
    return freed


def check_needed(paths: Iterable[str | Path], retrain: bool, what: str) -> list[Path]:
    """Checkpoints that `what` (e.g. "3 conditions to score") needs: a deleted one is refused in one line
    naming the option, or with `retrain` its directory (marker and config) is removed so that it is
    trained again. Returns the removed directories."""
    deleted = [(Path(p), deletion(Path(p))) for p in dict.fromkeys(map(str, paths))]
    deleted = [(p, info) for p, info in deleted if info is not None]
    if not deleted:
        return []
    if not retrain:
        path, info = deleted[0]
        more = f" (and {len(deleted) - 1} more)" if len(deleted) > 1 else ""
        when = f" on {info['time']}" if info.get("time") else ""
        raise DeletedCheckpointError(f"{what} needs checkpoint {path.name}{more}, deleted on purpose ("
                                     "checkpoints_keep: "
                                     f"{info.get('policy', 'none')}{when}) once everything that read it was written; "
                                     f"{RETRAIN}")
    for path, _ in deleted:
        shutil.rmtree(path)
        logger.info("checkpoint %s was deleted on purpose: it is trained again (retrain_deleted)", path.name)
    return [p for p, _ in deleted]


def finish_deletions(adapters: Path) -> int:
    """Delete the weight files a killed deletion left beside a marker that says "deleted"; the bytes freed."""
    freed = 0
    for path in sorted(Path(adapters).glob("[!.]*")) if Path(adapters).is_dir() else ():
        info = deletion(path)
        if info is not None and any((path / name).exists() for name in info.get("files", ())):
            freed += delete_checkpoint(path, info.get("policy", "none"))
    return freed


def redo_deleted(run, conds) -> int:
    """`retrain_deleted`: the finished conditions among `conds` that were scored with a checkpoint deleted
    on purpose are moved to RUN/.redo/ (kept for inspection, never read) so they are computed again, and those
    checkpoints removed so they are trained again (with everything that reads them: RSA, circuits).
    Returns how many conditions were set aside. Call with the run's lock held."""
    ids = {c.id for c in conds}
    adapters = Path(run.path) / ADAPTERS_DIR
    redo = [(cdir, adapters / record["checkpoint_dir"]) for cdir, _, record in run.finished()
            if record.get("condition") in ids and record.get("checkpoint_dir")
            and is_deleted(adapters / record["checkpoint_dir"])]
    aside = Path(run.path) / REDO_DIR
    for cdir, _ in redo:  # out of conditions/ (nothing there reads them again), under a name of its time
        aside.mkdir(exist_ok=True)
        moved = set_aside(cdir, "redo")
        os.replace(moved, aside / moved.name)
    check_needed([ckpt for _, ckpt in redo], True, "")
    if redo:
        logger.info("%d conditions scored with a deleted checkpoint are computed again (retrain_deleted)", len(redo))
    return len(redo)


def retain(run, spec, read_after: Callable[[Path, str], bool] | None = None) -> int:
    """The arm runner's deletions (in one process, after the arm and whatever reads its checkpoints
    after it: RSA, circuits): each full checkpoint of `spec`'s method that `spec.checkpoints_keep`
    deletes, once every condition scored with it finished (and, with `read_after`(condition dir,
    condition id), e.g. "its RSA is current", says that what reads it after scoring is done too).
    Returns the bytes freed. Call with the run's lock held."""
    if spec.checkpoints_keep == "all" or spec.sft is None or spec.sft.method == "lora":
        return 0
    adapters = Path(run.path) / ADAPTERS_DIR
    readers: dict[str, list[bool]] = {}
    for cdir in sorted((Path(run.path) / "conditions").glob("*/")):
        record = run.read_record(cdir) or {}
        name = record.get("checkpoint_dir")
        if name:
            readers.setdefault(name, []).append(record.get("status") == "ok" and (
                read_after is None or read_after(cdir, record["condition"])))
    freed = 0
    for name, done in sorted(readers.items()):
        path = adapters / name
        if not all(done) or not is_finished(path) or is_deleted(path):
            continue
        marker = read_marker(path)
        if marker.get("method") != spec.sft.method or not deletable(spec.checkpoints_keep, marker.get("fraction", 1.0),
                                                                    False):
            continue
        freed += delete_checkpoint(path, spec.checkpoints_keep)
        logger.info("deleted checkpoint %s (checkpoints_keep: %s): everything that reads it is written", name,
                    spec.checkpoints_keep)
    return freed
