"""`iclsft-eval migrate RUN`: rewrite a run directory made by an earlier version for this one
(iclsft.versions.HASH_VERSION), so that it resumes instead of being refused.

    summary = migrate("runs/old")   # or a sweep's out folder: each model's run directories

Each condition's stored fields are read back into its study's condition type (what later versions added
takes its default, or what its version used where that differs: `Study.upgrade`), which gives its id under
this version; its
directory is renamed to match, and every JSON file in it that names the old id (record.json, rsa.json)
names the new one; records that name other conditions' directories (`shared_with`) follow. Each arm's
stored spec is read back the same way and written at this version, spec.json last (a killed migration
is finished by running it again: conditions already moved are left as they are); the metrics table
is recomputed. Nothing is scored or trained: scores, checkpoints (whose names do not change) and RSA
files stay byte for byte. A version a study cannot migrate from (`Study.migrates_from`: its scores
would differ, not just its ids) is refused with one line, before anything is written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from iclsft.artifacts import atomic_write_json
from iclsft.engine_spec import nested
from iclsft.evaluate.runs import recompute_metrics
from iclsft.store import RunDir
from iclsft.study import Study, of_arms, studies
from iclsft.versions import HASH_VERSION


def migrate(path: str | Path) -> list[dict]:
    """Migrate the run directory `path`, or every run directory of a sweep's out folder (OUT/<model>/ and
    each study's folder in it); one summary per run directory: path, versions, conditions renamed."""
    root = Path(path)
    runs = run_dirs(root)
    if not runs:
        raise FileNotFoundError(f"{str(root)!r} is neither a run directory (no spec.json) nor a sweep's out "
                                "folder holding run directories")
    checked = [(run, *check(run)) for run in runs]  # every directory is checked before any is written
    return [migrate_run(run, study, stored) for run, study, stored in checked]


def run_dirs(root: Path) -> list[Path]:
    """`root` if it is a run directory, else its sub-folders that are (a sweep's OUT/<model>/); each with
    its study folders that are (e.g. OUT/<model>/implicit/, also where OUT/<model>/ holds no 2D run)."""
    folders = [s.folder for s in studies() if s.folder]
    if (root / "spec.json").is_file():
        tops = [root]
    else:
        tops = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [run for top in tops for run in (top, *(top / f for f in folders)) if (run / "spec.json").is_file()]


def check(run: Path) -> tuple[Study, dict]:
    """The run's study and its spec.json, once every arm of it is at this version or at one its study
    migrates from."""
    stored = _stored(run)
    arms = stored["arms"]
    study = of_arms(arms)
    for name, arm in arms.items():
        version = arm.get("hash_version")
        if version != HASH_VERSION and version not in study.migrates_from:
            raise ValueError(f"{run}: arm {name} is of version {version!r}, which the {study.name} study cannot be "
                             f"migrated from (only {', '.join(study.migrates_from) or 'none'}: its scores would "
                             "differ, not just its ids); run it again into a new --out")
    return study, stored


def migrate_run(run: Path, study: Study, stored: dict) -> dict:
    """Migrate one checked run directory (`check`: its study and spec.json)."""
    arms = stored["arms"]
    versions = sorted({str(a.get("hash_version")) for a in arms.values()})
    if versions == [HASH_VERSION]:
        return {"run": str(run), "from": versions, "to": HASH_VERSION, "renamed": 0}
    rundir = RunDir(run)
    rundir.acquire_lock()  # no arm may run here meanwhile
    try:
        renamed = _conditions(run, study)
        specs = {name: _spec(study, arm) for name, arm in arms.items()}
        history = [*stored.get("migrated", []), {"from": versions, "to": HASH_VERSION, "conditions": renamed,
                                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        atomic_write_json(run / "spec.json", {"arms": specs, "migrated": history})
        if (run / "metrics.json").is_file() or (run / "metrics.parquet").is_file():
            recompute_metrics(run)
    finally:
        rundir.release_lock()
    return {"run": str(run), "from": versions, "to": HASH_VERSION, "renamed": renamed}


def _stored(run: Path) -> dict:
    try:
        stored = json.loads((run / "spec.json").read_text())
        arms = stored["arms"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{run}/spec.json cannot be read as a run's spec ({e}); nothing to migrate") from e
    if not isinstance(arms, dict) or not arms:
        raise ValueError(f"{run}/spec.json holds no arms; nothing to migrate")
    return stored


def _spec(study: Study, arm: dict) -> dict:
    """A stored arm spec at this version: read back into its type (fields added since take their defaults)."""
    kind = arm.get("kind")
    if kind not in study.spec_types:
        raise ValueError(f"the {study.name} study cannot read back arms of kind {kind!r} (no spec type for it)")
    fields = study.upgrade(arm, str(arm.get("hash_version"))) if study.upgrade else arm
    if isinstance(fields.get("engine"), dict):  # v1 and v2 stored the engine's options flat
        fields = {**fields, "engine": nested(fields["engine"])}
    spec = study.spec_types[kind].model_validate({**fields, "hash_version": HASH_VERSION})
    return spec.model_dump(mode="json")


def _conditions(run: Path, study: Study) -> int:
    """Rename every condition directory for its id under this version; returns how many moved."""
    base = run / "conditions"
    moves: dict[str, tuple[Path, object, str]] = {}  # dir name -> (dir, condition, the id it has)
    for cdir in sorted(base.glob("*/")) if base.is_dir() else []:
        try:
            fields = json.loads((cdir / "condition.json").read_text())
        except (OSError, ValueError):
            continue  # never written (a killed run): it is computed again when the run resumes
        old_id = fields.pop("id", None)
        if study.upgrade is not None and old_id and not old_id.startswith(f"{HASH_VERSION}-"):
            fields = study.upgrade(fields, old_id.split("-", 1)[0])
        cond = study.condition_type.model_validate(fields)
        moves[cdir.name] = (cdir, cond, old_id)
    names = {old: cond.dirname for old, (_, cond, _) in moves.items()}
    renamed = 0
    for old, (cdir, cond, _) in moves.items():
        for file in sorted(cdir.glob("*.json")):
            if file.name != "condition.json":
                _rename_in(file, cond.id, names)
        atomic_write_json(cdir / "condition.json", {"id": cond.id, **cond.model_dump(mode="json")})
        if names[old] != old:
            target = base / names[old]
            if target.exists():
                raise ValueError(f"{cdir} would move to {target}, which exists: two conditions with one id?")
            os.replace(cdir, target)
            renamed += 1
    return renamed


def _rename_in(file: Path, new_id: str, names: dict[str, str]) -> None:
    """A condition's JSON file with its `condition` id and `shared_with` directory names of this version (a
    file in a condition's directory names no other condition by `condition`)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return
    changed = dict(data)
    if "condition" in data:
        changed["condition"] = new_id
    if isinstance(data.get("shared_with"), list):
        changed["shared_with"] = [names.get(n, n) for n in data["shared_with"]]
    if changed != data:
        atomic_write_json(file, changed)
