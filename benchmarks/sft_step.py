"""A full fine-tune's step time: the output head at every position (`label_nll`, shipped) or only at the
label rows (`logits_to_keep`, tried), gradients freed or kept between steps; in one process, round robin.

    python benchmarks/sft_step.py --model gemma3-270m     # writes docs/benchmarks/sft_step.json

Each configuration keeps its own model and AdamW and takes the same batches (the real training
examples of one θ=45°, K, seed-0 condition); the median step time after `--warmup` steps is reported
with the ratio to `label_nll`'s step, and the largest loss difference from its loss. Result (2026-12-06,
gemma3-270m full K=10, 2 threads): the label rows alone save nothing (0.986x) and kept gradients cost
1.33x, so `label_nll` stays as it is (docs/sft.md, "Step time").
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from sft_bench import linear2d_examples

from iclsft.artifacts import atomic_write_json
from iclsft.cpu import cpu_flags
from iclsft.sft.train import batch_indices, label_nll, prepare_model
from iclsft.spec import sft_spec

ROOT = Path(__file__).resolve().parents[1]


def label_rows_nll(model, batch, pad_id: int) -> torch.Tensor:
    """The label loss with the output head only at the rows whose next token is a label token (their
    union over the batch, `logits_to_keep`), instead of `label_nll`'s head at every position."""
    seqs = [list(p) + list(lab) for p, lab in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    spans = [range(len(p) - 1, len(p) - 1 + len(lab)) for p, lab in batch]
    keep = sorted({r for span in spans for r in span})
    column = {r: j for j, r in enumerate(keep)}
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.tensor(keep)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = torch.zeros(())
    for i, span in enumerate(spans):
        cols = torch.tensor([column[r] for r in span])
        total = total - logprobs[i, cols, torch.tensor(seqs[i][span.start + 1: span.stop + 1])].sum()
    return total / len(batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--method", default="full")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "sft_step.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref, examples = linear2d_examples(args.model, 45.0, args.shots)
    sft = sft_spec(args.method)
    configs = {"every position, grads freed": (label_nll, True),
               "label rows, grads freed": (label_rows_nll, True),
               "label rows, grads kept": (label_rows_nll, False)}
    states = {}
    for name in configs:
        model = prepare_model(str(ref.path), sft, 0)
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        states[name] = (model, params, torch.optim.AdamW(params, lr=sft.lr), [], [])
    for step in range(args.warmup + args.steps):
        batch = [examples[i] for i in batch_indices(step, len(examples), sft.batch_size)]
        for name, (loss_fn, free) in configs.items():
            model, params, opt, times, losses = states[name]
            t = time.perf_counter()
            loss = loss_fn(model, batch, 0)
            opt.zero_grad(set_to_none=free)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, sft.max_grad_norm)
            opt.step()
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
    old = states["every position, grads freed"]
    base = statistics.median(old[3][args.warmup:])
    rows = []
    for name, (_, _, _, times, losses) in states.items():
        median = statistics.median(times[args.warmup:])
        rows.append({"config": name, "step_s": round(median, 3), "ratio_to_old": round(median / base, 3),
                     "max_loss_diff": max(abs(a - b) for a, b in zip(losses, old[4]))})
        print(rows[-1], flush=True)
    out = {"date": date.today().isoformat(), "model": args.model, "method": args.method, "shots": args.shots,
           "examples": len(examples), "batch_size": sft.batch_size, "threads": args.threads, "steps": args.steps,
           "warmup": args.warmup, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "avx512_bf16": "avx512_bf16" in (cpu_flags() or ()),
           "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
