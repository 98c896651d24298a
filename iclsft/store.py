"""The run directory (SPEC §10): one frozen spec, per-condition artifacts, records written last.

    RUN/spec.json                       the frozen spec of each arm (icl, sft-lora, ...)
    RUN/record.json                     per arm: status, timings, version (each arm its own entry)
    RUN/metrics.parquet                 one row per finished condition
    RUN/metrics.json                    size + sha256 of metrics.parquet (written after it)
    RUN/conditions/<name>/condition.json   the fields hashed into the condition id
    RUN/conditions/<name>/scores.parquet   per-query n1, n2, truth, lp_0, lp_1, is_exemplar
    RUN/conditions/<name>/exemplars.parquet  the exemplars in prompt order (pair, n1, n2, truth)
    RUN/conditions/<name>/field.npy        decision field p(first label) on the query lattice
    RUN/conditions/<name>/record.json      status, timings, and size + sha256 of each file above

Every file is written through iclsft.artifacts (temporary name, fsync, rename); a condition's record is written
after its files and lists their sizes and checksums, so a condition counts as finished only when
its record says "ok" and every file still matches (docs/reliability.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from iclsft import __version__
from iclsft.artifacts import atomic_write_json, file_matches, write_checked
from iclsft.errors import RunLockedError, SpecMismatchError
from iclsft.faults import fault_point
from iclsft.spec import Condition
from iclsft.versions import scoring_libraries


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

    def acquire_lock(self, instead: str = "use another --out") -> None:
        """Take the run's lock or raise RunLockedError naming its holder; the directory must exist.
        `instead`: what the message suggests besides waiting."""
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
                f"or {instead} (the lock goes away by itself when that process ends)"
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
        """Create the directory and freeze `spec` as its arm, or check that the arm holds the same spec.
        A new arm is written under the run's lock (kept; the caller releases it), checked again there, so
        that two processes adding arms at once cannot lose one; a refused spec changes nothing."""
        if self._new_arms(spec) is None:
            return
        held = self._lock_file is not None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.acquire_lock()
        except OSError as e:
            raise OSError(f"cannot write to output directory {str(self.path)!r}: {e.strerror or e}") from e
        try:
            arms = self._new_arms(spec)  # again, under the lock: another process may have added an arm
            if arms is not None:
                atomic_write_json(self.path / "spec.json", {"arms": arms})
        except OSError as e:
            if not held:
                self.release_lock()
            raise OSError(f"cannot write to output directory {str(self.path)!r}: {e.strerror or e}") from e
        except BaseException:
            if not held:
                self.release_lock()
            raise

    def _new_arms(self, spec) -> dict | None:
        """The arms to store with `spec` added, None when it is stored already; SpecMismatchError when the
        run holds a different spec for the arm, or arms of another model or template."""
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
                    if stored.get("hash_version") != identity.get("hash_version"):
                        raise self._other_version(stored.get("hash_version"), identity.get("hash_version"))
                    raise SpecMismatchError(
                        f"{self.path} already holds a {spec.arm} run with a different spec (differs in: "
                        f"{', '.join(changed)}); rerun the same command to resume it, or choose another --out"
                    )
                return None
            mine = spec.model_dump(mode="json")
            for arm, other in arms.items():
                if other.get("hash_version") != mine.get("hash_version"):
                    raise self._other_version(other.get("hash_version"), mine.get("hash_version"))
                differ = [k for k in self.SHARED if other.get(k) != mine.get(k)]
                if differ:
                    raise SpecMismatchError(
                        f"{self.path} holds a {arm} run with a different {' and '.join(differ)}; the arms of one "
                        "run must share model and template; choose another --out"
                    )
        arms[spec.arm] = spec.model_dump(mode="json")
        return arms

    def _other_version(self, stored: str | None, current: str | None) -> SpecMismatchError:
        return SpecMismatchError(
            f"{self.path} was made by another version of iclsft-eval (condition ids {stored!r}, this version "
            f"{current!r}): run `iclsft-eval migrate {self.path}` to rewrite it for this version, or choose another "
            "--out")

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
    # RUN/record.json: {"arms": {"icl": {...}, "sft-lora": {...}}}, each arm's status, timings and version.
    # Only the holder of the run's lock writes it (read, update its own arm, write), so arms run one after
    # another in the same directory keep every entry.
    def write_arm_record(self, arm: str, status: str, **fields: Any) -> None:
        record = {"status": status, "version": __version__, "libraries": scoring_libraries(),
                  "host": socket.gethostname(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        arms = self.arm_records()
        arms[arm] = record
        try:
            atomic_write_json(self.path / "record.json", {"arms": arms})
        except OSError:
            if status != "interrupted":
                raise
            # best effort: on a full disk the error that interrupted the run must surface, not this one

    def arm_records(self) -> dict[str, dict]:
        """Each arm's record; {} where there is none (a record of an older version holds one arm)."""
        try:
            stored = json.loads((self.path / "record.json").read_text())
        except (OSError, ValueError):
            return {}
        if isinstance(stored, dict) and isinstance(stored.get("arms"), dict):
            return stored["arms"]
        return {stored.get("arm", "icl"): stored} if isinstance(stored, dict) and "status" in stored else {}

    # -- conditions ---------------------------------------------------------------------------
    def condition_dir(self, cond: Condition) -> Path:
        return self.path / "conditions" / cond.dirname

    def is_done(self, cond: Condition) -> bool:
        """True when the condition's record says ok and every listed file matches its size and sha256:
        a truncated or altered file makes the condition unfinished, so a resumed run computes it again."""
        record = self.read_record(self.condition_dir(cond))
        if not record or record.get("status") != "ok" or record.get("condition") != cond.id:
            return False
        return all(file_matches(self.condition_dir(cond) / name, info)
                   for name, info in record.get("files", {}).items())

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
            digests[name] = write_checked(cdir / name, data)
        fault_point("condition-record")
        self._write_condition_record(cond, "ok", files=digests, **fields)

    def write_condition_error(self, cond: Condition, message: str, **fields: Any) -> None:
        atomic_write_json(self.condition_dir(cond) / "condition.json", {"id": cond.id, **cond.model_dump(mode="json")})
        self._write_condition_record(cond, "error", error=message, **fields)

    def _write_condition_record(self, cond: Condition, status: str, **fields: Any) -> None:
        record = {"status": status, "condition": cond.id, **cond.row(), "version": __version__,
                  "libraries": scoring_libraries(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
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
        """Check every file of a finished condition against the size and checksum in its record."""
        for name, info in record.get("files", {}).items():
            if not file_matches(cdir / name, info):
                raise ValueError(f"{cdir / name} does not match the checksum in its record (missing, cut short or "
                                 "changed); rerun the command that made it: a resumed run computes it again")
