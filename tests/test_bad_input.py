"""The bad-input catalogue (docs/reliability.md): each bad input gives exit code 1 and one line
(`Error: ...`) saying what is wrong and what is allowed, no traceback, and leaves every finished
result as it was. Tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from iclsft.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ICL = ["--angle", "30", "--shots", "1,2", "--grid-step", "20", "--engine", "hf", "--quiet"]


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def one_error(code: int, output: str) -> str:
    """The single `Error:` line of a refused command."""
    assert code == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # the lock file names its last holder


@pytest.fixture(scope="module")
def icl_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("icl") / "run"
    code, output = invoke("icl", "--model", tiny_model_dir, "--out", out, *ICL)
    assert code == 0, output
    return out


@pytest.fixture
def run(icl_run, tmp_path) -> Path:
    shutil.copytree(icl_run, tmp_path / "run")
    return tmp_path / "run"


# -- sweep configs: refused before anything is written -------------------------------------------
def sweep_with(tmp_path: Path, model: Path, text: str | None = None, **changes) -> tuple[str, Path]:
    config = tmp_path / "sweep.yaml"
    out = tmp_path / "out"
    if text is None:
        text = yaml.safe_dump({"out": str(out), "models": [str(model)], "tasks": [{"angles": [30]}],
                               "methods": ["icl"], "shots": [1, 2], "grid_step": 20, "engine": "hf",
                               "report": False, **changes})
    config.write_text(text)
    code, output = invoke("sweep", config, "--quiet")
    line = one_error(code, output)
    assert not out.exists(), "a refused config wrote something"
    return line, config


CONFIGS = {
    # name: (yaml text or None for the default config, changes, texts the line must hold)
    "malformed-yaml": ("shots: [1, 2\n", {}, ["is not valid YAML", "expected ',' or ']'", "line 2, column 1"]),
    "empty-file": ("", {}, ["must be a mapping of keys to values", "`out: DIR`", "not an empty file"]),
    "not-a-mapping": ("- 1\n- 2\n", {}, ["must be a mapping", "not a list"]),
    "unknown-key": (None, {"shot": [1]}, ["unknown key 'shot'", "allowed here: out, models, tasks"]),
    "unknown-nested-key": (None, {"tasks": [{"angle": [30]}]}, ["unknown key 'tasks.0.angle'",
                                                                "allowed here: name, angles"]),
    "wrong-type": (None, {"grid_step": "fine"}, ["grid_step: Input should be a valid integer", "(got 'fine')"]),
    "wrong-method": (None, {"methods": ["icl", "qlora"]}, ["methods: method 'qlora' is not allowed",
                                                          "allowed: icl, lora, full, full-frozen-unembed"]),
    "impossible-grid": (None, {"shots": [1, 5001]}, ["shot count 5001 is not allowed at angle 30",
                                                     "shots must be in 1.."]),
    "bad-grid-step": (None, {"grid_step": 3}, ["grid_step 3", "1, 2, 4, 5, 10"]),
    "inseparable-labels": (None, {"labels": [" B", " Baz"]}, ["' B'", "' Baz'", "ambiguous for this tokenizer"]),
    "unknown-sft-key": (None, {"sft": {"lora": {"epoch": 3}}}, ["sft.lora: epoch", "allowed keys: method, lr"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_sweep_config(case, tmp_path, tiny_model_dir):
    text, changes, expected = CONFIGS[case]
    line, _ = sweep_with(tmp_path, tiny_model_dir, text, **changes)
    for part in expected:
        assert part in line, (part, line)


def test_model_dir_without_weights(tmp_path, tiny_model_dir):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(tiny_model_dir / "config.json", empty / "config.json")
    line, _ = sweep_with(tmp_path, empty)
    assert f"model directory '{empty}' has no weights (expected *.safetensors or *.bin files)" in line
    code, output = invoke("icl", "--model", empty, "--out", tmp_path / "icl-out", *ICL)
    assert "has no weights" in one_error(code, output) and not (tmp_path / "icl-out").exists()


# -- damaged or foreign run directories ------------------------------------------------------------
def test_truncated_parquet_is_reported_by_readers_and_recomputed_by_a_rerun(run, tiny_model_dir):
    scores = sorted(run.glob("conditions/*/scores.parquet"))[0]
    scores.write_bytes(scores.read_bytes()[: scores.stat().st_size // 2])
    for command in ("metrics", "report"):
        line = one_error(*invoke(command, run))
        assert f"{scores} does not match the checksum in its record (missing, cut short or changed)" in line
        assert "a resumed run computes it again" in line
    untouched = {k: v for k, v in snapshot(run).items() if not k.startswith(f"conditions/{scores.parent.name}")
                 and k.startswith("conditions/")}
    code, output = invoke("icl", "--model", tiny_model_dir, "--out", run, *ICL)
    assert code == 0, output
    assert pd.read_parquet(scores).shape[0] == 25  # recomputed in full
    assert {k: v for k, v in snapshot(run).items() if k in untouched} == untouched


def test_run_dir_of_an_old_layout(run, tiny_model_dir):
    spec = json.loads((run / "spec.json").read_text())
    (run / "spec.json").write_text(json.dumps(spec["arms"]["icl"]))  # 0.0 layout: one spec, no arms
    before = snapshot(run)
    line = one_error(*invoke("icl", "--model", tiny_model_dir, "--out", run, *ICL))
    assert "was not written by this version of iclsft-eval (no 'arms'); use a new --out directory" in line
    assert snapshot(run) == before


def test_run_dir_of_another_hash_version(run, tiny_model_dir):
    spec = json.loads((run / "spec.json").read_text())
    spec["arms"]["icl"]["hash_version"] = "v0"
    (run / "spec.json").write_text(json.dumps(spec))
    before = snapshot(run)
    line = one_error(*invoke("icl", "--model", tiny_model_dir, "--out", run, *ICL))
    assert ("was made by another version of iclsft-eval (condition ids 'v0', this version 'v3'): run "
            f"`iclsft-eval migrate {run}`") in line
    assert "choose another --out" in line
    assert snapshot(run) == before


def test_full_disk(tiny_model_dir, tmp_path, monkeypatch):
    """The disk fills while the second condition is written: one line names the file and what to do;
    the first condition stays finished, nothing half-written is left, and once there is space the same
    command finishes the run with the numbers of an uninterrupted one."""
    real_fsync = os.fsync
    seen: list[str] = []

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        if sum(".scores.parquet." in name for name in seen) >= 2:  # full from the 2nd scores.parquet on
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", fsync)
    line = one_error(*invoke("icl", "--model", tiny_model_dir, "--out", out, *ICL))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "No space left on device while writing" in line and "scores.parquet" in line
    assert "free some space, then rerun the same command (finished results are kept)" in line
    records = [json.loads(p.read_text()) for p in out.glob("conditions/*/record.json")]
    assert [r["shots"] for r in records if r["status"] == "ok"] == [1]
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]  # no temporary left behind
    code, output = invoke("icl", "--model", tiny_model_dir, "--out", out, *ICL)
    assert code == 0, output
    clean = tmp_path / "clean"
    assert invoke("icl", "--model", tiny_model_dir, "--out", clean, *ICL)[0] == 0
    drop = ["seconds"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet").drop(columns=drop, errors="ignore"),
                                  pd.read_parquet(clean / "metrics.parquet").drop(columns=drop, errors="ignore"))


def test_non_ascii_paths(tiny_model_dir, tmp_path):
    """Model, run directory and report under names with accents, CJK and spaces just work."""
    model = tmp_path / "modèle モデル"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "résultats 実験 ü"
    code, output = invoke("icl", "--model", model, "--out", out, *ICL)
    assert code == 0, output
    code, output = invoke("metrics", out)
    assert code == 0, output
    table, summary = output.strip().split("\n\n")
    assert len(table.splitlines()) == 3 and summary.startswith("ICL θ=30°:"), output  # header, K=1, K=2
    code, output = invoke("report", out)
    assert code == 0, output
    html = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "résultats 実験 ü" in html
    assert json.loads((out / "spec.json").read_text(encoding="utf-8"))["arms"]["icl"]["model"]["name"] == str(model)
