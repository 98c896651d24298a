"""Sharded full fine-tuning: the single-process recipe on N Ray Train workers with FSDP2.

For models whose weights, gradients and AdamW state do not fit one device (a full fine-tune of an
8B model needs ~128 GB in fp32), `SftSpec.workers` = N > 1 runs `iclsft.sft.train`'s recipe under
Ray Train's `TorchTrainer` (it starts the workers and the process group: NCCL on GPUs, gloo on CPUs)
with torch's FSDP2 (`fully_shard` on each decoder layer, then on the root): each worker holds 1/N of
every parameter, gradient and optimizer state.

Same recipe, data parallel over the batch: every step takes the same global batch as single-process
training (same examples, same order, same schedule, same clipping on the global gradient norm), and
worker r takes its contiguous slice. Each worker's loss is its examples' summed loss times N over the
global batch size, so FSDP's mean over workers is exactly the gradient of the global batch mean. A
worker with no example in a short last batch runs a forward on a stand-in example with weight zero,
so that every worker joins every collective. The result equals single-process training up to
reduction order (per-slice matmuls, the sharded gradient reduction and norm): fp32 rounding,
bounded in tests/test_sft_scale.py. That is why `workers` does not enter any id.

At each checkpoint the full state dict is gathered to worker 0's CPU memory, loaded into a plain
copy of the base model and saved by `save_checkpoint`, exactly as single-process training saves:
same files, same content-hash name, fp32 weights (the training dtype; bf16-mixed keeps fp32 master
weights). Worker 0's host therefore needs the model's fp32 size in CPU memory at save time.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import torch

from iclsft.heap import heap_kept
from iclsft.models import quiet_loading
from iclsft.sft.adapters import is_finished, save_checkpoint
from iclsft.sft.train import (
    TrainJob,
    batch_indices,
    batch_loss,
    marker_info,
    optimization,
    prepare_model,
)
from iclsft.spec import ExecutorSpec


def train_distributed(job: TrainJob, executor: ExecutorSpec | None = None) -> dict:
    """Train `job` on `job.sft.workers` Ray Train workers (on the Ray its caller started);
    save each missing checkpoint; return the statistics `iclsft.sft.train.train` returns."""
    missing = [(f, d) for f, d in job.checkpoints if not is_finished(Path(d))]
    started = time.time()
    result = {"key": job.key, "checkpoints": {f: d for f, d in job.checkpoints}, "meta": job.meta,
              "trained": bool(missing), "losses": [], "seconds": 0.0, "started": started, "pid": os.getpid(),
              "workers": job.sft.workers, "worker": f"ray-train x{job.sft.workers}"}
    if not missing:
        return result
    if job.sft.method == "lora":
        raise ValueError(f"workers {job.sft.workers}: sharded training is for full fine-tunes, not LoRA")
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as e:
        raise ImportError("sharded training (sft workers > 1) runs on Ray Train: pip install 'ray[train]'") from e
    executor = executor or ExecutorSpec()
    if not ray.is_initialized():
        raise RuntimeError("sharded training runs on a Ray its driver started (iclsft.graph.ray_backend."
                           "train_sharded, or ray.init())")
    gpus = ray.cluster_resources().get("GPU", 0) >= job.sft.workers
    box = ray.remote(num_cpus=0)(_ResultBox).remote()
    try:
        with tempfile.TemporaryDirectory(prefix="iclsft-raytrain-") as storage:
            trainer = TorchTrainer(
                _worker_loop,
                train_loop_config={"job": job, "missing": missing, "started": started, "box": box},
                scaling_config=ScalingConfig(num_workers=job.sft.workers, use_gpu=gpus,
                                             resources_per_worker={"CPU": executor.cpus_per_task}),
                run_config=RunConfig(name=f"iclsft-{job.key[:16]}", storage_path=storage),
            )
            trainer.fit()
        result.update(ray.get(box.get.remote()))
    finally:
        ray.kill(box)
    result["seconds"] = round(time.time() - started, 2)
    result["finished"] = time.time()
    return result


class _ResultBox:
    """Worker 0 leaves its statistics here for the driver (Ray Train V2 returns no values)."""

    def __init__(self) -> None:
        self.value: dict = {}

    def put(self, value: dict) -> None:
        self.value = value

    def get(self) -> dict:
        return self.value


def shard(model, device_type: str) -> None:
    """FSDP2: each decoder layer its own unit (its weights gathered only while it runs), then the root
    (embeddings, final norm, head). Decoder layers are the model's `_no_split_modules` classes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"cannot shard {type(model).__name__}: it names no decoder layer class (_no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: the single-process loop of `iclsft.sft.train`, on this worker's slice."""
    with heap_kept():  # as `train`: each step reuses the last step's memory
        _worker_steps(config)


def _worker_steps(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    job: TrainJob = config["job"]
    sft = job.sft
    torch.set_num_threads(job.threads or 1)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = prepare_model(job.base_path, sft, job.seed, device=str(device))
    shard(model, device.type)
    model.train()
    params, optimizer, scheduler, steps, save_at = optimization(model, job, config["missing"])
    dirs = dict(config["missing"])
    losses: list[float] = []
    shell = None  # worker 0's unsharded copy of the model, loaded at the first save
    for step in range(max(save_at)):
        batch = [job.examples[i] for i in batch_indices(step, len(job.examples), sft.batch_size)]
        weighted, summed = shard_loss(model, batch, rank, world, job.loss, sft.precision)
        optimizer.zero_grad(set_to_none=True)
        weighted.backward()
        torch.nn.utils.clip_grad_norm_(params, sft.max_grad_norm)  # DTensor grads: the global norm
        optimizer.step()
        scheduler.step()
        total = summed.reshape(1)
        torch.distributed.all_reduce(total)
        losses.append(round(total.item() / len(batch), 6))
        for fraction in save_at.get(step + 1, ()):
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                shell = shell or _plain_model(job.base_path)
                shell.load_state_dict(full)
                info = marker_info(job, fraction, step + 1, steps, losses[-1], config["started"])
                save_checkpoint(shell, Path(dirs[fraction]), info,
                                tokenizer_dir=Path(job.base_path))
            del full
            torch.distributed.barrier()  # the checkpoint is on disk before any worker moves on
    if rank == 0:
        ray.get(config["box"].put.remote({"losses": losses, "steps": steps}))


def shard_slice(batch: list, rank: int, world: int) -> list:
    """Worker `rank`'s contiguous share of the batch (ceil(B / N) each; the last ones may be short)."""
    per = math.ceil(len(batch) / world)
    return batch[rank * per: (rank + 1) * per]


def shard_loss(model, batch: list, rank: int, world: int, loss: str,
               precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, this worker's summed example loss, detached) for worker `rank` of
    `world`. The first is weighted so that the mean of the workers' gradients, which FSDP's reduction
    takes, is the gradient of the global batch's mean loss."""
    mine = shard_slice(batch, rank, world)
    # an empty share still runs a forward (weight zero): every worker must join FSDP's collectives
    summed = batch_loss(model, mine or batch[:1], 0, loss, precision) * len(mine)
    return summed * world / len(batch), summed.detach()


def _plain_model(base_path: str):
    """The base model, unsharded, on the CPU, in fp32 and eval mode: the frame the gathered weights go in."""
    from transformers import AutoModelForCausalLM

    quiet_loading()
    return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, attn_implementation="sdpa").eval()
