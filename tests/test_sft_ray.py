"""The SFT arm on the Ray executor (tiny random Llama, real SmolLM2 tokenizer): a one-arm work graph whose
trainings run in parallel worker processes beside its scorer actor, a pre-started cluster is reused, and a
failed first attempt is retried. One local Ray cluster (3 CPUs: the scorer's and two trainers') serves the
module; the retry test lets run_spec start its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from logcapture import capture

from iclsft.arms import make_sft_spec
from iclsft.arms.linear2d import plan_jobs
from iclsft.graph.driver import run_spec
from iclsft.prompts import prompt_builders
from iclsft.sft.adapters import MARKER, read_marker
from iclsft.sft.train import train
from iclsft.spec import ExecutorSpec, sft_spec
from iclsft.store import RunDir

ray = pytest.importorskip("ray")
pytest.importorskip("peft")

SHOTS = (1, 2)


pytestmark = pytest.mark.usefixtures("one_thread")



def _progress(logs: list[str]) -> list[str]:
    """A run's log lines without its start-up warnings (e.g. integers split into several tokens)."""
    return [line for line in logs if not line.startswith("warning:")]

@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "iclsft-home"))
    monkeypatch.delenv("ICLSFT_FAULT_TRAIN_ONCE", raising=False)


@pytest.fixture(scope="module")
def _ray_module():
    yield
    if ray.is_initialized():
        ray.shutdown()


@ray.remote(num_cpus=1)
def _warm_worker() -> int:
    """Import what a training needs, and stay busy long enough that every CPU gets a worker."""
    import time

    import peft  # noqa: F401
    import transformers  # noqa: F401

    import iclsft.sft.train  # noqa: F401

    time.sleep(1.0)
    return os.getpid()


@pytest.fixture
def ray_cluster(_ray_module):
    """A local 3-CPU cluster (a scorer actor and two trainer slots) with three warm workers, started once
    (again only if a test shut it down)."""
    if not ray.is_initialized():
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        ray.get([_warm_worker.remote() for _ in range(3)])
    return ray


def make_spec(model_dir, executor: ExecutorSpec, min_steps: int):
    return make_sft_spec(model=str(model_dir), angles=(45.0,), shots=SHOTS, grid_step=10,
                         sft=sft_spec("lora", lr=1e-2, epochs=1, min_steps=min_steps), executor=executor)


def planned_jobs(spec, ref, run_path, tokenizer):
    builders = prompt_builders(tokenizer, spec.template, spec.tasks)
    jobs, _ = plan_jobs(spec, RunDir(run_path), ref, builders)
    return jobs


def records(run: Path) -> dict[int, dict]:
    out = {}
    for cdir in (run / "conditions").iterdir():
        record = json.loads((cdir / "record.json").read_text())
        out[record["shots"]] = record
    return out


def overlap(intervals: list[tuple[float, float]]) -> bool:
    return max(start for start, _ in intervals) < min(end for _, end in intervals)


def test_run_sft_on_a_running_cluster_trains_in_parallel(ray_cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    spec, ref = make_spec(tiny_model_dir, ExecutorSpec(), min_steps=40)
    assert spec.executor.name == "ray"
    logs: list[str] = []
    with capture(logs):
        table = run_spec(spec, out, ref, progress=False)
    assert "2 conditions, 0 already finished, 2 to run; 2 models to train" in _progress(logs)[0]
    assert not any(line.startswith("ray:") for line in logs)  # the running cluster was reused ...
    assert ray.is_initialized()  # ... and left running
    assert json.loads((out / "record.json").read_text())["arms"]["sft-lora"]["status"] == "ok"
    assert sorted(table["shots"]) == list(SHOTS)
    recs = records(out)
    assert all(r["status"] == "ok" and r["train_steps"] == 40 for r in recs.values())
    # each marker records when its training saved (file time) and how long it had run (seconds)
    intervals = []
    for r in recs.values():
        ckpt = out / "adapters" / r["checkpoint_dir"]
        marker = read_marker(ckpt)
        assert marker["step"] == 40 and marker["shots"] == r["shots"]
        end = (ckpt / MARKER).stat().st_mtime
        intervals.append((end - marker["seconds"], end))
    assert overlap(intervals), intervals


def test_trainings_run_in_different_workers_at_the_same_time(ray_cluster, tiny_model_dir, smollm_tokenizer,
                                                            tmp_path):
    spec, ref = make_spec(tiny_model_dir, ExecutorSpec(), min_steps=40)
    jobs = planned_jobs(spec, ref, tmp_path / "run", smollm_tokenizer)
    assert len(jobs) == 2
    remote = ray.remote(num_cpus=1)(train)
    results = ray.get([remote.remote(job) for job in jobs])
    assert all(r["trained"] and len(r["losses"]) == 40 for r in results)
    pids = {r["pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids
    assert overlap([(r["started"], r["finished"]) for r in results]), results
    assert {r["key"] for r in results} == {job.key for job in jobs}


def test_failed_first_attempts_are_retried(ray_cluster, tiny_model_dir, smollm_tokenizer, tmp_path, monkeypatch):
    """Every training's first attempt fails (injected); Ray retries it, and the run succeeds. run_sft starts
    Ray itself here, handing the ICLSFT_* variables to the workers, and shuts it down again."""
    ray.shutdown()
    fault_dir = tmp_path / "faults"
    monkeypatch.setenv("ICLSFT_FAULT_TRAIN_ONCE", str(fault_dir))
    out = tmp_path / "run"
    spec, ref = make_spec(tiny_model_dir, ExecutorSpec(max_retries=1), min_steps=3)
    keys = {job.key for job in planned_jobs(spec, ref, out, smollm_tokenizer)}
    logs: list[str] = []
    with capture(logs):
        run_spec(spec, out, ref, progress=False)
    assert any(line.startswith("ray:") for line in logs), logs  # started here ...
    assert not ray.is_initialized()  # ... and shut down
    assert sorted(p.name for p in fault_dir.iterdir()) == sorted(f"attempted-{k[:16]}" for k in keys)
    assert all(r["status"] == "ok" and r["train_steps"] == 3 for r in records(out).values())
    assert json.loads((out / "record.json").read_text())["arms"]["sft-lora"]["status"] == "ok"

    again: list[str] = []
    with capture(again):
        run_spec(spec, out, ref, progress=False)
    assert "2 conditions, 2 already finished, 0 to run; 0 models to train, 0 reused" in _progress(again)[0]
    assert not any(line.startswith("ray:") for line in again)  # nothing to train: Ray is not even started
    assert len(list(fault_dir.iterdir())) == 2
