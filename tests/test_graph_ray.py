"""The sweep's work graph on Ray (issue 16, Verify), tiny random Llama with SmolLM2's real tokenizer.

Every graph sweep here is checked against the same sweep run in one process (executor local, torch
at one thread as the scorer actors and trainers run): the metrics tables and every condition's raw
scores, to the last bit. On top of that:
- declared GPUs on a CPU machine (`ray.init(num_gpus=4)`): from the GPU ids Ray gave each work
  (graph.json's placement) no scorer shares a GPU with a trainer, whole or fractional; every
  condition is scored once (one progress line, one record);
- a two-node local cluster joined with ray_address, whose nodes have their own TMPDIR and ICLSFT_HOME
  (the base model found there by fingerprint), scoring, training and RSA (arrays equal to the
  reference's), then redoing a condition on a checkpoint the run holds: an audit hook in every worker
  logs each file event under the driver's directories, and none is logged (a task that does open a driver path is: the
  control). Reads from native code (safetensors, tokenizers) bypass audit hooks; the Python-side
  opens of the same model directory (config.json, tokenizer_config.json) do not;
- a scorer actor and a trainer killed with SIGKILL mid-sweep are retried; a scorer with no restarts
  left gets a successor; a driver killed mid-sweep is resumed by the rerun, which rewrites nothing
  finished;
- a full fine-tune arm opens one engine per scorer, not one per checkpoint.
Dedup (random and 1221 share a training at an even batch, not at batch 1) is covered in
tests/test_sft_dedup.py; here the graph only has to keep it: 2 trainings for 4 LoRA conditions,
records saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from logcapture import capture

from iclsft.errors import ConditionsFailed
from iclsft.sweep import SweepConfig, model_dir, run_sweep

ray = pytest.importorskip("ray")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ["seconds", "train_seconds", "trained_now", "finished"]
CONDITIONS = 8  # 4 ICL (K 1, 2 x two orders) + 4 LoRA
TRAININGS = 2  # one per K: at batch 2 the orders random and 1221 give the same batches


def sweep_config(model: Path, out: Path, **changes) -> dict:
    """ICL and LoRA (2 steps), K 1 and 2, orders random and 1221, on a 4 x 4 grid."""
    config = {"out": str(out), "models": [str(model)], "tasks": [{"name": "linear2d", "angles": [30]}],
              "methods": ["icl", "lora"], "shots": [1, 2], "seeds": [0], "orders": ["random", "1221"],
              "checkpoints": [1.0], "grid_step": 25, "engine": "hf",
              "sft": {"lora": {"epochs": 1, "min_steps": 2, "batch_size": 2}},
              "executor": {"name": "ray", "max_retries": 1}, "rsa": False, "report": False}
    return config | changes


def run_dir(out: Path, model: Path) -> Path:
    return model_dir(out, str(model))


def table(run: Path) -> pd.DataFrame:
    t = pd.read_parquet(run / "metrics.parquet")
    return t.drop(columns=[c for c in TIMING if c in t]).sort_values("condition").reset_index(drop=True)


def ok_records(run: Path) -> dict[str, dict]:
    """condition directory name -> record, for every condition whose record says ok."""
    out = {}
    for path in (run / "conditions").glob("*/record.json"):
        record = json.loads(path.read_text())
        if record["status"] == "ok":
            out[path.parent.name] = record
    return out


def assert_same_results(run: Path, reference: Path, conditions: int = CONDITIONS) -> None:
    """Metrics tables and every condition's raw scores equal to the last bit. `conditions`: how many `run`
    holds (fewer when some failed). Exact because the graph scores each ICL chain (K ascending) as one
    unit, so each prompt's KV extends the same cached prompt as in the single-process run."""
    names = sorted(ok_records(run))
    assert len(names) == conditions and set(names) <= set(ok_records(reference))
    got = table(run)
    want = table(reference).query("condition in @got.condition").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    for name in names:
        got, want = (pd.read_parquet(r / "conditions" / name / "scores.parquet") for r in (run, reference))
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def assert_same_rsa(run: Path, reference: Path) -> None:
    """Every condition's RSA arrays equal to the last bit."""
    names = sorted(ok_records(reference))
    assert sorted(p.parent.name for p in run.glob("conditions/*/rsa.npz")) == names
    for name in names:
        with np.load(run / "conditions" / name / "rsa.npz") as got, np.load(
                reference / "conditions" / name / "rsa.npz") as want:
            assert sorted(got.files) == sorted(want.files) and got.files
            for key in want.files:
                assert np.array_equal(got[key], want[key], equal_nan=True), (name, key)


def graph_record(out: Path) -> dict:
    return json.loads((out / "graph.json").read_text())


def gpu_ids(graph: dict, role: str) -> dict[str, list[str]]:
    """slot -> the Ray GPU ids its works ran on, for one role."""
    return {slot: where["gpus"] for slot, where in graph["placement"].items() if slot.startswith(role + "-")}


PROGRESS = re.compile(r"\[\d+/\d+\] (.+?): ")  # the driver's line for each condition it writes


def sweep(config: dict) -> list[str]:
    """Run a sweep here; the labels of the conditions it scored (one progress line each)."""
    logs: list[str] = []
    with capture(logs):
        run_sweep(SweepConfig(**config), progress=False)
    return [m.group(1) for m in map(PROGRESS.match, logs) if m]


def assert_each_condition_scored_once(scored: list[str], out: Path, run: Path) -> None:
    assert len(scored) == len(set(scored)) == CONDITIONS, scored
    records = ok_records(run)
    assert len(records) == CONDITIONS
    assert graph_record(out)["usage"]["trainer"]["works"] == TRAININGS
    lora = [r for r in records.values() if r["method"] == "lora"]
    assert len({r["checkpoint_dir"] for r in lora}) == TRAININGS  # the orders share their training
    assert all(len(r["shared_with"]) == 1 for r in lora)


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    for key in [k for k in os.environ if k.startswith("ICLSFT_FAULT")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def _ray_module():
    yield
    stop_ray()


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model in a directory of its own: the driver's model path in every sweep here (a
    condition's id holds the model's name, so the reference must use the same path)."""
    path = tmp_path_factory.mktemp("driver-model") / "model"
    shutil.copytree(tiny_model_dir, path)
    return path


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory, one_thread) -> Path:
    """The sweep in this process (executor local, one torch thread), with RSA; returns its run directory."""
    out = tmp_path_factory.mktemp("reference")
    old = os.environ.get("ICLSFT_HOME")
    os.environ["ICLSFT_HOME"] = str(out / "home")
    try:
        run_sweep(SweepConfig(**sweep_config(model, out, executor={"name": "local"}, rsa=True)), progress=False)
    finally:
        os.environ.pop("ICLSFT_HOME") if old is None else os.environ.__setitem__("ICLSFT_HOME", old)
    return run_dir(out, model)


@pytest.fixture
def fake_gpus(_ray_module):
    """A local Ray of 4 CPUs and 4 declared GPUs (none real), kept for the module; the sweep joins it
    and leaves it running."""
    if ray.is_initialized() and ray.cluster_resources().get("GPU") != 4:
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    return ray


# -- declared GPUs ---------------------------------------------------------------------------------
def test_scorers_and_trainers_never_share_a_gpu(fake_gpus, reference, model, tmp_path):
    out = tmp_path / "out"
    scored = sweep(sweep_config(model, out, resources={"scorers": 2}))
    assert ray.is_initialized()  # the running cluster was joined and left running
    graph = graph_record(out)
    assert graph["resources"] == {"scorers": 2, "scorer_gpus": 1.0, "scorer_cpus": 1.0,
                            "trainer_gpus": 1.0, "trainer_cpus": 1.0, "trainers": 2,
                            "cpus": 4.0, "gpus": 4.0}
    scorers, trainers = gpu_ids(graph, "scorer"), gpu_ids(graph, "trainer")
    assert sorted(scorers) == ["scorer-0", "scorer-1"] and trainers
    assert all(len(ids) == 1 for ids in scorers.values())  # an actor keeps its one GPU
    scorer_gpus = {i for ids in scorers.values() for i in ids}
    trainer_gpus = {i for ids in trainers.values() for i in ids}
    assert len(scorer_gpus) == 2 and trainer_gpus and not scorer_gpus & trainer_gpus, graph["placement"]
    assert scorer_gpus | trainer_gpus <= {"0", "1", "2", "3"}
    assert graph["engine_starts"] == 2
    assert_each_condition_scored_once(scored, out, run_dir(out, model))
    assert_same_results(run_dir(out, model), reference)


def test_half_gpu_trainers_share_the_gpu_no_scorer_holds(fake_gpus, reference, model, tmp_path):
    """Three scorers hold three of the four GPUs; trainers of half a GPU both run on the fourth."""
    out = tmp_path / "out"
    resources = {"scorers": 3, "trainer_gpus": 0.5, "trainer_cpus": 0.5}
    scored = sweep(sweep_config(model, out, resources=resources))
    graph = graph_record(out)
    assert graph["resources"]["trainers"] == 2  # the one free GPU, in halves (and the one free CPU)
    scorers, trainers = gpu_ids(graph, "scorer"), gpu_ids(graph, "trainer")
    scorer_gpus = {i for ids in scorers.values() for i in ids}
    assert len(scorers) == 3 and len(scorer_gpus) == 3 and all(len(ids) == 1 for ids in scorers.values())
    (free,) = {"0", "1", "2", "3"} - scorer_gpus
    assert sorted(trainers) == ["trainer-0", "trainer-1"], graph["placement"]  # two trainings at once ...
    assert all(ids == [free] for ids in trainers.values()), graph["placement"]  # ... on the one free GPU
    assert_each_condition_scored_once(scored, out, run_dir(out, model))
    assert_same_results(run_dir(out, model), reference)


def test_full_fine_tunes_open_one_engine_per_scorer(fake_gpus, model, tmp_path):
    """Two full fine-tunes with two checkpoints each: four checkpoints swapped into the scorers' engines."""
    out = tmp_path / "out"
    config = sweep_config(model, out, methods=["icl", "full"], checkpoints=[0.5, 1.0],
                          sft={"full": {"epochs": 1, "min_steps": 2, "batch_size": 2}}, orders=["random"],
                          resources={"scorers": 2})
    sweep(config)
    graph = graph_record(out)
    records = ok_records(run_dir(out, model))
    full = [r for r in records.values() if r["method"] == "full"]
    assert len(records) == 6 and len(full) == 4 and len({r["checkpoint_dir"] for r in full}) == 4
    assert graph["usage"]["scorer"]["workers"] == 2  # both scorers scored (each opened its engine)
    assert len(gpu_ids(graph, "scorer")) == 2
    assert graph["engine_starts"] == 2


def test_an_interrupted_graph_leaves_nothing_on_the_cluster(fake_gpus, model, tmp_path, monkeypatch):
    """Ctrl-C while the first works run (scorer actors busy, trainings running): the interrupt reaches
    the caller as it is, and every CPU and GPU of the running cluster is free again (actors ended, tasks
    cancelled), the run directory unlocked."""
    from iclsft.graph.ray_backend import RayBackend

    def interrupted(self):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(RayBackend, "wait", interrupted)
        sweep(sweep_config(model, out, resources={"scorers": 2}))
    deadline = time.time() + 30  # Ray frees an ended actor's resources a moment later
    while time.time() < deadline and ray.available_resources() != ray.cluster_resources():
        time.sleep(0.2)
    free, total = ray.available_resources(), ray.cluster_resources()
    assert (free.get("CPU"), free.get("GPU")) == (total["CPU"], total["GPU"]) == (4, 4), free
    assert len(sweep(sweep_config(model, out, resources={"scorers": 2}))) == CONDITIONS  # not locked, all to do


# -- two nodes, nothing shared -----------------------------------------------------------------------
AUDIT = '''
"""Logs every file event of this process whose path lies under $AUDIT_ROOTS to $AUDIT_LOG."""
import os
import sys

ROOTS = [r for r in os.environ.get("AUDIT_ROOTS", "").split(os.pathsep) if r]
LOG = os.environ.get("AUDIT_LOG")
IGNORED = {"os.putenv", "os.unsetenv"}
_busy = []


def _paths(args):
    for a in args:
        if isinstance(a, (str, bytes, os.PathLike)):
            try:
                yield os.path.abspath(os.fsdecode(a))
            except (TypeError, ValueError):
                pass
        elif isinstance(a, (list, tuple)):
            yield from _paths(a)


def _hook(event, args):
    if _busy or event in IGNORED or not (event == "open" or event.startswith(("os.", "shutil.", "glob."))):
        return
    _busy.append(1)
    try:
        hits = [p for p in _paths(args) if any(p == r or p.startswith(r + os.sep) for r in ROOTS)]
        if hits:
            with open(LOG, "a") as f:
                f.write(f"{os.getpid()} {event} {' '.join(hits)}\\n")
    finally:
        _busy.pop()


if ROOTS and LOG:
    with open(LOG + ".pids", "a") as f:
        f.write(f"{os.getpid()}\\n")
    sys.addaudithook(_hook)
'''


@ray.remote(num_cpus=1)
def _open_a_driver_path(path: str) -> int:
    return len(open(path, "rb").read())


@pytest.fixture
def two_nodes(tmp_path, model, tiny_model_dir, _ray_module):
    """A head that runs nothing (0 CPUs) and two nodes of one CPU each, each with its own TMPDIR and
    ICLSFT_HOME (holding a copy of the model under another name) and an audit hook in every worker."""
    from ray.cluster_utils import Cluster

    stop_ray()
    driver = tmp_path / "driver"
    (driver / "home").mkdir(parents=True)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    roots = os.pathsep.join(str(p) for p in (driver, model, tiny_model_dir))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = []
    for name in ("node-a", "node-b"):
        node = tmp_path / name
        (node / "tmp").mkdir(parents=True)
        shutil.copytree(model, node / "home" / "models" / "tiny-copy")
        env = {"TMPDIR": str(node / "tmp"), "ICLSFT_HOME": str(node / "home"), "AUDIT_ROOTS": roots,
               "AUDIT_LOG": str(node / "audit.log"),
               "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        cluster.add_node(num_cpus=1, resources={name: 1}, env_vars=env)
        nodes.append(node)
    cluster.wait_for_nodes()
    try:
        yield cluster, driver, nodes
    finally:
        stop_ray()
        cluster.shutdown()


def audit(node: Path) -> list[str]:
    log = node / "audit.log"
    return log.read_text().splitlines() if log.exists() else []


def worker_pids(node: Path) -> set[int]:
    """Every Python worker process the node started (each wrote its pid when the hook loaded)."""
    pids = node / "audit.log.pids"
    return {int(p) for p in pids.read_text().split()} if pids.exists() else set()


def test_two_nodes_without_a_shared_filesystem(two_nodes, reference, model, monkeypatch):
    cluster, driver, nodes = two_nodes
    monkeypatch.setenv("ICLSFT_HOME", str(driver / "home"))
    out = driver / "out"
    config = sweep_config(model, out, resources={"scorers": 1}, rsa=True,
                          executor={"name": "ray", "max_retries": 1, "ray_address": cluster.address})
    scored = sweep(config)
    assert not ray.is_initialized()  # joined with --ray-address, and left
    graph = graph_record(out)
    hosts = {slot: [int(h.rsplit(":", 1)[1]) for h in where["hosts"]] for slot, where in graph["placement"].items()}
    on = {node.name: worker_pids(node) for node in nodes}
    ran = {name: {slot for slot, pids in hosts.items() if set(pids) & workers} for name, workers in on.items()}
    # one CPU a node: the scorer holds one node, the trainings run on the other, and the checkpoints travel
    assert sorted(ran.values(), key=sorted) == [{"scorer-0"}, {"trainer-0"}], (hosts, on)
    assert {p for pids in hosts.values() for p in pids} <= set().union(*on.values())  # nothing ran elsewhere
    assert_each_condition_scored_once(scored, out, run_dir(out, model))
    assert_same_results(run_dir(out, model), reference)
    assert_same_rsa(run_dir(out, model), reference)
    for node in nodes:
        assert audit(node) == [], f"{node.name} touched the driver's files:\n" + "\n".join(audit(node)[:20])

    # a LoRA condition to redo on a checkpoint the run already holds: the driver reads it and sends it
    run = run_dir(out, model)
    redo = sorted(name for name, r in ok_records(run).items() if r["method"] == "lora")[0]
    (run / "conditions" / redo / "record.json").unlink()
    again = sweep(config)
    assert len(again) == 1 and "usage" in graph_record(out) and "trainer" not in graph_record(out)["usage"]
    assert ok_records(run)[redo]["trained_now"] is False
    assert_same_results(run, reference)
    assert_same_rsa(run, reference)
    for node in nodes:
        assert audit(node) == [], f"{node.name} touched the driver's files:\n" + "\n".join(audit(node)[:20])

    # the control: a worker that does open a driver path is logged, on its node only
    ray.init(address=cluster.address, log_to_driver=False)
    size = ray.get(_open_a_driver_path.options(resources={"node-b": 1}).remote(str(out / "sweep.json")))
    assert size == (out / "sweep.json").stat().st_size
    assert audit(nodes[0]) == []
    (line,) = audit(nodes[1])
    assert line.split()[1:] == ["open", str(out / "sweep.json")]


# -- faults ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["score", "train-step:2"])
def test_killed_scorer_or_trainer_is_retried(point, reference, model, tmp_path, monkeypatch, _ray_module):
    """The first scorer actor to score a condition (or the first trainer at its second step) kills itself
    with SIGKILL; Ray restarts the actor (or the task) and the sweep ends as an uninterrupted one."""
    stop_ray()  # the sweep starts its own, handing the ICLSFT_* variables to the workers
    fired = tmp_path / "fired"
    monkeypatch.setenv("ICLSFT_FAULT_AT", point)
    monkeypatch.setenv("ICLSFT_FAULT_ONCE", str(fired))
    out = tmp_path / "out"
    scored = sweep(sweep_config(model, out, resources={"scorers": 1}))
    assert [p.name for p in fired.iterdir()] == [point.split(":")[0]], "no worker was killed"
    run = run_dir(out, model)
    assert_each_condition_scored_once(scored, out, run)
    assert_same_results(run, reference)


def test_a_scorer_dead_for_good_gives_its_slot_to_a_new_one(reference, model, tmp_path, monkeypatch, _ray_module):
    """No restarts (max_retries 0): the scorer killed at its first scoring takes that work's conditions
    with it (the first ICL chain, K 1 and 2: recorded as failed, for the rerun to retry); a new scorer
    takes its slot and scores everything else, and the sweep ends with one line naming the failures."""
    stop_ray()
    monkeypatch.setenv("ICLSFT_FAULT_AT", "score")
    monkeypatch.setenv("ICLSFT_FAULT_ONCE", str(tmp_path / "fired"))
    out = tmp_path / "out"
    config = sweep_config(model, out, resources={"scorers": 1}, executor={"name": "ray", "max_retries": 0})
    logs: list[str] = []
    with pytest.raises(ConditionsFailed, match=r"2 of 4 icl conditions failed \(first: The actor is dead"):
        with capture(logs):
            run_sweep(SweepConfig(**config), progress=False)
    assert "warning: scorer-0 died and has no restarts left: a new scorer takes its slot" in logs
    run = run_dir(out, model)
    records = [json.loads(p.read_text()) for p in run.glob("conditions/*/record.json")]
    failed = [r for r in records if r["status"] == "error"]
    assert len(records) == CONDITIONS and len(failed) == 2
    assert {(r["method"], r["shots"]) for r in failed} == {("icl", 1), ("icl", 2)}
    assert len({r["order"] for r in failed}) == 1
    assert graph_record(out)["engine_starts"] == 1  # the new scorer's (the dead one's count died with it)
    assert_same_results(run, reference, conditions=CONDITIONS - 2)


def test_killed_driver_is_resumed_by_the_rerun(reference, model, tmp_path, _ray_module):
    """`iclsft-eval sweep` dies (SIGKILL) at its seventh condition record, after both LoRA conditions of
    at least one training; the rerun keeps every record and checkpoint written before, bit for bit,
    trains only what has no checkpoint and scores only what has no record."""
    stop_ray()
    out = tmp_path / "out"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_config(model, out, resources={"scorers": 1})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ICLSFT_FAULT_AT": "condition-record:7"}
    cmd = [sys.executable, "-m", "iclsft.cli", "sweep", str(path), "--quiet"]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = run_dir(out, model)
    finished = ok_records(run)
    assert len(finished) == 6 and sum(r["method"] == "lora" for r in finished.values()) >= 2
    adapters = sorted(p for p in (run / "adapters").iterdir() if not p.name.startswith("."))
    assert 1 <= len(adapters) <= TRAININGS
    files = [p for name in finished for p in (run / "conditions" / name).iterdir()]
    files += [p for a in adapters for p in a.rglob("*") if p.is_file()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert not (out / "graph.json").exists()

    scored = sweep(sweep_config(model, out, resources={"scorers": 1}))
    for p, (data, mtime) in before.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, f"{p} was rewritten"
    assert len(scored) == len(set(scored)) == CONDITIONS - 6, scored  # the finished six were not scored again
    usage = graph_record(out)["usage"]
    assert usage.get("trainer", {}).get("works", 0) == TRAININGS - len(adapters)  # nor a checkpoint retrained
    assert_same_results(run, reference)


# -- the sft command ---------------------------------------------------------------------------------
def test_the_sft_command_on_ray_is_a_one_arm_graph(fake_gpus, model, tmp_path):
    """`iclsft-eval sft` on Ray runs its arm as a work graph (a scorer actor on a GPU of its own, the
    trainings on the others; RUN/graph.json), with the results of the same command in this process."""
    from click.testing import CliRunner

    from iclsft.cli import main

    args = ["sft", "--model", str(model), "--angle", "30", "--shots", "1,2", "--grid-step", "25", "--epochs", "1",
            "--min-steps", "2", "--batch-size", "2", "--engine", "hf", "--quiet"]
    on_ray = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ray")])
    assert on_ray.exit_code == 0, on_ray.output
    local = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "local"), "--executor", "local"])
    assert local.exit_code == 0, local.output
    graph = graph_record(tmp_path / "ray")
    # one engine per scorer that scored (the placement lists the slots that ran a work); two trainings (one per K)
    assert graph["engine_starts"] == len(gpu_ids(graph, "scorer")) and graph["usage"]["trainer"]["works"] == 2
    scorer_gpus = {g for ids in gpu_ids(graph, "scorer").values() for g in ids}
    trainer_gpus = {g for ids in gpu_ids(graph, "trainer").values() for g in ids}
    assert scorer_gpus and trainer_gpus and not scorer_gpus & trainer_gpus
    assert_same_results(tmp_path / "ray", tmp_path / "local", conditions=2)
