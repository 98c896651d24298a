"""The hf engine's prefix attention kernels side by side, in one process: torch's flash kernel against
the bf16 GEMMs around an fp32 softmax (`--prefix-kernel gemm`, `iclsft.engine.tree_attention`), and
scoring inside `heap_kept` (what `HFEngine.score` does) against glibc's default allocation. Per model and
K: grid queries per second of each setting (each run `--rounds` times, interleaved, the best kept), the
share of the FLOP limit (the model's matmul FLOPs over the matmul peak in the scoring dtype, measured in
this process at the start and the end, the higher kept), and each bf16 setting's log-prob differences to
the fp32 scores (the fp32 engine equals the naive forward to 1e-4). Writes STEM.json and STEM.md.

    python benchmarks/prefix_kernels.py                       # both models, K = 10 and 200
    python benchmarks/prefix_kernels.py --models smollm2-135m --shots 200 --queries 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> (dtype, prefix kernel, heap kept)
    "fp32 flash, default heap": ("float32", "flash", False),
    "fp32 flash, heap kept": ("float32", "flash", True),
    "bf16 flash, default heap": ("bfloat16", "flash", False),
    "bf16 flash, heap kept": ("bfloat16", "flash", True),
    "bf16 gemm, default heap": ("bfloat16", "gemm", False),
    "bf16 gemm, heap kept": ("bfloat16", "gemm", True),
}


def one_model(name: str, shots: list[int], queries: int, rounds: int, budget: int, peaks: dict,
              settings: dict) -> list[dict]:
    import iclsft.engine.hf as hf
    from iclsft.bench.flops import tree_flops
    from iclsft.bench.grid import grid_sample
    from iclsft.engine.packing import pack
    from iclsft.models import load_model

    sample = grid_sample(name, queries)
    ref, builder, qs = sample.ref, sample.builder, sample.queries
    engines = {d: hf.HFEngine(load_model(ref, d)[0], token_budget=budget, progress=False, workers=1)
               for d in dict.fromkeys(dtype for dtype, _, _ in settings.values())}
    kept = hf.heap_kept
    rows = []
    for k in shots:
        prefix = sample.prefix(k)
        flops, _ = tree_flops(engines["float32"].model.config, pack(qs, builder.label_ids, budget), len(prefix))
        best: dict[str, float] = {}
        scores: dict[str, np.ndarray] = {}
        for _ in range(rounds):
            for setting, (dtype, kernel, heap) in settings.items():
                hf.heap_kept = kept if heap else contextlib.nullcontext
                try:
                    engines[dtype].prefix_kernel = kernel
                    engines[dtype].score(prefix, qs[:64], builder.label_ids)  # warm-up (and compile)
                    t = time.perf_counter()
                    scores[setting] = engines[dtype].score(prefix, qs, builder.label_ids)
                    best[setting] = min(best.get(setting, float("inf")), time.perf_counter() - t)
                finally:
                    hf.heap_kept = kept
        fp32 = scores["fp32 flash, heap kept"]
        for setting, (dtype, kernel, heap) in settings.items():
            diff = np.abs(scores[setting] - fp32)
            rows.append({"model": name, "shots": k, "prefix_tokens": len(prefix), "queries": queries,
                         "setting": setting, "dtype": dtype, "kernel": kernel, "heap_kept": heap,
                         "seconds": round(best[setting], 3), "queries_per_s": round(queries / best[setting], 1),
                         "gflop_per_s": round(flops / best[setting] / 1e9, 1), "peak_gflop_per_s": peaks[dtype],
                         "of_flop_limit": round(flops / best[setting] / 1e9 / peaks[dtype], 3),
                         "max_abs_diff_to_fp32": float(diff.max()), "mean_abs_diff_to_fp32": float(diff.mean())})
    for e in engines.values():
        e.close()
    return rows


def markdown(rows: list[dict], cpu: str, threads: int, native_bf16: bool = True) -> str:
    """The table; where the CPU emulates bf16 its bf16 rows get no share of a FLOP limit (the emulated 2048³ rate
    says nothing of the model's shapes: 0.3 GFLOP/s there against 18-31 in the engine, on an AVX2 CPU)."""
    out = [f"### Prefix attention kernels and heap policy, {time.strftime('%Y-%m-%d')} ({cpu}, {threads} threads)",
           "", "Best of the interleaved rounds per setting, one process; of FLOP limit: matmul FLOPs / wall time / "
           "the matmul peak in the setting's dtype measured in this process; diffs: log-probs against the fp32 "
           "engine's (flash, heap kept).", "",
           "| model | K (prefix) | setting | q/s | of FLOP limit | x first setting of its dtype | max / mean abs diff "
           "to fp32 |", "|---|---|---|---:|---:|---:|---|"]
    first: dict[tuple, float] = {}
    for r in rows:
        key = (r["model"], r["shots"], r["dtype"])
        first.setdefault(key, r["queries_per_s"])
        limit = (f"{r['of_flop_limit']:.2f} of {r['peak_gflop_per_s']}" if native_bf16 or r["dtype"] == "float32"
                 else "– (bf16 emulated)")
        out.append(f"| {r['model']} | {r['shots']} ({r['prefix_tokens']}) | {r['setting']} | {r['queries_per_s']} | "
                   f"{limit} | {r['queries_per_s'] / first[key]:.2f} | "
                   f"{r['max_abs_diff_to_fp32']:.3f} / {r['mean_abs_diff_to_fp32']:.4f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--shots", default="10,200")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--token-budget", type=int, default=1024)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="the settings of these dtypes only (float32 alone where the CPU emulates bf16)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "prefix_kernels")
    args = parser.parse_args()
    import torch

    from iclsft.bench.flops import matmul_peak
    from iclsft.bench.machine import cpu_description
    from iclsft.cpu import bf16_flags, cpu_flags

    dtypes = args.dtypes.split(",")
    if "float32" not in dtypes or not set(dtypes) <= {"float32", "bfloat16"}:
        parser.error(f"--dtypes {args.dtypes!r}: give float32 or float32,bfloat16 (the diffs are to the fp32 scores)")
    settings = {name: s for name, s in SETTINGS.items() if s[0] in dtypes}
    cpu = f"{cpu_description()}, torch {torch.__version__}"
    peaks = {d: round(matmul_peak(d), 1) for d in dtypes}
    rows = [r for m in args.models.split(",")
            for r in one_model(m, [int(k) for k in args.shots.split(",")], args.queries, args.rounds,
                               args.token_budget, peaks, settings)]
    after = {d: round(matmul_peak(d), 1) for d in dtypes}  # the peak at the end too: the best
    for r in rows:
        r["peak_gflop_per_s"] = max(peaks[r["dtype"]], after[r["dtype"]])
        r["of_flop_limit"] = round(r["gflop_per_s"] / r["peak_gflop_per_s"], 3)
    args.out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "threads": torch.get_num_threads(),
                                                        "rows": rows}, indent=1) + "\n")
    table = markdown(rows, cpu, torch.get_num_threads(), bool(bf16_flags(cpu_flags())))
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
