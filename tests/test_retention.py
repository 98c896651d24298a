"""`checkpoints_keep` (iclsft.sft.retention) on the arm runner's path (one process, `executor: local`):
what each policy deletes and when, results equal to keeping everything, reruns that compute nothing
and call nothing damaged, the refusal of work that needs a deleted checkpoint, and SIGKILL during a
deletion. The work graph's deletions: tests/test_graph_run.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from iclsft.cli import main
from iclsft.errors import DeletedCheckpointError
from iclsft.sft.adapters import checkpoint_problem, is_finished, read_marker
from iclsft.sft.retention import deletable
from iclsft.sweep import SweepConfig, model_dir, run_sweep

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ["seconds", "train_seconds", "trained_now", "finished"]


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))


def test_what_each_policy_deletes():
    table = {(p, f, lora): deletable(p, f, lora) for p in ("all", "final", "none") for f in (0.5, 1.0)
             for lora in (False, True)}
    assert [k for k, v in table.items() if v] == [("final", 0.5, False), ("none", 0.5, False), ("none", 1.0, False)]
    with pytest.raises(ValueError, match="checkpoints_keep 'some' is not allowed; allowed: all, final, none"):
        deletable("some", 1.0, False)


def test_config_keys_and_the_old_name(tmp_path):
    base = {"out": str(tmp_path), "models": ["m"]}
    assert SweepConfig(**base).checkpoints_keep == "all"
    assert SweepConfig(**base, drop_full_weights=True).checkpoints_keep == "none"
    assert SweepConfig(**base, drop_full_weights=False).checkpoints_keep == "all"
    with pytest.raises(ValueError, match="drop_full_weights: true means checkpoints_keep: none, not 'final'"):
        SweepConfig(**base, drop_full_weights=True, checkpoints_keep="final")
    with pytest.raises(ValueError, match="checkpoints_keep"):
        SweepConfig(**base, checkpoints_keep="most")
    result = CliRunner().invoke(main, ["sft", "--out", str(tmp_path / "x"), "--checkpoints-keep", "most"])
    assert result.exit_code == 2 and "'most' is not one of 'all', 'final', 'none'" in result.output


def config(model: Path, out: Path, **changes) -> SweepConfig:
    data = {"out": str(out), "models": [str(model)], "tasks": [{"name": "linear2d", "angles": [45]}],
            "methods": ["lora", "full"], "shots": [1, 2], "seeds": [0], "checkpoints": [0.5, 1.0], "grid_step": 25,
            "engine": "hf", "rsa": True, "report": False, "executor": {"name": "local"},
            "sft": {m: {"epochs": 1, "min_steps": 2, "batch_size": 2} for m in ("lora", "full")}}
    return SweepConfig(**(data | changes))


def records(run: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "record.json").read_text()) for d in run.glob("conditions/*/")}


def full_checkpoints(run: Path) -> dict[str, dict]:
    return {p.name: read_marker(p) for p in (run / "adapters").iterdir()
            if is_finished(p) and read_marker(p)["method"] == "full"}


def weights(run: Path, name: str) -> list[str]:
    return sorted(f.name for f in (run / "adapters" / name).glob("*.safetensors"))


@pytest.fixture(scope="module")
def kept(tiny_model_dir, tmp_path_factory) -> Path:
    cfg = config(tiny_model_dir, tmp_path_factory.mktemp("all"))
    run_sweep(cfg, progress=False)
    return model_dir(cfg.out, cfg.models[0])


def assert_same_results(run: Path, reference: Path) -> None:
    from iclsft.rsa.run import load_rsa

    a, b = (pd.read_parquet(d / "metrics.parquet").drop(columns=TIMING, errors="ignore") for d in (run, reference))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert sorted(records(run)) == sorted(records(reference))
    for name, rec in records(run).items():
        assert rec["status"] == "ok", rec
        got, want = load_rsa(run / "conditions" / name), load_rsa(reference / "conditions" / name)
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("policy", ["none", "final"])
def test_local_sweep_deletes_after_rsa_with_the_same_results(kept, tiny_model_dir, tmp_path, policy, caplog):
    cfg = config(tiny_model_dir, tmp_path / "out", checkpoints_keep=policy)
    run_sweep(cfg, progress=False)
    run = model_dir(cfg.out, cfg.models[0])
    assert_same_results(run, kept)
    markers = full_checkpoints(run)
    assert len(markers) == 4  # 2 trainings x 2 checkpoints
    for name, marker in markers.items():
        assert marker["files"] == read_marker(kept / "adapters" / name)["files"]  # what was scored, by checksum
        if policy == "final" and marker["fraction"] == 1.0:
            assert weights(run, name) == ["model.safetensors"]
        else:
            assert weights(run, name) == [] and marker["deleted"]["policy"] == policy
    lora = [p for p in (run / "adapters").iterdir() if is_finished(p) and read_marker(p)["method"] == "lora"]
    assert len(lora) == 4 and all(checkpoint_problem(p) is None for p in lora)
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file() and "conditions" in f.parts}
    caplog.clear()
    run_sweep(cfg, progress=False)  # nothing to compute, nothing damaged
    assert {f: f.stat().st_mtime_ns for f in before} == before
    assert "set aside" not in caplog.text and not list((run / "adapters").glob(".damaged-*"))


def test_sft_command_keeps_none_and_refuses_a_condition_it_would_need_them_for(tiny_model_dir, tmp_path):
    """`sft --checkpoints-keep none`: a new order added later shares the deleted training: refused in one
    line naming --retrain-deleted; with it, trained again, scored, and deleted again."""
    out = tmp_path / "run"
    args = ["sft", "--method", "full", "--model", str(tiny_model_dir), "--angle", "45", "--shots", "1", "--seed", "0",
            "--grid-step", "25", "--epochs", "1", "--min-steps", "2", "--batch-size", "2", "--executor", "local",
            "--engine", "hf", "--out", str(out), "--quiet", "--checkpoints-keep", "none"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (name,) = full_checkpoints(out)
    assert weights(out, name) == []
    # a damaged condition file makes that condition todo again: its checkpoint is needed, and deleted
    (cdir,) = out.glob("conditions/*/")
    (cdir / "scores.parquet").write_bytes(b"damaged")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "Traceback" not in again.output
    error = [line for line in again.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "deleted on purpose (checkpoints_keep: none" in error[0], again.output
    assert "--retrain-deleted" in error[0]
    fixed = CliRunner().invoke(main, [*args, "--retrain-deleted"])
    assert fixed.exit_code == 0, fixed.output
    assert {r["status"] for r in records(out).values()} == {"ok"}
    (name,) = full_checkpoints(out)
    assert weights(out, name) == [] and read_marker(out / "adapters" / name)["deleted"]["policy"] == "none"


def test_rsa_of_a_deleted_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir, tmp_path / "out", methods=["full"], shots=[1], checkpoints=[1.0], rsa=False,
                 checkpoints_keep="none")
    run_sweep(cfg, progress=False)
    run = model_dir(cfg.out, cfg.models[0])
    from iclsft.sft.checkpoints import verify_checkpoint

    (name,) = full_checkpoints(run)
    with pytest.raises(DeletedCheckpointError, match=f"checkpoint {name} was deleted on purpose .*--retrain-deleted"):
        verify_checkpoint(run / "adapters" / name)
    result = CliRunner().invoke(main, ["rsa", str(run)])
    assert result.exit_code == 1 and "deleted on purpose" in result.output and "--retrain-deleted" in result.output


@pytest.mark.parametrize("point,left", [("checkpoint-delete", ["model.safetensors"]),
                                        ("checkpoint-delete-file", [])])
def test_sigkill_during_a_deletion_then_the_rerun_finishes_it(tiny_model_dir, tmp_path, point, left):
    """Killed after the marker says "deleted" (its file still there) or after the file went: the
    checkpoint is never read or trained again, it verifies as deleted (not damaged), and the rerun
    deletes what is left, scores the condition left and recomputes nothing that finished."""
    out = tmp_path / "run"
    args = ["sft", "--method", "full", "--model", str(tiny_model_dir), "--angle", "45", "--shots", "1", "--seed", "0",
            "--grid-step", "25", "--epochs", "1", "--min-steps", "2", "--batch-size", "2", "--executor", "local",
            "--engine", "hf", "--out", str(out), "--quiet", "--checkpoints-keep", "none", "--checkpoints", "0.5,1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ICLSFT_FAULT_AT": point}
    killed = subprocess.run([sys.executable, "-m", "iclsft.cli", *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    markers = full_checkpoints(out)
    # the first checkpoint's condition written, then its deletion cut short (each goes once it is read)
    assert len(markers) == 2 and all(r["status"] == "ok" for r in records(out).values()) and len(records(out)) == 1
    deleted = [n for n, m in markers.items() if "deleted" in m]
    assert len(deleted) == 1 and weights(out, deleted[0]) == left
    assert "deleted on purpose" in checkpoint_problem(out / "adapters" / deleted[0])
    before = {f: f.stat().st_mtime_ns for f in out.glob("conditions/*/*")}
    env.pop("ICLSFT_FAULT_AT")
    rerun = subprocess.run([sys.executable, "-m", "iclsft.cli", *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "set aside" not in rerun.stderr  # warnings show under --quiet: nothing was called damaged
    assert {f: f.stat().st_mtime_ns for f in before} == before  # no condition computed again
    assert len(records(out)) == 2 and all(r["status"] == "ok" for r in records(out).values())
    assert all(weights(out, n) == [] and "deleted" in m for n, m in full_checkpoints(out).items())
