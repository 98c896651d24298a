"""The SFT recipe: one model trained from the base model on the 2K exemplars of shot count K.

Plain function, no framework: AdamW, linear warmup then cosine decay, gradient clipping, loss on
the label tokens only (or, with `TrainJob.loss = "all"`, on every token of the example: the implicit
suite's original recipe, as the study's causal-LM fine-tuning did). The examples are visited in
stream order, epoch after epoch (the same order the ICL prompt shows them in); a batch is the next
`batch_size` examples of that order, and within a batch they are taken sorted by their ids
(`canonical_order`), so that batches holding the same examples give bit-identical weights.

`SftSpec.precision` "bf16-mixed" keeps weights and optimizer state in fp32 and runs forward and
backward under bf16 autocast (checkpoints are saved in the weights' dtype, fp32, either way);
`gradient_checkpointing` recomputes activations in backward instead of keeping them.
`SftSpec.workers` > 1 trains the same recipe sharded over Ray Train workers (`iclsft.sft.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import socket
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from iclsft.cpu import warn_emulated_bf16
from iclsft.errors import is_out_of_memory, out_of_memory
from iclsft.faults import fault_point
from iclsft.heap import heap_kept
from iclsft.models import quiet_loading
from iclsft.sft.adapters import is_finished, save_checkpoint
from iclsft.sft.batches import batch_indices, canonical_order
from iclsft.spec import SftSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """Everything one training needs; picklable, so a Ray task can take it as is."""

    key: str
    base_path: str
    examples: list[tuple[list[int], list[int]]]  # (prompt ids = start + query, label ids), in stream order
    sft: SftSpec
    seed: int
    checkpoints: list[tuple[float, str]]  # (fraction of training, directory to save it in)
    threads: int | None = None
    meta: dict = field(default_factory=dict)  # carried through for the driver (condition names, ...)
    loss: Literal["label", "all"] = "label"  # which tokens the loss covers (see `target_rows`)


OOM_TRAINING = ("lower the SFT batch size (sft --batch-size; sweep: sft.<method>.batch_size), train LoRA instead "
                "of full weights, or give each training more memory (fewer trainings at once: --cpus-per-task)")


def total_steps(n_examples: int, sft: SftSpec) -> int:
    per_epoch = math.ceil(n_examples / sft.batch_size)
    return max(sft.min_steps, sft.epochs * per_epoch)


def checkpoint_steps(total: int, fractions: Sequence[float]) -> dict[float, int]:
    return {f: max(1, round(f * total)) for f in fractions}


def in_training_order(job: TrainJob) -> TrainJob:
    """`job` with its examples in `canonical_order` (what `training_key` hashes); idempotent."""
    ordered = canonical_order(job.examples, job.sft.batch_size)
    return job if ordered == list(job.examples) else dataclasses.replace(job, examples=ordered)


LOSSES = ("label", "all")


def target_rows(prompt_len: int, label_len: int, loss: str = "label") -> range:
    """Positions of an example's logits whose next token enters the loss: those predicting the label
    tokens ("label"), or every token after the first ("all": prompt and label alike)."""
    if loss == "label":
        return range(prompt_len - 1, prompt_len - 1 + label_len)
    if loss == "all":
        return range(0, prompt_len + label_len - 1)
    raise ValueError(f"loss {loss!r} is not allowed: choose one of {', '.join(LOSSES)}")


def label_nll(model, batch: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
              loss: str = "label") -> torch.Tensor:
    """Mean over examples of -log p(label tokens | prompt): the exact quantity scoring reads.

    loss="all": mean over examples of each example's mean -log p per token over all its tokens after
    the first, the causal-LM loss of the study's trainer (HF Trainer, one example per device step)."""
    seqs = [list(p) + list(lab) for p, lab in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: causal attention never looks at the pads
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = torch.zeros((), device=device)
    for i, (prompt, label) in enumerate(batch):
        if loss == "label":  # kept as it was, so label-only training stays bit for bit the same
            rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(label), device=device)
            total = total - logprobs[i, rows, torch.tensor(list(label), device=device)].sum()
            continue
        span = target_rows(len(prompt), len(label), loss)
        rows = torch.arange(span.start, span.stop, device=device)
        targets = torch.tensor(seqs[i][span.start + 1: span.stop + 1], device=device)
        total = total - logprobs[i, rows, targets].sum() / len(span)
    return total / len(batch)


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    """The forward/backward context of a precision: bf16 autocast for "bf16-mixed", nothing for "fp32"."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16-mixed":
        if device_type == "cpu":
            warn_emulated_bf16("bf16-mixed training", "22x slower than fp32 (LoRA)", "train in fp32 (--precision fp32)",
                               logger)
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r} is not allowed: choose fp32 or bf16-mixed")


def batch_loss(model, batch: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, loss: str,
               precision: str) -> torch.Tensor:
    """`label_nll` under the precision's autocast (the loss itself is taken from fp32 logits)."""
    with autocast(precision, next(model.parameters()).device.type):
        return label_nll(model, batch, pad_id, loss)


def prepare_model(base_path: str, sft: SftSpec, seed: int, device: str | None = None):
    """The base model made trainable as the method says, in fp32 (also for bf16-mixed: master weights).
    `device`: where to put it (default: the current CUDA device when there is one, else the CPU)."""
    from transformers import AutoModelForCausalLM


    seed_everything(seed)
    quiet_loading()
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, attn_implementation="sdpa")
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device:
        model.to(device)
    return make_trainable(model, sft)


def make_trainable(model, sft: SftSpec):
    """`model` made trainable as the method says: gradient checkpointing if asked, LoRA adapters, or
    the unembedding frozen (used on loaded checkpoints and, by the GPU benchmark, on random models)."""
    if sft.gradient_checkpointing:
        # non-reentrant: recomputes exactly and needs no input that requires grad; LoRA freezes the
        # embeddings, so the inputs are made to require grad anyway, as peft's own recipe does
        # transformers >= 5.2x renamed it activation checkpointing (the old name warns, then goes in v6)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if sft.method == "lora":
            model.enable_input_require_grads()
    if sft.method == "lora":
        import warnings

        from peft import LoraConfig, get_peft_model

        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

        config = LoraConfig(r=sft.lora_r, lora_alpha=sft.lora_alpha, lora_dropout=sft.lora_dropout,
                            target_modules=list(sft.target_modules), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    elif sft.method == "full-frozen-unembed":
        # with tied embeddings these are one tensor; freezing both names covers untied models too
        model.get_output_embeddings().weight.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(job: TrainJob) -> dict:
    """Train, saving each requested checkpoint that is not already finished; return statistics."""
    missing = [(f, d) for f, d in job.checkpoints if not is_finished(Path(d))]
    started = time.time()
    result = {"key": job.key, "checkpoints": {f: d for f, d in job.checkpoints}, "meta": job.meta,
              "trained": bool(missing), "losses": [], "seconds": 0.0, "started": started, "pid": os.getpid(),
              "worker": f"{socket.gethostname()}:{os.getpid()}"}
    if not missing:
        return result
    _injected_fault(job)
    job = in_training_order(job)
    threads_before = torch.get_num_threads()
    if job.threads:
        torch.set_num_threads(job.threads)
    try:
        with heap_kept():  # each step's gradients and optimizer temporaries reuse the last step's memory
            _train_missing(job, missing, result, started)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(f"training {job.sft.method} on {len(job.examples)} examples", OOM_TRAINING, e) from e
    finally:
        torch.set_num_threads(threads_before)  # the local executor runs in the caller's process
    return result


def optimization(model, job: TrainJob, missing: Sequence[tuple[float, str]]):
    """The recipe's optimisation for `model`, shared by single-process and sharded training: its
    trainable parameters, AdamW, the cosine schedule with warmup, the total steps and the steps after
    which the `missing` checkpoint fractions are saved ({step: [fractions]}; two may round to one)."""
    from transformers import get_cosine_schedule_with_warmup

    sft = job.sft
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sft.lr, weight_decay=sft.weight_decay)
    steps = total_steps(len(job.examples), sft)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(sft.warmup_ratio * steps), steps)
    save_at: dict[int, list[float]] = defaultdict(list)
    for fraction, at in checkpoint_steps(steps, [f for f, _ in missing]).items():
        save_at[at].append(fraction)
    return params, optimizer, scheduler, steps, save_at


def _train_missing(job: TrainJob, missing: list[tuple[float, str]], result: dict, started: float) -> None:
    sft = job.sft
    model = prepare_model(job.base_path, sft, job.seed)
    model.train()
    params, optimizer, scheduler, steps, save_at = optimization(model, job, missing)
    dirs = dict(missing)
    pad_id = 0
    for step in range(max(save_at)):
        batch = [job.examples[i] for i in batch_indices(step, len(job.examples), sft.batch_size)]
        loss = batch_loss(model, batch, pad_id, job.loss, sft.precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, sft.max_grad_norm)
        optimizer.step()
        scheduler.step()
        result["losses"].append(round(loss.item(), 6))
        fault_point("train-step")
        for fraction in save_at.get(step + 1, ()):
            info = marker_info(job, fraction, step + 1, steps, result["losses"][-1], started)
            model.eval()
            save_checkpoint(model, Path(dirs[fraction]), info,
                            tokenizer_dir=None if sft.method == "lora" else Path(job.base_path))
            model.train()
    result["seconds"] = round(time.time() - started, 2)
    result["finished"] = time.time()
    result["steps"] = steps


def marker_info(job: TrainJob, fraction: float, step: int, steps: int, loss: float, started: float) -> dict:
    """What a checkpoint's marker records (the memory knobs only when set, so default markers stay)."""
    sft = job.sft
    knobs = {k: v for k, v in (("gradient_checkpointing", sft.gradient_checkpointing), ("workers", sft.workers))
             if v != SftSpec.model_fields[k].default}
    return {"key": job.key, "fraction": fraction, "step": step, "total_steps": steps,
            "method": sft.method, "sft": sft.model_dump(mode="json"), "seed": job.seed,
            "examples": len(job.examples), "base": job.base_path, "loss": loss,
            "seconds": round(time.time() - started, 2), **job.meta,
            **({"loss_on": job.loss} if job.loss != "label" else {}), **knobs}


def _injected_fault(job: TrainJob) -> None:
    """Fault injection for the retry tests: with ICLSFT_FAULT_TRAIN_ONCE=DIR, the first attempt of each
    training fails (a marker file in DIR remembers the attempt), the retry goes through."""
    fault_dir = os.environ.get("ICLSFT_FAULT_TRAIN_ONCE")
    if not fault_dir:
        return
    marker = Path(fault_dir) / f"attempted-{job.key[:16]}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        raise RuntimeError(f"injected fault: first attempt of training {job.key[:16]} fails")
