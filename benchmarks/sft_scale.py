"""SFT step time by precision and gradient checkpointing, in one process, on the default model.

    python benchmarks/sft_scale.py            # writes docs/benchmarks/sft_scale.json

The real training examples of one (θ=90°, K, seed 0) condition, the default template and batch size;
each configuration keeps its own model and AdamW, and the configurations take turns step by step
(round robin), so that load from other processes falls on all of them alike. The median step time
after `--warmup` steps is reported, with the ratio to fp32 of the same method.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from sft_bench import linear2d_examples

from iclsft.artifacts import atomic_write_json
from iclsft.cpu import cpu_flags
from iclsft.sft.train import batch_indices, batch_loss, prepare_model
from iclsft.spec import sft_spec

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "sft_scale.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref, examples = linear2d_examples(args.model, 90.0, args.shots)
    rows = []
    for method in args.methods.split(","):
        configs = {(prec, gc): sft_spec(method, precision=prec, gradient_checkpointing=gc)
                   for prec in ("fp32", "bf16-mixed") for gc in (False, True)}
        states = {}
        for key, sft in configs.items():
            model = prepare_model(str(ref.path), sft, 0)
            model.train()
            params = [q for q in model.parameters() if q.requires_grad]
            states[key] = (model, params, torch.optim.AdamW(params, lr=sft.lr), [])
        for step in range(args.warmup + args.steps):
            batch = [examples[i] for i in batch_indices(step, len(examples), 8)]
            for (prec, _), (model, params, opt, times) in states.items():
                t = time.perf_counter()
                loss = batch_loss(model, batch, 0, "label", prec)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                times.append(time.perf_counter() - t)
        base = statistics.median(states[("fp32", False)][3][args.warmup:])
        for (prec, gc), (_, _, _, times) in states.items():
            median = statistics.median(times[args.warmup:])
            rows.append({"method": method, "precision": prec, "gradient_checkpointing": gc,
                         "step_s": round(median, 4), "ratio_to_fp32": round(median / base, 3)})
            print(rows[-1], flush=True)
        del states
    flags = cpu_flags() or frozenset()
    out = {"date": date.today().isoformat(), "model": args.model, "shots": args.shots, "examples": len(examples),
           "batch_size": 8, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
