"""`iclsft-eval migrate` on run directories made by the code before the version bump (tests/data/migrate,
its README says how): refused until migrated, then resumed with nothing computed again, the ids those
of today's specs, scores and metrics unchanged; a killed migration finishes when run again; versions a
study cannot migrate from are refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from iclsft import migrate as migrate_module
from iclsft.cli import main
from iclsft.models import fingerprint
from iclsft.runspec import make_icl_spec, make_implicit_spec, make_sft_spec
from iclsft.spec import sft_spec
from iclsft.versions import HASH_VERSION

DATA = Path(__file__).parent / "data" / "migrate"
FIXTURE_FINGERPRINT = "d32409be6b799059"  # the tiny model's when the directories were made
ICL = ["icl", "--angle", "45", "--shots", "1,2", "--grid-step", "10", "--model", "tiny-llama", "--out", "linear2d"]
SFT = ["sft", "--angle", "45", "--shots", "1", "--grid-step", "10", "--model", "tiny-llama", "--out", "linear2d",
       "--method", "lora", "--epochs", "1", "--min-steps", "2", "--executor", "local"]
IMPLICIT = ["implicit", "--tasks", "expression", "--shots", "0,1", "--eval-size", "4", "--train-size", "4",
            "--model", "tiny-llama", "--out", "implicit"]

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def old_runs(tmp_path, monkeypatch, tiny_model, smollm_tokenizer):
    """The stored directories in a folder beside the tiny model (./tiny-llama, as when they were made). Where
    this machine saves the tiny model with another fingerprint (other library versions), the stored one is
    replaced by it in every JSON file: the directories stay of the old version, only the model's name moves."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    tiny_model.save_pretrained(tmp_path / "tiny-llama")
    smollm_tokenizer.save_pretrained(tmp_path / "tiny-llama")
    for name in ("linear2d", "implicit"):
        shutil.copytree(DATA / name, tmp_path / name)
    now = fingerprint(tmp_path / "tiny-llama")
    if now != FIXTURE_FINGERPRINT:
        for f in tmp_path.glob("*/**/*.json"):
            f.write_text(f.read_text().replace(FIXTURE_FINGERPRINT, now))
    return tmp_path


def file_sums(run: Path, name: str) -> list[str]:
    """The sorted sha256 digests of every condition's `name` file."""
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in run.glob(f"conditions/*/{name}"))


def test_old_runs_are_refused_then_migrated_and_resumed(old_runs):
    refused = invoke(*ICL)
    assert refused.exit_code == 1 and "run `iclsft-eval migrate linear2d`" in refused.output, refused.output
    before = {run: (pd.read_parquet(old_runs / run / "metrics.parquet"), file_sums(old_runs / run, "scores.parquet"))
              for run in ("linear2d", "implicit")}
    adapters = sorted(p.name for p in (old_runs / "linear2d" / "adapters").iterdir())

    result = invoke("migrate", old_runs)  # the folder holding both: each run directory migrated
    assert result.exit_code == 0, result.output
    assert "linear2d: v1 -> v3, 3 condition directories renamed" in result.output
    assert "implicit: v2 -> v3, 4 condition directories renamed" in result.output

    # the ids are those today's code gives the same inputs
    icl, _ = make_icl_spec(model="tiny-llama", angles=[45], shots=[1, 2], grid_step=10)
    sft, _ = make_sft_spec(model="tiny-llama", angles=[45], shots=[1], grid_step=10,
                           sft=sft_spec("lora", epochs=1, min_steps=2))
    imp, _ = make_implicit_spec(model="tiny-llama", tasks=("expression",), shots=(0, 1), eval_size=4, train_size=4)
    for run, specs in (("linear2d", (icl, sft)), ("implicit", (imp,))):
        want = {c.dirname: c.id for s in specs for c in s.conditions()}
        found = {p.parent.name: json.loads(p.read_text())["id"]
                 for p in (old_runs / run).glob("conditions/*/condition.json")}
        assert found == want and all(i.startswith(f"{HASH_VERSION}-") for i in found.values())
        for p in (old_runs / run).glob("conditions/*/record.json"):
            assert json.loads(p.read_text())["condition"] == found[p.parent.name]
        stored = json.loads((old_runs / run / "spec.json").read_text())
        assert {a["hash_version"] for a in stored["arms"].values()} == {HASH_VERSION}
        assert stored["migrated"][0]["to"] == HASH_VERSION

    for args in (ICL, SFT, IMPLICIT):  # resumed: every condition finished, no model trained
        records = {p: p.stat().st_mtime_ns for p in old_runs.glob("*/conditions/*/record.json")}
        again = invoke(*args, "--quiet")
        assert again.exit_code == 0, again.output
        assert {p: p.stat().st_mtime_ns for p in old_runs.glob("*/conditions/*/record.json")} == records
    assert sorted(p.name for p in (old_runs / "linear2d" / "adapters").iterdir()) == adapters
    for run, (metrics, scores) in before.items():
        assert file_sums(old_runs / run, "scores.parquet") == scores  # byte for byte
        after = pd.read_parquet(old_runs / run / "metrics.parquet")
        pd.testing.assert_frame_equal(after.drop(columns="condition"), metrics.drop(columns="condition"))

    done = invoke("migrate", old_runs / "linear2d")
    assert done.exit_code == 0 and "at version v3 already, nothing to do" in done.output


def test_a_migration_killed_at_any_write_finishes_when_run_again(old_runs, monkeypatch, tmp_path):
    """Killed at each of its file writes and renames in turn (every one goes through os.replace), then run
    again: the directory ends as an uninterrupted migration leaves it."""

    def contents(run: Path) -> dict:
        out = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
               if p.is_file() and p.name not in ("spec.json", ".lock", "metrics.parquet", "metrics.json")}
        spec = json.loads((run / "spec.json").read_text())
        return out | {"arms": spec["arms"], "metrics": pd.read_parquet(run / "metrics.parquet")
                      .drop(columns="condition").to_json()}

    real, calls = migrate_module.os.replace, []

    def counted(src, dst):
        calls.append(src)
        real(src, dst)

    whole = tmp_path / "whole"
    shutil.copytree(old_runs / "linear2d", whole)
    monkeypatch.setattr(migrate_module.os, "replace", counted)
    migrate_module.migrate(whole)
    writes = len(calls)
    assert writes >= 8  # records, condition files, renames, spec.json, metrics
    want = contents(whole)
    for n in range(1, writes + 1):
        run = tmp_path / f"killed-{n}"
        shutil.copytree(old_runs / "linear2d", run)
        calls.clear()

        def dies(src, dst, n=n):
            calls.append(src)
            if len(calls) == n:
                raise KeyboardInterrupt
            real(src, dst)

        monkeypatch.setattr(migrate_module.os, "replace", dies)
        with pytest.raises(KeyboardInterrupt):
            migrate_module.migrate(run)
        monkeypatch.setattr(migrate_module.os, "replace", real)
        migrate_module.migrate(run)
        got = contents(run)
        assert got == want, f"killed at write {n} of {writes}"


def test_versions_a_study_cannot_migrate_from_are_refused_before_anything_is_written(old_runs):
    spec = old_runs / "implicit" / "spec.json"
    stored = json.loads(spec.read_text())
    stored["arms"]["implicit-icl"]["hash_version"] = "v1"  # the suite's prompts before natural tokenization
    spec.write_text(json.dumps(stored))
    snapshot = {p: p.read_bytes() for p in old_runs.rglob("*") if p.is_file()}
    result = invoke("migrate", old_runs)
    assert result.exit_code == 1
    assert "arm implicit-icl is of version 'v1', which the implicit study cannot be migrated from (only v2" \
        in result.output
    assert {p: p.read_bytes() for p in old_runs.rglob("*") if p.is_file()} == snapshot  # linear2d/ untouched too
    missing = invoke("migrate", old_runs / "nothing")
    assert missing.exit_code == 1 and "is neither a run directory" in missing.output


def test_a_sweeps_out_folder_is_migrated_run_by_run(old_runs):
    """OUT/<model>/ with its 2D run and its implicit/ folder, and a model of the implicit suite alone (no 2D
    run: OUT/<model>/ holds only implicit/), as sweeps lay them out."""
    out = old_runs / "out"
    shutil.copytree(old_runs / "linear2d", out / "a")
    shutil.copytree(old_runs / "implicit", out / "a" / "implicit")
    shutil.copytree(old_runs / "implicit", out / "b" / "implicit")
    done = migrate_module.migrate(out)
    assert [(Path(d["run"]).relative_to(out).as_posix(), d["renamed"]) for d in done] == [
        ("a", 3), ("a/implicit", 4), ("b/implicit", 4)]
    assert [d["renamed"] for d in migrate_module.migrate(out)] == [0, 0, 0]
