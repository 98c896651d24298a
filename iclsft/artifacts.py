"""The artifact layer: every file the package writes goes through here, and every file whose result
is reused is checked here (docs/reliability.md).

- `atomic_write_bytes` / `atomic_write_json`: temporary name beside the target, fsync, rename: a reader
  (or a resumed run after SIGKILL) sees the old file or the new one, never a part.
- `digest` / `file_digest`: size and sha256 of bytes / of a file read in blocks.
- `write_checked` / `read_verified`: the pair used for artifacts that are read back: the writer keeps
  the returned `{"bytes", "sha256"}` in a record written after the file, the reader passes it back and
  gets the bytes only when they still match.
- `file_matches`: the same check as a yes/no, for resume decisions (a damaged file is recomputed).
- `manifest` / `manifest_problems`: the same for every file of a directory (checkpoints, whose marker
  lists them); `publish_dir`: sync a finished temporary directory and rename it into place;
  `set_aside`: rename a damaged directory out of the way (kept for inspection, never read).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iclsft.faults import fault_point

_UMASK = os.umask(0)
os.umask(_UMASK)
_BLOCK = 1 << 22  # 4 MiB: adapters and full models are hashed without holding them in memory


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, fsync it, rename it into place: a reader sees the
    old file or the new one, never a part. A failed write names the file (and, on a full disk, what to do)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and str(path) not in str(e):
            hint = ("; free some space, then rerun the same command (finished results are kept)"
                    if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
            raise type(e)(e.errno, f"{e.strerror or e} while writing {path}{hint}") from e
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()


def parquet_bytes(table: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def digest(data: bytes) -> dict[str, Any]:
    """Size and sha256 of `data`, in the form records keep: {"bytes": n, "sha256": hex}."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, read in blocks (adapters and full models can be large)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def file_matches(path: Path, info: dict) -> bool:
    """True when `path` is a file of the size and (where recorded) sha256 in `info`."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return False
        return "sha256" not in info or file_digest(path)["sha256"] == info["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def write_checked(path: Path, data: bytes) -> dict[str, Any]:
    """Write `data` atomically and return its {"bytes", "sha256"}: keep it in a record written after the
    file, and pass it to `read_verified` (or `file_matches`) when the file is used again."""
    atomic_write_bytes(path, data)
    return digest(data)


def problem(path: Path, info: dict) -> str | None:
    """Why `path` does not match `info` ("missing", "cut short or grown", "changed"), None when it matches."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        if path.stat().st_size != info["bytes"]:
            return "cut short or grown"
        if "sha256" in info and file_digest(path)["sha256"] != info["sha256"]:
            return "changed"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (KeyError, TypeError):
        return "without a valid checksum record"
    return None


def read_verified(path: Path, info: dict) -> bytes:
    """The bytes of `path`, checked against the {"bytes", "sha256"} recorded when it was written; one
    ValueError naming the file when it is missing, cut short or changed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        why = "missing"
    except OSError as e:
        why = f"unreadable ({e.strerror or e})"
    else:
        try:
            why = ("cut short or grown" if len(data) != info["bytes"] else
                   "changed" if "sha256" in info and digest(data)["sha256"] != info["sha256"] else None)
        except (KeyError, TypeError):
            why = "without a valid checksum record"
        if why is None:
            return data
    raise ValueError(f"{path} does not match the checksum recorded when it was written ({why}); "
                     "rerun the command that made it: a resumed run computes it again")


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `directory`, sorted by path."""
    directory = Path(directory)
    return {str(f.relative_to(directory)): file_digest(f) for f in sorted(directory.rglob("*")) if f.is_file()}


def manifest_problems(directory: Path, files: dict[str, dict]) -> list[str]:
    """The names in `files` (a `manifest`) whose file under `directory` is missing or does not match, sorted."""
    return sorted(name for name, info in files.items() if not file_matches(Path(directory) / name, info))


def publish_dir(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """Sync every file of the finished directory `tmp` and rename it to `final`: a reader sees a complete
    directory or none. An existing `final` is swapped out (and removed) with `replace`; without it the
    rename fails with OSError when `final` is a non-empty directory (another writer's copy: the caller
    decides whether that copy is as good as its own)."""
    tmp, final = Path(tmp), Path(final)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            _fsync_file(f)
    old = None
    if replace and final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}-{time.time_ns()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def set_aside(path: Path, why: str = "damaged") -> Path:
    """Rename `path` to `.<why>-<name>-<time>` beside it (kept for inspection; names starting with a dot
    are never read as results) and return the new path."""
    path = Path(path)
    aside = path.with_name(f".{why}-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6:06d}")
    os.replace(path, aside)
    return aside


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (power loss, not only SIGKILL); some filesystems cannot sync a
    directory, which then costs only that durability."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
