"""Where the hf engine's seconds go on a CPU: one profile per model, dtype and K of an ICL grid workload.

Each part is timed by torch.profiler record_function ranges wrapped around the engine's own steps (the
engine is not changed): packing the queries into trees, building each batch's tree context, the model
forward split into attention (the prefix part: flash kernel or bf16 GEMMs, the tree part), the output head
and the rest of the decoder (linears, norms, rotary, residuals), then the log-softmax and gather. What
is left of the wall time is Python between them. Also the same workload's FLOPs (bench/flops.py) against
the matmul peak measured in this process: the share of the FLOP limit reached, as benchmarks/throughput.py
counts it. Writes STEM.json and STEM.md.

    python benchmarks/profile_engine.py                                   # both models, K = 10, 200, fp32
    python benchmarks/profile_engine.py --models smollm2-135m --shots 200 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pack", "tree context", "attention: prefix", "attention: tree part", "output head",
         "decoder rest", "log-softmax + gather")


@contextlib.contextmanager
def instrumented(engine):
    """record_function ranges around the engine's steps, for the duration (monkeypatches undone after)."""
    import torch

    import iclsft.engine.hf as hf
    import iclsft.engine.tree_attention as ta

    rf = torch.profiler.record_function
    saved = {"pack": hf.pack, "build": ta.TreeContext.__dict__["build"], "prefix": ta.prefix_attention,
             "softmax": torch.log_softmax}
    build_fn = ta.TreeContext.build
    attention_fn = ta.tree_attention

    def pack(*a, **k):
        with rf("pack"):
            return saved["pack"](*a, **k)

    def build(*a, **k):
        with rf("tree context"):
            return build_fn(*a, **k)

    def prefix(*a, **k):
        with rf("attention: prefix"):
            return saved["prefix"](*a, **k)

    def attention(*a, **k):
        with rf("attention: tree part"):  # the prefix part inside is its own range: subtracted below
            return attention_fn(*a, **k)

    def log_softmax(*a, **k):
        with rf("log-softmax + gather"):
            return saved["softmax"](*a, **k)

    ranges = []
    hooks = []
    for module, label in ((engine.base.get_output_embeddings(), "output head"), (engine.base, "model forward")):
        hooks += [module.register_forward_pre_hook(lambda m, i, label=label: ranges.append(rf(label).__enter__())),
                  module.register_forward_hook(lambda m, i, o: ranges.pop().__exit__(None, None, None))]
    from transformers import AttentionInterface

    hf.pack, ta.prefix_attention = pack, prefix
    ta.TreeContext.build = staticmethod(build)
    torch.log_softmax = log_softmax
    ta._register()
    AttentionInterface.register(ta.NAME, attention)
    try:
        yield
    finally:
        hf.pack, ta.prefix_attention, torch.log_softmax = saved["pack"], saved["prefix"], saved["softmax"]
        ta.TreeContext.build = saved["build"]
        AttentionInterface.register(ta.NAME, attention_fn)
        for h in hooks:
            h.remove()


def profile_one(model_name: str, dtype: str, shots: int, queries: int, budget: int, peak: float,
                workers: tuple[int, ...] = (1, 2)) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from iclsft.bench.flops import tree_flops
    from iclsft.bench.grid import grid_sample
    from iclsft.engine.hf import HFEngine
    from iclsft.engine.packing import pack
    from iclsft.models import load_model

    sample = grid_sample(model_name, queries)
    ref, builder, qs, prefix = sample.ref, sample.builder, sample.queries, sample.prefix(shots)
    model = load_model(ref, dtype)[0]
    engine = HFEngine(model, token_budget=budget, progress=False, workers=1)
    engine.prefix_kv(prefix)  # computed once per condition: not part of the per-query cost
    engine.score(prefix, qs[:64], builder.label_ids)  # warm-up
    timed, scores = {}, {}
    for _ in range(2):  # each setting twice, interleaved: the best of two
        for w in workers:
            engine.workers = w
            t0 = time.perf_counter()
            scores[w] = engine.score(prefix, qs, builder.label_ids)
            timed[w] = min(timed.get(w, float("inf")), time.perf_counter() - t0)
    engine.workers = 1
    plain = timed[1] if 1 in timed else next(iter(timed.values()))
    with instrumented(engine), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        engine.score(prefix, qs, builder.label_ids)
        wall = time.perf_counter() - t0
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    parts = {p: totals.get(p, 0.0) for p in PARTS}
    parts["attention: tree part"] -= parts["attention: prefix"]  # the prefix range sits inside it
    forward = totals.get("model forward", 0.0)
    parts["decoder rest"] = max(0.0, forward - parts["attention: prefix"] - parts["attention: tree part"]
                                - parts["output head"])
    parts["python and other"] = max(0.0, wall - sum(parts.values()))
    flops, _ = tree_flops(model.config, pack(qs, builder.label_ids, budget), len(prefix))
    config = model.config
    engine.close()
    return {"model": model_name, "dtype": dtype, "shots": shots, "prefix_tokens": len(prefix), "queries": queries,
            "token_budget": budget, "threads": torch.get_num_threads(), "wall_seconds": round(wall, 3),
            "unprofiled_seconds": round(plain, 3), "queries_per_s": round(queries / plain, 1),
            "gflops": round(flops / 1e9, 2), "gflop_per_s": round(flops / plain / 1e9, 1),
            "peak_gflop_per_s": round(peak, 1), "of_flop_limit": round(flops / plain / 1e9 / peak, 3),
            "by_workers": {w: {"queries_per_s": round(queries / t, 1),
                               "of_flop_limit": round(flops / t / 1e9 / peak, 3),
                               "max_abs_diff_to_1": float(np.abs(scores[w] - scores[workers[0]]).max())}
                           for w, t in timed.items()},
            "vocab": config.vocab_size, "parts": {k: round(v, 3) for k, v in parts.items()}}


def markdown(rows: list[dict], cpu: str) -> str:
    out = [f"### Where the hf engine's time goes, {time.strftime('%Y-%m-%d')} ({cpu})", "",
           "Seconds of one scoring call (prefix KV computed before; torch.profiler ranges; `python and other`: "
           "wall time left over). Of FLOP limit: model matmul FLOPs of the packed batches / unprofiled wall time "
           "/ the fp32 or bf16 matmul peak measured in the same process. The parts are of one worker (batches one "
           "after another at all threads).", "",
           "| model | dtype | K (prefix) | queries | threads | q/s | of FLOP limit | " + " | ".join(PARTS)
           + " | python and other |", "|---|---|---|---:|---:|---:|---:|" + "---:|" * (len(PARTS) + 1)]
    for r in rows:
        total = sum(r["parts"].values()) or 1.0
        cells = " | ".join(f"{r['parts'][p]:.2f} ({100 * r['parts'][p] / total:.0f}%)"
                           for p in (*PARTS, "python and other"))
        out.append(f"| {r['model']} | {r['dtype']} | {r['shots']} ({r['prefix_tokens']}) | {r['queries']} | "
                   f"{r['threads']} | {r['queries_per_s']} | {r['of_flop_limit']:.2f} of {r['peak_gflop_per_s']} | "
                   f"{cells} |")
    out += ["", "Batch workers (`HFEngine(workers=N)`: N batches at once, torch's threads shared out), same process:",
            "", "| model | dtype | K | workers | q/s | of FLOP limit | max abs diff to workers 1 |",
            "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for w, v in r["by_workers"].items():
            out.append(f"| {r['model']} | {r['dtype']} | {r['shots']} | {w} | {v['queries_per_s']} | "
                       f"{v['of_flop_limit']:.2f} | {v['max_abs_diff_to_1']:.1e} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--shots", default="10,200")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--token-budget", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "engine_profile")
    args = parser.parse_args()
    import torch

    from iclsft.bench.flops import matmul_peak
    from iclsft.bench.machine import cpu_description

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_description()
    peaks = {d: matmul_peak(d) for d in args.dtypes.split(",")}
    rows = [profile_one(m, d, int(k), args.queries, args.token_budget, peaks[d])
            for m in args.models.split(",") for d in args.dtypes.split(",") for k in args.shots.split(",")]
    args.out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, cpu))
    print(markdown(rows, cpu))


if __name__ == "__main__":
    main()
