"""An arm's pass over its run directory (iclsft.arms.runner.ArmRun) with a stand-in arm: no model, real run
directory, each outcome handed over as the work graph's driver hands it (`done`, `failed`). What every arm
of both studies gets from it: per-arm run records, failures recorded while the other conditions go on, an
interrupted run recorded as such, progress lines that tell conditions apart, and the metrics table rebuilt
from the stored scores. The graph's side: tests/test_graph_run.py."""

from __future__ import annotations

import json
import socket
import time
import traceback

import numpy as np
import pytest
from logcapture import capture

from iclsft.arms.runner import ArmRun, Outcome
from iclsft.artifacts import parquet_bytes
from iclsft.errors import ConditionsFailed
from iclsft.spec import IclRunSpec, ModelSpec, SftRunSpec, TaskSpec
from iclsft.store import RunDir
from iclsft.tasks import linear2d

MODEL = ModelSpec(name="stand-in", fingerprint="0" * 16)
TASKS = (TaskSpec(angle=45, grid_step=25), TaskSpec(name="xor", angle=0, grid_step=25))


class StandIn:
    """Scores every query with lp_0 - lp_1 = the signed distance to the 45° boundary: a perfect
    linear2d classifier. `fail_training` / `fail_scoring`: shot counts whose step fails."""

    def __init__(self, spec, fail_training=(), fail_scoring=(), interrupt_at=None):
        self.spec, self.closed = spec, False
        self.fail_training, self.fail_scoring, self.interrupt_at = fail_training, fail_scoring, interrupt_at

    trains = False  # no checkpoints of its own to keep or delete

    def redo(self, run):
        return 0

    def prepare(self, run, todo):
        return f"{len(todo)} planned"

    def outcome(self, cond):
        if cond.shots in self.fail_scoring:
            raise ValueError("scores out of range")
        scores = linear2d.queries(cond.task)
        scores["lp_0"] = linear2d.margin(scores.n1, scores.n2, 45.0) / 10
        scores["lp_1"] = 0.0
        return Outcome({"scores.parquet": parquet_bytes(scores)}, {"metrics": {"accuracy": 1.0}})

    @staticmethod
    def describe(metrics):
        return f"accuracy {metrics['accuracy']:.3f}"

    def close(self):
        self.closed = True

    def record(self):
        return {}


def run_arm(arm: StandIn, out) -> object:
    """As the work graph's driver runs an arm: each condition's outcome (or its training's failure) handed to
    the arm's ArmRun; an interruption recorded; the run's metrics table at the end."""
    run = RunDir(out)
    run.open(arm.spec)
    run.acquire_lock()
    try:
        state = ArmRun(arm, run)
        try:
            for cond in state.todo:
                if cond.shots == arm.interrupt_at:
                    raise KeyboardInterrupt
                if cond.shots in arm.fail_training:
                    state.failed(cond, "Traceback (most recent call last):\nRuntimeError: training died")
                    continue
                if cond.checkpoint == 1.0:  # its training's time, once per training (the driver's trainer record)
                    state.busy.add("trainer", f"w{cond.shots}", 2.0)
                t0 = time.time()
                try:
                    outcome = arm.outcome(cond)
                except ValueError:
                    state.failed(cond, traceback.format_exc())
                    continue
                state.done(cond, outcome, "stand-in", time.time() - t0, socket.gethostname())
        except BaseException as e:
            state.interrupted(e)
            raise
        finally:
            arm.close()
        return state.finish()
    finally:
        run.release_lock()


def icl_spec(**kw):
    return IclRunSpec(tasks=TASKS, model=MODEL, shots=(1, 2), orders=("random", "1221"), **kw)


def sft_spec_(**kw):
    return SftRunSpec(tasks=TASKS[:1], model=MODEL, shots=(1, 2), checkpoints=(0.5, 1.0), **kw)


def test_every_arm_keeps_its_own_run_record_and_the_table_comes_from_the_scores(tmp_path):
    icl = StandIn(icl_spec())
    table = run_arm(icl, tmp_path)
    assert icl.closed
    run_arm(StandIn(sft_spec_()), tmp_path)
    arms = json.loads((tmp_path / "record.json").read_text())["arms"]
    assert set(arms) == {"icl", "sft-lora"}  # the second arm did not overwrite the first
    assert arms["icl"]["status"] == "ok" and arms["icl"]["conditions"] == 8 and arms["icl"]["failed"] == 0
    assert arms["sft-lora"]["status"] == "ok" and arms["sft-lora"]["conditions"] == 4
    # the metrics are recomputed from the written scores: the stand-in is perfect on linear2d at 45°
    linear = table[table.task == "linear2d"]
    assert len(table) == 8 and (linear.accuracy == 1.0).all()
    xor = table[table.task == "xor"]  # a line against a cross: half right, by counting
    n1, n2 = linear2d.lattice(25)
    truth = linear2d.task_truth(TASKS[1], n1, n2)
    pred = np.where(linear2d.margin(n1, n2, 45.0) >= 0, 0, 1)
    assert xor.accuracy.tolist() == pytest.approx([np.mean(pred[truth >= 0] == truth[truth >= 0])] * 4)


def test_failures_are_recorded_and_the_others_finish_then_a_rerun_retries_only_them(tmp_path):
    logs: list[str] = []
    with capture(logs), pytest.raises(ConditionsFailed) as failed:
        run_arm(StandIn(sft_spec_(), fail_training=(1,), fail_scoring=(2,)), tmp_path)
    assert str(failed.value).startswith("4 of 4 sft-lora conditions failed (first: RuntimeError: training died")
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("conditions/*/record.json"))]
    assert sorted(r["error"] for r in records) == ["RuntimeError: training died"] * 2 + [
        "ValueError: scores out of range"] * 2
    assert all("Traceback" in r["traceback"] for r in records)
    assert json.loads((tmp_path / "record.json").read_text())["arms"]["sft-lora"]["status"] == "error"

    logs.clear()
    with capture(logs), pytest.raises(ConditionsFailed, match="2 of 4"):
        run_arm(StandIn(sft_spec_(), fail_scoring=(2,)), tmp_path)
    assert "sft-lora: 4 conditions, 0 already finished, 4 to run; 4 planned" in logs[0]
    logs.clear()
    with capture(logs):
        run_arm(StandIn(sft_spec_()), tmp_path)
    assert "sft-lora: 4 conditions, 2 already finished, 2 to run; 2 planned" in logs[0]
    assert json.loads((tmp_path / "record.json").read_text())["arms"]["sft-lora"]["status"] == "ok"


def test_an_interrupted_arm_says_so_and_keeps_what_finished(tmp_path):
    arm = StandIn(icl_spec(), interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_arm(arm, tmp_path)
    assert arm.closed
    record = json.loads((tmp_path / "record.json").read_text())["arms"]["icl"]
    assert record["status"] == "interrupted" and record["error"] == "KeyboardInterrupt: "
    assert len(list(tmp_path.glob("conditions/*/record.json"))) == 1  # K=1 of the first task and order


def test_progress_lines_tell_every_condition_apart(tmp_path):
    logs: list[str] = []
    with capture(logs):
        run_arm(StandIn(icl_spec()), tmp_path)
        run_arm(StandIn(sft_spec_()), tmp_path)
    lines = [m for m in logs if m.startswith("[")]
    assert len(lines) == 12
    labels = [line.split(": ", 1)[0].split("] ", 1)[1] for line in lines]
    assert len(set(labels)) == 12  # task, order, method, K, seed and checkpoint all named
    assert "[3/8] linear2d angle 45 order 1221 icl K=1 seed 0: stand-in, accuracy 1.000" in lines[2]
    assert any("order random lora K=2 seed 0 ckpt 0.5" in line for line in lines)


def test_the_arm_record_sums_busy_time_per_role_and_worker(tmp_path):
    logs: list[str] = []
    with capture(logs):
        run_arm(StandIn(sft_spec_()), tmp_path)
    busy = json.loads((tmp_path / "record.json").read_text())["arms"]["sft-lora"]["busy"]
    # the stand-in's trainings: 2 s on worker w1 and 2 s on w2 (one per K), counted once each
    assert busy["trainer"]["seconds"] == 4.0 and busy["trainer"]["workers"] == 2
    assert busy["scorer"]["workers"] == 1 and 0 <= busy["scorer"]["utilisation"] <= 1
    assert any(m.startswith("sft-lora: 4 conditions in") and "trainers busy 4 s on 2 workers" in m for m in logs)
