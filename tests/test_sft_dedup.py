"""Identical trainings trained once (issue 16, item 5) on the tiny random Llama, local executor.

A training's identity is the sequence of its batches as multisets of examples, plus base, recipe
and seed (`training_key`); training sorts each batch's examples (`canonical_order`) so that equal
multisets give bit-identical weights. The expectations are derived by hand from the exemplar
streams (which pairs a batch boundary splits), not from the code's grouping.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from logcapture import capture

from iclsft.arms import make_sft_spec
from iclsft.arms.linear2d import plan_jobs, training_examples, training_groups
from iclsft.graph.driver import run_spec
from iclsft.prompts import builder_key, prompt_builders
from iclsft.sft import train as train_module
from iclsft.sft.adapters import (
    checkpoint_dir,
    is_finished,
    resume_dir,
    save_checkpoint,
    stream_order_key,
    training_key,
)
from iclsft.sft.train import TrainJob, canonical_order, train
from iclsft.spec import ExecutorSpec, sft_spec
from iclsft.store import RunDir
from iclsft.sweep import load_config, plan
from iclsft.tasks import linear2d

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("random", "1221")


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "iclsft-home"))


def make_spec(model_dir, *, shots=(2,), batch_size=8, orders=ORDERS, checkpoints=(1.0,)):
    return make_sft_spec(model=str(model_dir), angles=(45.0,), shots=shots, seeds=(0,), orders=orders, grid_step=20,
                         sft=sft_spec("lora", epochs=1, min_steps=4, lr=1e-2, batch_size=batch_size),
                         checkpoints=checkpoints, executor=ExecutorSpec(name="local"))


def sha256_files(ckpt: str | Path) -> dict[str, str]:
    """sha256 of each weight file, read here (not the marker's own list)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(ckpt).glob("*.safetensors"))}


def records(out: Path) -> dict[tuple, dict]:
    """(order, K, checkpoint) -> the condition's record, with its directory's name under "dir"."""
    recs = [{**json.loads(p.read_text()), "dir": p.parent.name} for p in (out / "conditions").glob("*/record.json")]
    return {(r["order"], r["shots"], r["checkpoint"]): r for r in recs}


def crossing_pairs(n_examples: int, batch_size: int) -> list[int]:
    """Pairs (2i, 2i+1) whose two exemplars fall in different batches, by hand: a boundary lies after
    every multiple of the batch size."""
    return [i for i in range(n_examples // 2) if (2 * i + 1) % batch_size == 0]


def same_training_by_hand(task, seed: int, k: int, batch_size: int) -> bool:
    """random and 1221 streams hold the same pairs (each pair reordered at most): their trainings are the
    same iff every pair split by a boundary shows the same exemplar first in both orders."""
    a, b = (linear2d.exemplars(task, seed, k, o) for o in ORDERS)
    assert (a.pair == b.pair).all() and sorted(map(tuple, a[["n1", "n2"]].values)) == sorted(
        map(tuple, b[["n1", "n2"]].values))
    return all(a.truth[2 * i] == b.truth[2 * i] for i in crossing_pairs(2 * k, batch_size))


# -- the identity ---------------------------------------------------------------------------------


def test_canonical_order_sorts_inside_each_batch_only():
    ex = [([5, 1], [9]), ([3], [8]), ([3], [7]), ([1], [7]), ([2, 2], [9])]
    assert canonical_order(ex, 2) == [([3], [8]), ([5, 1], [9]), ([1], [7]), ([3], [7]), ([2, 2], [9])]
    assert canonical_order(ex, 5) == [([1], [7]), ([2, 2], [9]), ([3], [7]), ([3], [8]), ([5, 1], [9])]
    assert canonical_order(ex, 1) == ex and canonical_order([], 3) == []


def test_key_is_the_batches_as_multisets():
    sft = sft_spec("lora", batch_size=2)
    ex = [([5], [9]), ([3], [8]), ([4], [7]), ([1], [7])]
    within = [ex[1], ex[0], ex[3], ex[2]]  # each batch of 2 reversed
    across = [ex[0], ex[2], ex[1], ex[3]]  # two examples traded between batches
    assert training_key("f", within, sft, 0) == training_key("f", ex, sft, 0)
    assert training_key("f", across, sft, 0) != training_key("f", ex, sft, 0)
    assert training_key("f", within, sft_spec("lora", batch_size=1), 0) != training_key(
        "f", ex, sft_spec("lora", batch_size=1), 0)
    # what is hashed is the order training takes: a stream already in that order keeps its old name
    assert training_key("f", ex, sft, 0) == stream_order_key("f", [ex[1], ex[0], ex[3], ex[2]], sft, 0)
    assert training_key("f", ex, sft, 0, loss="all") != training_key("f", ex, sft, 0)
    assert training_key("f", ex, sft, 1) != training_key("f", ex, sft, 0)


def test_permuting_inside_batches_gives_identical_weight_files(tiny_model_dir, smollm_tokenizer, tmp_path,
                                                              monkeypatch):
    spec, ref = make_spec(tiny_model_dir, shots=(4,), orders=("random",))
    builder = prompt_builders(smollm_tokenizer, spec.template, spec.tasks)[builder_key(spec.tasks[0])]
    ex = training_examples(builder, linear2d.exemplars(spec.tasks[0], 0, 4))  # 8 examples
    sft = sft_spec("lora", epochs=1, min_steps=4, lr=1e-2, batch_size=4)
    permuted = ex[3::-1] + ex[:3:-1]  # each batch of 4 reversed
    assert permuted != ex and canonical_order(permuted, 4) == canonical_order(ex, 4)

    def trained(examples, name: str) -> dict[str, str]:
        job = TrainJob(key=name, base_path=str(ref.path), examples=examples, sft=sft, seed=0,
                       checkpoints=[(1.0, str(tmp_path / name))])
        assert train(job)["trained"]
        return sha256_files(tmp_path / name)

    assert trained(ex, "stream") == trained(permuted, "permuted")
    # why the sort is needed: without it the padded batch's row order changes the summation order
    monkeypatch.setattr(train_module, "in_training_order", lambda job: job)
    assert trained(ex, "raw-stream") != trained(permuted, "raw-permuted")


def test_old_stream_order_checkpoints_are_still_found(tmp_path):
    class Saved:  # stands in for a model: save_pretrained writes one weight file
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "adapter_model.safetensors").write_bytes(b"weights")

    new, old = "n" * 64, "o" * 64
    assert resume_dir(tmp_path, new, old, 1.0) == (new, checkpoint_dir(tmp_path, new, 1.0))  # nothing there
    save_checkpoint(Saved(), checkpoint_dir(tmp_path, old, 1.0), {"key": old})
    assert resume_dir(tmp_path, new, old, 1.0) == (old, checkpoint_dir(tmp_path, old, 1.0))
    assert resume_dir(tmp_path, new, old, 0.5)[0] == new  # another fraction: not finished there
    (checkpoint_dir(tmp_path, old, 1.0) / "adapter_model.safetensors").write_bytes(b"damaged")
    assert resume_dir(tmp_path, new, old, 1.0) == (new, checkpoint_dir(tmp_path, new, 1.0))  # never read


# -- runs -----------------------------------------------------------------------------------------


def test_random_and_1221_at_an_even_batch_train_once(tiny_model_dir, tmp_path):
    batch = sft_spec("lora").batch_size  # the demo's LoRA batch (configs/demo-cpu.yaml leaves it)
    assert batch == 8
    spec, ref = make_spec(tiny_model_dir, shots=(2, 5), batch_size=batch, checkpoints=(0.5, 1.0))
    task = spec.tasks[0]
    for k in (2, 5):
        a, b = (linear2d.exemplars(task, 0, k, o) for o in ORDERS)
        assert not a.equals(b) and same_training_by_hand(task, 0, k, batch)  # the orders differ; batches do not
    trained: list[str] = []
    real = train_module.train

    def counting(job):
        trained.append(job.key)
        return real(job)

    out, logs = tmp_path / "run", []
    import iclsft.graph.local_backend as backend  # where an in-process run trains

    backend.train, saved = counting, backend.train
    try:
        with capture(logs):
            table = run_spec(spec, out, ref, progress=False)
    finally:
        backend.train = saved
    assert len(trained) == len(set(trained)) == 2  # one training per K for both orders
    assert len(training_groups(spec.conditions(), spec.sft)) == 2  # the plan counts the same
    assert any("8 conditions share their model with another condition" in m for m in logs)
    recs = records(out)
    assert len(recs) == 8 and len({r["checkpoint_dir"] for r in recs.values()}) == 4
    for k in (2, 5):
        for f in (0.5, 1.0):
            rand, probe = recs[("random", k, f)], recs[("1221", k, f)]
            assert rand["checkpoint_dir"] == probe["checkpoint_dir"]
            assert rand["shared_with"] == [probe["dir"]] and probe["shared_with"] == [rand["dir"]]
    metrics = ["accuracy", "auc", "cal_accuracy", "confidence"]
    by = table.set_index(["order", "shots", "checkpoint"])[metrics].sort_index()
    pd.testing.assert_frame_equal(by.loc["random"], by.loc["1221"])  # identical to the last digit
    for k in (2, 5):
        scores = [pd.read_parquet(out / "conditions" / recs[(o, k, 1.0)]["dir"] / "scores.parquet") for o in ORDERS]
        assert scores[0][["lp_0", "lp_1"]].equals(scores[1][["lp_0", "lp_1"]])

    # rerun: nothing trained, nothing rescored
    trained.clear()
    backend.train = counting
    try:
        with capture(logs):
            run_spec(spec, out, ref, progress=False)
    finally:
        backend.train = saved
    assert trained == []


@pytest.mark.parametrize("batch_size", [1, 3])
def test_order_probes_that_change_the_batches_train_separately(tiny_model_dir, smollm_tokenizer, tmp_path,
                                                              batch_size):
    spec, ref = make_spec(tiny_model_dir, shots=(2, 4), batch_size=batch_size)
    task = spec.tasks[0]
    expected = {k: same_training_by_hand(task, 0, k, batch_size) for k in (2, 4)}
    if batch_size == 1:
        assert expected == {2: False, 4: False}
    assert not all(expected.values())  # at least one K whose split pair differs between the orders
    builders = prompt_builders(smollm_tokenizer, spec.template, spec.tasks)
    jobs, _ = plan_jobs(spec, RunDir(tmp_path / "plan"), ref, builders)
    assert len(jobs) == sum(1 if same else 2 for same in expected.values())
    assert len(training_groups(spec.conditions(), spec.sft)) == len(jobs)

    if batch_size == 3:
        return  # one run is enough to show separate trainings differ
    out = tmp_path / "run"
    run_spec(spec, out, ref, progress=False)
    recs = records(out)
    for k in (2, 4):
        rand, probe = recs[("random", k, 1.0)], recs[("1221", k, 1.0)]
        assert rand["checkpoint_dir"] != probe["checkpoint_dir"] and "shared_with" not in rand
        files = [sha256_files(out / "adapters" / r["checkpoint_dir"]) for r in (rand, probe)]
        assert files[0] != files[1]  # the order changed the weights


def test_old_run_directory_resumes_with_its_stream_order_checkpoints(tiny_model_dir, smollm_tokenizer, tmp_path):
    """A run directory trained before the sort: its checkpoints are named by the stream-order key."""
    spec, ref = make_spec(tiny_model_dir, shots=(2,), orders=("random",))
    builders = prompt_builders(smollm_tokenizer, spec.template, spec.tasks)
    out = tmp_path / "run"
    (job,) = plan_jobs(spec, RunDir(out), ref, builders)[0]
    old = stream_order_key(ref.fingerprint, job.examples, spec.sft, 0)
    assert old != job.key  # this stream is not in sorted order, so the name changed
    train(job)
    shutil.move(job.checkpoints[0][1], checkpoint_dir(out, old, 1.0))  # as an earlier version left it
    assert is_finished(checkpoint_dir(out, old, 1.0))
    logs: list[str] = []
    with capture(logs):
        run_spec(spec, out, ref, progress=False)
    assert any("0 models to train, 1 reused" in m for m in logs)
    (rec,) = records(out).values()
    assert rec["checkpoint_dir"] == checkpoint_dir(out, old, 1.0).name and rec["trained_now"] is False
    assert not Path(job.checkpoints[0][1]).exists()


def test_sweep_plan_counts_distinct_trainings(tiny_model_dir, tmp_path):
    def lora_trainings(*overrides: str) -> int:
        config = load_config(ROOT / "configs" / "demo-cpu.yaml",
                             [f"out={tmp_path}", f"models=[{tiny_model_dir}]", *overrides])
        (row,) = [r for r in plan(config)["rows"] if r["arm"] == "sft-lora"]
        return row["trainings"]

    # 4 (task, angle) x 2 K x 1 seed; the 2 orders share at batch 8 and not at batch 1
    assert lora_trainings() == 8
    assert lora_trainings("sft.lora.batch_size=1") == 16
