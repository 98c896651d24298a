"""Training at scale on the tiny random Llama (real SmolLM2 tokenizer): bf16 mixed precision, gradient
checkpointing and sharded full fine-tuning on two Ray Train workers with FSDP2 (gloo on CPU), each
against single-process fp32 training as the reference; and the ids these options leave alone.

Tolerances. Gradient checkpointing recomputes the same operations in the same order: losses and
weights must agree to 1e-6 (they agree bit for bit here). bf16-mixed rounds activations to 8
significant bits (relative 2^-9 per operation): losses stay within 2% of fp32 at every step (measured:
at most 0.5% on this model, losses ~11 nats). Two FSDP workers differ from one process only in
reduction order (per-slice matmuls, the gradient reduce-scatter, the sharded norm): after 5 fp32
AdamW steps every weight is within 1e-5 of the single-process weight (measured: 1.2e-7; the weights
move by > 1e-3 from the base, so the bound is 100x below the training signal) and every logged loss
within 1e-5.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from iclsft.sft.adapters import MARKER, training_key
from iclsft.sft.train import TrainJob, label_nll, prepare_model, train
from iclsft.spec import Condition, ModelSpec, SftSpec, TaskSpec, TemplateSpec, sft_spec

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "iclsft-home"))
    monkeypatch.delenv("ICLSFT_FAULT_TRAIN_ONCE", raising=False)


def examples(n: int = 10, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """BOS + 3-7 random ids, then a one-token label: prompts of unequal length, so batches pad."""
    rng = random.Random(seed)
    return [([1] + [rng.randrange(10, 500) for _ in range(rng.randrange(3, 8))], [rng.randrange(10, 500)])
            for _ in range(n)]


def job_for(model_dir: Path, out: Path, sft: SftSpec, checkpoints=(1.0,), data=None) -> TrainJob:
    return TrainJob(key=out.name, base_path=str(model_dir), examples=data or examples(), sft=sft, seed=0,
                    checkpoints=[(f, str(out / f"ckpt-{f:g}")) for f in checkpoints])


def tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = Path(ckpt).glob("*.safetensors")
    return load_file(path)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- ids -------------------------------------------------------------------------------------------

# Training keys of the default SftSpec per method, computed before precision, gradient_checkpointing and
# workers existed (commit 991933c): they name checkpoints on disk, which no version bump may move
# (iclsft.sft.adapters.TRAINING_KEY_VERSION); condition ids follow iclsft.versions.
KEYS_BEFORE = {
    "lora": "48407da4df8e0f676b65ed079890b3ac03bf40d1c022d176b9ac890ab53a6d01",
    "full": "e9ba913acf59c1dc3e82e6ca3d82372de51af65b1f45fd4668340c59222c456d",
    "full-frozen-unembed": "6785bb33674f6538bb98c776bc39774527bc85898f26b9e5530c7d0404900d1b",
}


def condition(sft: SftSpec) -> Condition:
    return Condition(task=TaskSpec(angle=30), template=TemplateSpec(), model=ModelSpec(name="x", fingerprint="f"),
                     method=sft.method, shots=2, seed=0, order="random", dtype="float32", sft=sft, checkpoint=1.0)


def test_defaults_keep_training_keys_precision_enters_ids_memory_knobs_do_not():
    for method, before in KEYS_BEFORE.items():
        default = sft_spec(method)
        assert training_key("f", [([1, 2], [3])], default, 0) == before
        stored = default.model_dump(mode="json")
        assert stored["precision"] == "fp32" and not {"gradient_checkpointing", "workers"} & stored.keys()
    for method in ("lora", "full"):
        base = sft_spec(method)
        knobs = sft_spec(method, gradient_checkpointing=True, workers=1 if method == "lora" else 4)
        bf16 = sft_spec(method, precision="bf16-mixed")
        assert condition(knobs).id == condition(base).id
        assert training_key("f", [], knobs, 0) == training_key("f", [], base, 0)
        assert condition(bf16).id != condition(base).id
        assert training_key("f", [], bf16, 0) != training_key("f", [], base, 0)
        assert bf16.model_dump(mode="json")["precision"] == "bf16-mixed"


@pytest.mark.parametrize("overrides, message", [
    ({"precision": "bf16"}, "precision"),
    ({"workers": 0}, "workers"),
    ({"method": "lora", "workers": 2}, "workers 2 applies to full fine-tunes only"),
])
def test_bad_scale_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        SftSpec(**overrides)


# -- gradient checkpointing: exact ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_recomputes_exactly(method, tiny_model_dir, tmp_path):
    sft = sft_spec(method, epochs=1, min_steps=5, batch_size=4)
    model = prepare_model(str(tiny_model_dir), sft.model_copy(update={"gradient_checkpointing": True}), 0)
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x; the old name warns
    assert (model.is_gradient_checkpointing if on is None else on)  # else this compares a run with itself
    plain = train(job_for(tiny_model_dir, tmp_path / "plain", sft))
    ckpt = train(job_for(tiny_model_dir, tmp_path / "gc", sft.model_copy(update={"gradient_checkpointing": True})))
    assert len(plain["losses"]) == 5
    assert max(abs(a - b) for a, b in zip(plain["losses"], ckpt["losses"])) <= 1e-6
    assert max_diff(tensors(tmp_path / "plain" / "ckpt-1"), tensors(tmp_path / "gc" / "ckpt-1")) <= 1e-6
    assert json.loads((tmp_path / "gc" / "ckpt-1" / MARKER).read_text())["gradient_checkpointing"] is True


# -- bf16 mixed precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_mixed_tracks_fp32_and_keeps_fp32_weights(method, tiny_model_dir, tmp_path):
    sft = sft_spec(method, epochs=1, min_steps=8, batch_size=4)
    bf16 = sft.model_copy(update={"precision": "bf16-mixed"})
    assert all(p.dtype == torch.float32 for p in prepare_model(str(tiny_model_dir), bf16, 0).parameters())
    fp32 = train(job_for(tiny_model_dir, tmp_path / "fp32", sft))["losses"]
    mixed = train(job_for(tiny_model_dir, tmp_path / "bf16", bf16))["losses"]
    gaps = [abs(a - b) / a for a, b in zip(fp32, mixed)]
    assert len(gaps) == 8 and max(gaps) < 0.02, gaps
    assert max(abs(a - b) for a, b in zip(fp32, mixed)) > 1e-4  # autocast really ran in bf16
    saved = tensors(tmp_path / "bf16" / "ckpt-1")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # checkpoints in the weights' dtype
    assert max_diff(saved, tensors(tmp_path / "fp32" / "ckpt-1")) > 0
    marker = json.loads((tmp_path / "bf16" / "ckpt-1" / MARKER).read_text())
    assert marker["sft"]["precision"] == "bf16-mixed"


def test_bf16_autocast_rounds_the_forward(tiny_model, smollm_tokenizer):
    """fp32 is the plain forward bit for bit; bf16-mixed moves the loss beyond fp32 noise but within 2%."""
    from iclsft.sft.train import batch_loss

    batch = examples(4)
    fp32 = label_nll(tiny_model, batch, 0).item()
    assert batch_loss(tiny_model, batch, 0, "label", "fp32").item() == fp32
    mixed = batch_loss(tiny_model, batch, 0, "label", "bf16-mixed").item()
    assert 1e-4 < abs(mixed - fp32) < 0.02 * fp32


# -- sharding: the weighting of each worker's share ---------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_worker_losses_average_to_the_global_batch_gradient(world, tiny_model):
    """Mean over workers of each worker's gradient (what FSDP's reduction takes) equals the gradient of
    the whole batch's mean loss, with uneven and empty shares (5 examples over 2 or 3 workers; 1 over 2)."""
    from iclsft.sft.distributed import shard_loss, shard_slice

    for batch in (examples(5), examples(1)):
        assert [x for r in range(world) for x in shard_slice(batch, r, world)] == batch
        tiny_model.zero_grad(set_to_none=True)
        label_nll(tiny_model, batch, 0).backward()
        reference = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
        total = {n: torch.zeros_like(p) for n, p in tiny_model.named_parameters()}
        summed = 0.0
        for rank in range(world):
            tiny_model.zero_grad(set_to_none=True)
            weighted, part = shard_loss(tiny_model, batch, rank, world, "label", "fp32")
            weighted.backward()
            summed += part.item()
            for n, p in tiny_model.named_parameters():
                total[n] += p.grad / world
        tiny_model.zero_grad(set_to_none=True)
        assert summed / len(batch) == pytest.approx(label_nll(tiny_model, batch, 0).item(), rel=1e-6)
        assert max_diff(total, reference) <= 1e-5 * max(g.abs().max().item() for g in reference.values())


# -- sharding: two Ray Train workers against one process -----------------------------------------------


@pytest.fixture(scope="module")
def ray_two_cpus():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_fsdp_two_workers_equal_single_process(ray_two_cpus, tiny_model_dir, tmp_path):
    """Full fine-tune, 5 steps of batch 3 over 10 examples (batches 3, 3, 3, 1, 3: uneven shares, one
    worker with none), checkpoints at 0.4 and 1: same files, weights within 1e-5, losses within 1e-5."""
    from iclsft.sft.distributed import train_distributed

    sft = sft_spec("full", epochs=1, min_steps=5, batch_size=3, lr=1e-3)
    single = train(job_for(tiny_model_dir, tmp_path / "one", sft, checkpoints=(0.4, 1.0)))
    sharded = train_distributed(job_for(tiny_model_dir, tmp_path / "two", sft.model_copy(update={"workers": 2}),
                                        checkpoints=(0.4, 1.0)))
    assert len(sharded["losses"]) == len(single["losses"]) == 5
    assert max(abs(a - b) for a, b in zip(single["losses"], sharded["losses"])) <= 1e-5
    base = tensors(tiny_model_dir)
    for name in ("ckpt-0.4", "ckpt-1"):
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        assert (one / "config.json").read_text() == (two / "config.json").read_text()
        a, b = tensors(one), tensors(two)
        assert max_diff(a, b) < 1e-5
        assert max_diff(a, {k: base[k] for k in a}) > 1e-3  # the weights did move: the bound means something
        marker_one, marker_two = (json.loads((d / MARKER).read_text()) for d in (one, two))
        assert (marker_two["step"], marker_two["workers"], marker_two["sft"]) == (
            marker_one["step"], 2, marker_one["sft"])
    assert {t.dtype for t in tensors(tmp_path / "two" / "ckpt-1").values()} == {torch.float32}


def test_sharded_run_sft_end_to_end(ray_two_cpus, tiny_model_dir, smollm_tokenizer, tmp_path):
    """The SFT arm with workers=2 (frozen embeddings, gradient checkpointing): the run finishes and scores,
    its checkpoint equals single-process training of the same job within 1e-5, embeddings unchanged."""
    from iclsft.arms import make_sft_spec
    from iclsft.arms.linear2d import plan_jobs
    from iclsft.graph.driver import run_spec
    from iclsft.prompts import prompt_builders
    from iclsft.spec import ExecutorSpec
    from iclsft.store import RunDir

    sft = sft_spec("full-frozen-unembed", epochs=1, min_steps=4, batch_size=3, lr=1e-3, workers=2,
                   gradient_checkpointing=True)
    spec, ref = make_sft_spec(model=str(tiny_model_dir), angles=(45.0,), shots=(2,), grid_step=10, sft=sft,
                              executor=ExecutorSpec(name="ray"))
    table = run_spec(spec, tmp_path / "run", ref, progress=False)
    assert len(table) == 1 and 0 <= float(table.accuracy.iloc[0]) <= 1
    (ckpt,) = (tmp_path / "run" / "adapters").iterdir()
    assert json.loads((ckpt / MARKER).read_text())["workers"] == 2  # trained sharded, not in one process
    builders = prompt_builders(smollm_tokenizer, spec.template, spec.tasks)
    (job,) = plan_jobs(spec, RunDir(tmp_path / "other"), ref, builders)[0]
    assert Path(job.checkpoints[0][1]).name == ckpt.name  # same content-hash name as one process would use
    single = job_for(tiny_model_dir, tmp_path / "single", sft.model_copy(update={"workers": 1}), data=job.examples)
    train(single)
    a, b = tensors(ckpt), tensors(tmp_path / "single" / "ckpt-1")
    assert max_diff(a, b) < 1e-5
    base = tensors(tiny_model_dir)
    assert torch.equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
