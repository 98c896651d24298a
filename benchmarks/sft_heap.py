"""A full fine-tune's step time with glibc's default allocation policy or with freed memory kept in the
process (`iclsft.heap.heap_kept`, what `train` uses).

    python benchmarks/sft_heap.py --model gemma3-270m     # writes docs/benchmarks/sft_heap.json

The policy is process-wide state whose effect is that memory freed at one step is still there at the
next, so it cannot take turns with the default step by step in one process (switching back trims the
heap). Instead each policy trains in its own child process, the children alternating (default, kept,
default, kept, ... `--rounds` times) on the same machine at the same time of day, each with its own
model and AdamW on the same batches (the real training examples of one θ=45°, K, seed-0 condition).
Reported per policy: the median step time after `--warmup` steps over all its rounds, its ratio to the
default's, user and kernel CPU seconds per step, peak RSS, and the largest loss difference from the
default's losses (allocation must not change them).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from sft_bench import linear2d_examples

from iclsft.artifacts import atomic_write_json
from iclsft.cpu import cpu_flags
from iclsft.heap import heap_kept
from iclsft.sft.train import batch_indices, label_nll, prepare_model
from iclsft.spec import sft_spec

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("glibc default", "heap kept")


def child(args) -> dict:
    """One policy's training loop in this process: step times, CPU seconds per step, losses."""
    from contextlib import nullcontext

    torch.set_num_threads(args.threads)
    ref, examples = linear2d_examples(args.model, 45.0, args.shots)
    sft = sft_spec(args.method)
    times, losses, user, system = [], [], 0.0, 0.0
    with heap_kept() if args.child == "heap kept" else nullcontext():
        model = prepare_model(str(ref.path), sft, 0)
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=sft.lr)
        for step in range(args.warmup + args.steps):
            batch = [examples[i] for i in batch_indices(step, len(examples), sft.batch_size)]
            before = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            loss = label_nll(model, batch, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, sft.max_grad_norm)
            opt.step()
            times.append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_SELF)
            if step >= args.warmup:
                user += after.ru_utime - before.ru_utime
                system += after.ru_stime - before.ru_stime
            losses.append(loss.item())
    return {"times": times[args.warmup:], "losses": losses, "user_s": user / args.steps, "sys_s": system / args.steps,
            "examples": len(examples), "batch_size": sft.batch_size,
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--method", default="full")
    p.add_argument("--shots", type=int, default=50)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "sft_heap.json")
    p.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in POLICIES}
    for _ in range(args.rounds):
        for name in POLICIES:
            cmd = [sys.executable, __file__, "--child", name] + [
                f"--{k}={getattr(args, k)}" for k in ("model", "method", "shots", "steps", "warmup", "threads")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, [round(t, 2) for t in runs[name][-1]["times"]], flush=True)
    base = statistics.median(t for r in runs[POLICIES[0]] for t in r["times"])
    rows = []
    for name, rs in runs.items():
        median = statistics.median(t for r in rs for t in r["times"])
        rows.append({"policy": name, "step_s": round(median, 3), "ratio_to_default": round(median / base, 3),
                     "user_s_per_step": round(statistics.mean(r["user_s"] for r in rs), 2),
                     "sys_s_per_step": round(statistics.mean(r["sys_s"] for r in rs), 2),
                     "max_rss_gib": round(max(r["max_rss_gib"] for r in rs), 2),
                     "max_loss_diff": max(abs(a - b) for r, r0 in zip(rs, runs[POLICIES[0]])
                                          for a, b in zip(r["losses"], r0["losses"]))})
        print(rows[-1], flush=True)
    first = runs[POLICIES[0]][0]
    out = {"date": date.today().isoformat(), "model": args.model, "method": args.method, "shots": args.shots,
           "examples": first["examples"], "batch_size": first["batch_size"], "threads": args.threads,
           "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "libc": "-".join(platform.libc_ver()),
           "avx512_bf16": "avx512_bf16" in (cpu_flags() or ()), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
