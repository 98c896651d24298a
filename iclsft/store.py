"""The run directory (SPEC §10): one frozen spec, per-condition artifacts, records written last.

    RUN/spec.json                       the frozen spec of each arm (icl, sft-lora, ...)
    RUN/record.json                     run status, timings, version
    RUN/metrics.parquet                 one row per finished condition
    RUN/conditions/<name>/condition.json   the fields hashed into the condition id
    RUN/conditions/<name>/scores.parquet   per-query n1, n2, truth, lp_0, lp_1, is_exemplar
    RUN/conditions/<name>/exemplars.parquet  the exemplars in prompt order (pair, n1, n2, truth)
    RUN/conditions/<name>/field.npy        decision field p(first label) on the query lattice
    RUN/conditions/<name>/record.json      status, timings, and size + sha256 of each file above

Every file is written to a temporary name and renamed into place; a condition's record is written
after its files and lists their sizes and checksums, so a condition counts as finished only when
its record says "ok" and every file still matches.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iclsft import __version__
from iclsft.spec import Condition

_UMASK = os.umask(0)
os.umask(_UMASK)


class RunLockedError(RuntimeError):
    """Another process is computing into the same run directory."""


class SpecMismatchError(ValueError):
    """The run directory holds results of a different spec."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def parquet_bytes(table: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class RunDir:
    """A run directory bound to one spec."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_file = None

    # -- lock ---------------------------------------------------------------------------------
    # One process computes into a run directory at a time. The lock is an flock on RUN/.lock, which
    # the kernel releases when its holder exits or is killed: a crashed run never leaves a stale lock.
    # (flock is advisory and local to one machine; on network filesystems it may not hold.)
    LOCK_NAME = ".lock"

    def acquire_lock(self) -> None:
        """Take the run's lock or raise RunLockedError naming its holder; the directory must exist."""
        if self._lock_file is not None:
            return
        f = open(self.path / self.LOCK_NAME, "a+")  # noqa: SIM115 (held until release_lock)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            f.close()
            raise RunLockedError(
                f"{self.path} is in use by another iclsft-eval process ({holder}); wait for it to finish, "
                "or use another --out (the lock goes away by itself when that process ends)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        f.flush()
        self._lock_file = f

    def release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- spec ---------------------------------------------------------------------------------
    # spec.json holds one frozen spec per arm: {"arms": {"icl": {...}, "sft-lora": {...}}}. A run may
    # gain arms (ICL first, SFT later, compared side by side), but all arms share model and template,
    # and an arm once frozen never changes.
    SHARED = ("model", "template")

    def open(self, spec) -> None:
        """Create the directory and freeze `spec` as its arm, or check that the arm holds the same spec."""
        spec_file = self.path / "spec.json"
        arms: dict = {}
        if spec_file.exists():
            arms = self._stored_arms(spec_file)
            stored = arms.get(spec.arm)
            if stored is not None:
                stored_identity = {k: v for k, v in stored.items() if k not in spec.TRANSPORT}
                identity = spec.identity()
                if stored_identity != identity:
                    changed = sorted(k for k in set(identity) | set(stored_identity)
                                     if identity.get(k) != stored_identity.get(k))
                    raise SpecMismatchError(
                        f"{self.path} already holds a {spec.arm} run with a different spec (differs in: "
                        f"{', '.join(changed)}); rerun the same command to resume it, or choose another --out"
                    )
                return
            mine = spec.model_dump(mode="json")
            for arm, other in arms.items():
                differ = [k for k in self.SHARED if other.get(k) != mine.get(k)]
                if differ:
                    raise SpecMismatchError(
                        f"{self.path} holds a {arm} run with a different {' and '.join(differ)}; the arms of one "
                        "run must share model and template; choose another --out"
                    )
        arms[spec.arm] = spec.model_dump(mode="json")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(spec_file, {"arms": arms})
        except OSError as e:
            raise OSError(f"cannot write to output directory {str(self.path)!r}: {e.strerror or e}") from e

    @staticmethod
    def _stored_arms(spec_file: Path) -> dict:
        try:
            stored = json.loads(spec_file.read_text())
        except json.JSONDecodeError as e:
            raise SpecMismatchError(f"{spec_file} is not valid JSON ({e}); use a new --out directory") from e
        if not isinstance(stored, dict) or not isinstance(stored.get("arms"), dict):
            raise SpecMismatchError(
                f"{spec_file} was not written by this version of iclsft-eval (no 'arms'); use a new --out directory"
            )
        for arm in stored["arms"].values():  # runs of 0.1 held one order pattern per arm
            if isinstance(arm, dict) and "order" in arm and "orders" not in arm:
                arm["orders"] = [arm.pop("order")]
        return stored["arms"]

    def spec_json(self) -> dict:
        return json.loads((self.path / "spec.json").read_text())

    def arm_spec(self, arm: str) -> dict | None:
        return self.spec_json()["arms"].get(arm)

    # -- run record ---------------------------------------------------------------------------
    def write_run_record(self, status: str, **fields: Any) -> None:
        record = {"status": status, "version": __version__, "host": socket.gethostname(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        atomic_write_json(self.path / "record.json", record)

    # -- conditions ---------------------------------------------------------------------------
    def condition_dir(self, cond: Condition) -> Path:
        return self.path / "conditions" / cond.dirname

    def is_done(self, cond: Condition) -> bool:
        """True when the condition's record says ok and every listed file matches its size."""
        record = self.read_record(self.condition_dir(cond))
        if not record or record.get("status") != "ok" or record.get("condition") != cond.id:
            return False
        for name, info in record.get("files", {}).items():
            f = self.condition_dir(cond) / name
            if not f.is_file() or f.stat().st_size != info["bytes"]:
                return False
        return True

    @staticmethod
    def read_record(cdir: Path) -> dict | None:
        try:
            return json.loads((cdir / "record.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_condition(self, cond: Condition, files: dict[str, bytes], **fields: Any) -> None:
        """Write a finished condition: its files first, then its record (status ok) last."""
        cdir = self.condition_dir(cond)
        atomic_write_json(cdir / "condition.json", {"id": cond.id, **cond.model_dump(mode="json")})
        digests = {}
        for name, data in files.items():
            atomic_write_bytes(cdir / name, data)
            digests[name] = _digest(data)
        self._write_condition_record(cond, "ok", files=digests, **fields)

    def write_condition_error(self, cond: Condition, message: str, **fields: Any) -> None:
        atomic_write_json(self.condition_dir(cond) / "condition.json", {"id": cond.id, **cond.model_dump(mode="json")})
        self._write_condition_record(cond, "error", error=message, **fields)

    def _write_condition_record(self, cond: Condition, status: str, **fields: Any) -> None:
        record = {"status": status, "condition": cond.id, **cond.row(), "version": __version__,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        atomic_write_json(self.condition_dir(cond) / "record.json", record)

    def finished(self) -> list[tuple[Path, dict, dict]]:
        """(directory, condition.json, record) of every condition whose record says ok."""
        out = []
        for cdir in sorted((self.path / "conditions").glob("*/")):
            record = self.read_record(cdir)
            if record and record.get("status") == "ok":
                out.append((cdir, json.loads((cdir / "condition.json").read_text()), record))
        return out

    def verify(self, cdir: Path, record: dict) -> None:
        """Check every file of a finished condition against the checksum in its record."""
        for name, info in record.get("files", {}).items():
            data = (cdir / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise ValueError(f"{cdir / name} does not match the checksum in its record; delete {cdir} and rerun")
