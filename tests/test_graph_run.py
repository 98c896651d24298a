"""The work graph's driver (iclsft.graph.run.GraphRun) without Ray: an in-process backend runs each work
through the same worker code (remote.train_task, remote.ScorerActor) one at a time, so what the driver
writes, records, retries and drops is checked in seconds on the tiny model. The reference is the
single-process sweep (`executor: local`: arms one after another through run_arm), bit for bit at one
thread. Ray scheduling itself: tests/test_graph_ray.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iclsft.graph import remote
from iclsft.graph.run import GraphRun
from iclsft.graph.schedule import HeldResults
from iclsft.graph.work import Finished
from iclsft.sft.adapters import checkpoint_problem, is_finished, read_marker
from iclsft.sweep import SweepConfig, model_dir, run_sweep
from iclsft.sweep.plan import arm_specs

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))


class InlineBackend(HeldResults):
    """One scorer and one trainer slot, each work run to its end in this process when it starts."""

    def __init__(self):
        self.actor = remote.ScorerActor(threads=1)
        self.done: list[Finished] = []
        self.results: dict[str, object] = {}
        self.started: list[str] = []

    def slots(self, role):
        return [f"{role}-0"]

    def start(self, work, slot, inputs):
        self.started.append(work.id)
        payload = work.payload() if callable(work.payload) else work.payload
        t0 = time.time()
        try:
            if work.role == "trainer":
                value = remote.train_task(*payload)
                host = value["worker"]
            else:
                *value, host, _ = getattr(self.actor, payload.method)(payload, *inputs)
                value = value[0] if len(value) == 1 else tuple(value)
            self.results[work.id] = value
            self.done.append(Finished(work, slot, t0, time.time(), result=value, host=host))
        except (RuntimeError, ValueError, OSError) as e:
            self.done.append(Finished(work, slot, t0, time.time(), error=f"Traceback\n{type(e).__name__}: {e}"))

    def wait(self):
        out, self.done = self.done, []
        return out

    def put(self, obj):
        return obj

    def engine_starts(self):
        return self.actor.starts()


def config(model: Path, out: Path, **changes) -> SweepConfig:
    data = {"out": str(out), "models": [str(model)], "tasks": [{"name": "linear2d", "angles": [45]}],
            "methods": ["icl", "lora", "full"], "shots": [1, 2], "seeds": [0], "orders": ["random", "12"],
            "grid_step": 25, "engine": "hf", "rsa": True, "report": False,
            "sft": {m: {"epochs": 1, "min_steps": 2, "batch_size": 2} for m in ("lora", "full")}}
    return SweepConfig(**(data | changes))


def run_graph(cfg: SweepConfig, backend=None, **options) -> GraphRun:
    model = cfg.models[0]
    graph = GraphRun([(model_dir(cfg.out, model), spec, ref) for spec, ref in arm_specs(cfg, model)],
                     rsa=(cfg.dtype, cfg.rsa_subset) if cfg.rsa else None, **options)
    backend = backend or InlineBackend()
    try:
        graph.run(backend if graph.works else None)
    finally:
        backend.actor.close()
    return graph


def conds_of(work) -> tuple:
    payload = getattr(work.payload, "task", work.payload)  # a reused checkpoint's task is wrapped
    return payload.conds


def records(run: Path) -> dict[str, dict]:
    return {json.loads(f.read_text())["condition"]: json.loads(f.read_text())
            for f in run.glob("conditions/*/record.json")}


def test_graph_results_equal_the_single_process_sweep_bit_for_bit(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir, tmp_path / "graph")
    graph = run_graph(cfg)
    assert not graph.failures
    ref = config(tiny_model_dir, tmp_path / "local", executor={"name": "local"})
    run_sweep(ref, progress=False)
    a, b = model_dir(cfg.out, cfg.models[0]), model_dir(ref.out, ref.models[0])
    timing = ["seconds", "train_seconds", "trained_now", "finished"]
    ta, tb = (pd.read_parquet(d / "metrics.parquet").drop(columns=timing, errors="ignore") for d in (a, b))
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    ra, rb = records(a), records(b)
    assert set(ra) == set(rb) and len(ra) == 4 + 2 * 4  # ICL: 2 K x 2 orders; each SFT method the same
    assert all(rec["status"] == "ok" for rec in ra.values())
    for cdir in a.glob("conditions/*/"):
        other = b / "conditions" / cdir.name
        pd.testing.assert_frame_equal(pd.read_parquet(cdir / "scores.parquet"),
                                      pd.read_parquet(other / "scores.parquet"), check_exact=True)
        with np.load(cdir / "rsa.npz") as x, np.load(other / "rsa.npz") as y:
            assert set(x.files) == set(y.files)
            for k in x.files:
                np.testing.assert_array_equal(x[k], y[k])
    # the order probe "12" at batch size 2 never crosses a batch: one training serves both orders
    assert sum(w.role == "trainer" for w in graph.works) == 2 * 2  # (lora, full) x K


def test_rerun_computes_nothing_and_starts_no_backend(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir, tmp_path / "out", methods=["icl", "lora"])
    run_graph(cfg)
    run = model_dir(cfg.out, cfg.models[0])
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file() and f.name != ".lock"}
    table = pd.read_parquet(run / "metrics.parquet")
    again = run_graph(cfg)
    assert again.works == []
    after = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file() and f.name != ".lock"}
    changed = sorted({f.name for f in before if after.get(f) != before[f]})
    # only the run record (arm status) and the metrics table (recomputed from the scores, unchanged) are rewritten
    assert changed == ["metrics.json", "metrics.parquet", "record.json"], changed
    assert set(before) == set(after)
    pd.testing.assert_frame_equal(pd.read_parquet(run / "metrics.parquet"), table, check_exact=True)


def test_a_failed_training_fails_its_conditions_only_and_a_rerun_trains_it(tiny_model_dir, tmp_path, monkeypatch):
    cfg = config(tiny_model_dir, tmp_path / "out", methods=["icl", "lora"], shots=[1, 2], orders=["random"])
    real = remote.train_task

    def flaky(job, model, fingerprint):
        if job.meta["shots"] == 2:
            raise RuntimeError("trainer lost")
        return real(job, model, fingerprint)

    monkeypatch.setattr(remote, "train_task", flaky)
    graph = run_graph(cfg)
    run = model_dir(cfg.out, cfg.models[0])
    recs = records(run)
    failed = [r for r in recs.values() if r["status"] == "error"]
    assert len(failed) == 1 and "trainer lost" in failed[0]["error"] and failed[0]["checkpoint_dir"]
    assert sum(r["status"] == "ok" for r in recs.values()) == 3  # both ICL conditions and LoRA at K=1
    assert any("sft-lora" in f and "1 of 2" in f for f in graph.failures)
    # the failed condition has no RSA written (its scoring never ran)
    for cdir in run.glob("conditions/*/"):
        rec = json.loads((cdir / "record.json").read_text())
        assert (cdir / "rsa.json").is_file() == (rec["status"] == "ok")
    monkeypatch.setattr(remote, "train_task", real)
    rerun = run_graph(cfg)
    assert [w.role for w in rerun.works].count("trainer") == 1 and not rerun.failures
    assert all(r["status"] == "ok" for r in records(run).values())


def weights(ckpt: Path) -> list[str]:
    return sorted(f.name for f in ckpt.glob("*.safetensors"))


@pytest.mark.parametrize("policy", ["none", "final"])
def test_checkpoints_keep_deletes_once_scored_and_rsa_done(tiny_model_dir, tmp_path, policy):
    """`none` deletes both checkpoints of each full fine-tune, `final` the half-way one, each once its
    scoring and RSA are written; metrics and RSA equal those of `all`; the marker says what was deleted,
    with the files' checksums; a rerun computes nothing, and the LoRA arm keeps its adapters."""
    from iclsft.rsa.run import load_rsa

    common = dict(methods=["lora", "full"], shots=[1], orders=["random"], checkpoints=[0.5, 1.0])
    kept = config(tiny_model_dir, tmp_path / "all", **common)
    cfg = config(tiny_model_dir, tmp_path / policy, checkpoints_keep=policy, **common)
    assert not run_graph(kept).failures and not run_graph(cfg).failures
    a, b = model_dir(kept.out, kept.models[0]), model_dir(cfg.out, cfg.models[0])
    timing = ["seconds", "train_seconds", "trained_now", "finished"]
    ta, tb = (pd.read_parquet(d / "metrics.parquet").drop(columns=timing, errors="ignore") for d in (a, b))
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    assert records(b) and all(rec["status"] == "ok" for rec in records(b).values())
    for cdir in b.glob("conditions/*/"):
        twin = a / "conditions" / cdir.name
        got, want = load_rsa(cdir), load_rsa(twin)
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    for ckpt in sorted(p for p in (b / "adapters").iterdir() if is_finished(p)):
        marker = read_marker(ckpt)
        if marker["method"] == "lora":
            assert checkpoint_problem(ckpt) is None  # adapters are always kept
            continue
        twin = read_marker(a / "adapters" / ckpt.name)
        assert marker["files"] == twin["files"]  # sizes and sha256 of what was scored, kept
        if policy == "final" and marker["fraction"] == 1.0:
            assert weights(ckpt) == ["model.safetensors"] and "deleted" not in marker
            continue
        assert weights(ckpt) == [] and marker["deleted"]["policy"] == policy
        assert marker["deleted"]["files"] == ["model.safetensors"]
        assert "deleted on purpose" in checkpoint_problem(ckpt) and "--retrain-deleted" in checkpoint_problem(ckpt)
    rerun = run_graph(cfg)
    assert rerun.works == [] and not rerun.failures  # nothing needs them again, nothing is called damaged
    assert not list((b / "adapters").glob(".damaged-*"))


def test_a_policy_given_later_deletes_what_nothing_reads_any_more(tiny_model_dir, tmp_path):
    """Run under `all`, then again under `final`: nothing is computed, and the half-way checkpoints go."""
    cfg = config(tiny_model_dir, tmp_path / "out", methods=["full"], shots=[1], orders=["random"], rsa=False,
                 checkpoints=[0.5, 1.0])
    run_graph(cfg)
    run = model_dir(cfg.out, cfg.models[0])
    rerun = run_graph(cfg.model_copy(update={"checkpoints_keep": "final"}))
    assert rerun.works == [] and not rerun.failures
    kept = {read_marker(p)["fraction"]: weights(p) for p in (run / "adapters").iterdir() if is_finished(p)}
    assert kept == {0.5: [], 1.0: ["model.safetensors"]}


def test_work_that_needs_a_deleted_checkpoint_is_refused_or_retrained(tiny_model_dir, tmp_path):
    """RSA asked for after the checkpoints were deleted: refused in one line naming the option;
    with retrain_deleted the model is trained again, its conditions scored again (equal scores) and
    their RSA computed, then deleted again."""
    from iclsft.errors import DeletedCheckpointError

    cfg = config(tiny_model_dir, tmp_path / "out", methods=["full"], shots=[1], orders=["random"], rsa=False,
                 checkpoints_keep="none")
    run_graph(cfg)
    run = model_dir(cfg.out, cfg.models[0])
    before = {n: r["metrics"] for n, r in records(run).items()}
    with_rsa = cfg.model_copy(update={"rsa": True})
    with pytest.raises(DeletedCheckpointError, match=r"RSA of .* needs checkpoint \w+, deleted on purpose "
                                                     r"\(checkpoints_keep: none on .*--retrain-deleted"):
        run_graph(with_rsa)
    graph = run_graph(with_rsa.model_copy(update={"retrain_deleted": True}))
    assert not graph.failures and [w.role for w in graph.works].count("trainer") == 1
    after = records(run)
    assert {n: r["metrics"] for n, r in after.items()} == before
    for cdir in run.glob("conditions/*/"):
        assert json.loads((cdir / "rsa.json").read_text())["status"] == "ok"
    (ckpt,) = [p for p in (run / "adapters").iterdir() if is_finished(p)]
    assert weights(ckpt) == [] and read_marker(ckpt)["deleted"]["policy"] == "none"
    assert len(list(run.glob(".redo/*/record.json"))) == 1  # the first scoring, set aside, kept for inspection


def test_full_weights_stay_while_a_condition_that_reads_them_failed(tiny_model_dir, tmp_path, monkeypatch):
    """A condition that fails inside a scoring work that otherwise succeeded keeps its checkpoint's weights
    (they were dropped, so a rerun had to train again): the rerun scores it from them, trains nothing,
    and only then are they dropped."""
    from iclsft.arms.runner import ArmBase

    cfg = config(tiny_model_dir, tmp_path / "out", methods=["full"], shots=[1], orders=["random"],
                 checkpoints=[0.5, 1.0], rsa=False, checkpoints_keep="none")
    real, calls = ArmBase.outcome, []

    def first_fails(self, cond, checkpoint=None, record=None):
        calls.append(cond.id)
        if len(calls) == 1:
            raise ValueError("scoring went wrong once")
        return real(self, cond, checkpoint, record)

    monkeypatch.setattr(ArmBase, "outcome", first_fails)
    graph = run_graph(cfg)
    run = model_dir(cfg.out, cfg.models[0])
    assert sorted(r["status"] for r in records(run).values()) == ["error", "ok"] and graph.failures
    by_status = {r["status"]: run / "adapters" / r["checkpoint_dir"] for r in records(run).values()}
    assert list(by_status["error"].glob("*.safetensors"))  # kept for the failed condition
    assert not list(by_status["ok"].glob("*.safetensors"))  # its checkpoint at the other fraction: done, dropped
    rerun = run_graph(cfg)
    assert not rerun.failures and [w.role for w in rerun.works].count("trainer") == 0
    assert {r["status"] for r in records(run).values()} == {"ok"}
    assert not list(by_status["error"].glob("*.safetensors"))  # every condition is scored now: dropped


def test_an_interrupted_graph_says_so_and_resumes(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir, tmp_path / "out", methods=["icl", "lora"], orders=["random"])

    class Interrupted(InlineBackend):
        def wait(self):
            out = super().wait()
            if len(self.started) >= 3:
                raise KeyboardInterrupt
            return out

    backend = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        run_graph(cfg, backend)
    run = model_dir(cfg.out, cfg.models[0])
    arms = json.loads((run / "record.json").read_text())["arms"]
    assert {a["status"] for a in arms.values()} == {"interrupted"}
    finished = [r for r in records(run).values() if r["status"] == "ok"]
    assert 1 <= len(finished) < 4
    rerun = run_graph(cfg)
    assert not rerun.failures
    assert sum(r["status"] == "ok" for r in records(run).values()) == 4
    scored = [c for w in rerun.works if w.role == "scorer" and "|rsa|" not in w.id for c in conds_of(w)]
    assert len(scored) == 4 - len(finished)


def test_conditions_failed_message_names_the_arm(tiny_model_dir, tmp_path, monkeypatch):
    cfg = config(tiny_model_dir, tmp_path / "out", methods=["icl"], shots=[1], orders=["random"], rsa=False)

    def broken(self, task, trained=None):
        raise ValueError("engine returned nonsense")

    monkeypatch.setattr(remote.ScorerActor, "score", broken)
    graph = run_graph(cfg)
    assert len(graph.failures) == 1 and "icl" in graph.failures[0] and "1 of 1" in graph.failures[0]
    (rec,) = records(model_dir(cfg.out, cfg.models[0])).values()
    assert rec["status"] == "error" and rec["error"] == "ValueError: engine returned nonsense"


def test_a_run_cut_inside_an_icl_chain_resumes_to_the_same_bits(tiny_model_dir, tmp_path, monkeypatch):
    """The driver dies after writing two conditions of a chain (K=1, K=20); the rerun scores K=30 (~550
    prompt tokens) with nothing cached, where the uninterrupted run extended K=20's cached ~370 tokens,
    and still equals the single-process run bit for bit: the hf engine reuses only whole 256-token blocks
    of a cached prefix, so both compute [0, 256) and then [256, 512) ... in the same forwards."""
    from iclsft.store import RunDir

    cfg = config(tiny_model_dir, tmp_path / "graph", methods=["icl"], shots=[1, 20, 30], orders=["random"], rsa=False)
    real, calls = RunDir.write_condition, []

    def dies_second(self, cond, files, **fields):
        calls.append(cond.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, cond, files, **fields)

    monkeypatch.setattr(RunDir, "write_condition", dies_second)
    with pytest.raises(KeyboardInterrupt):
        run_graph(cfg)
    monkeypatch.setattr(RunDir, "write_condition", real)
    run = model_dir(cfg.out, cfg.models[0])
    assert [r["status"] for r in records(run).values()] == ["ok", "ok"]  # K=1 and K=20
    rerun = run_graph(cfg)
    assert [[c.shots for c in conds_of(w)] for w in rerun.works] == [[30]]  # the rest of the chain
    ref = config(tiny_model_dir, tmp_path / "local", methods=["icl"], shots=[1, 20, 30], orders=["random"], rsa=False,
                 executor={"name": "local"})
    run_sweep(ref, progress=False)
    other = model_dir(ref.out, ref.models[0])
    for cdir in run.glob("conditions/*/"):
        pd.testing.assert_frame_equal(pd.read_parquet(cdir / "scores.parquet"),
                                      pd.read_parquet(other / "conditions" / cdir.name / "scores.parquet"),
                                      check_exact=True)


def test_a_scorer_holds_one_base_model_at_a_time(tiny_model_dir, tmp_path):
    """Two base models on one scorer (max_models 1): the second closes the first's engine and arms; going
    back opens it again (engine starts count every opening) and scores as before, bit for bit."""
    import shutil

    from iclsft.graph.remote import ScoreTask

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "iclsft_test_copy": True}))  # another fingerprint
    tasks = []
    for model in (tiny_model_dir, other):
        cfg = config(model, tmp_path / "out", methods=["icl"], shots=[1], orders=["random"], rsa=False)
        (spec, ref), = arm_specs(cfg, str(model))
        tasks.append(ScoreTask(arm=f"{model}|icl", spec=spec, model=ref.name, fingerprint=ref.fingerprint,
                               conds=tuple(spec.conditions())))
    assert tasks[0].fingerprint != tasks[1].fingerprint
    actor = remote.ScorerActor(threads=1, max_models=1)
    try:
        first = actor.score(tasks[0])[0]
        assert actor.starts() == 1
        actor.score(tasks[1])
        assert actor.starts() == 2 and [k[1] for k in actor.scorers] == [tasks[1].fingerprint]
        assert list(actor.arms) == [tasks[1].arm]
        again = actor.score(tasks[0])[0]
        assert actor.starts() == 3 and [k[1] for k in actor.scorers] == [tasks[0].fingerprint]
        (a, _), (b, _) = first[0], again[0]
        assert a.files["scores.parquet"] == b.files["scores.parquet"]
    finally:
        actor.close()
