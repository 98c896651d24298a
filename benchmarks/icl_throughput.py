"""ICL scoring throughput: a naive per-query HF forward loop vs the packed `hf` engine, side by side.

Same model, same prompts, same queries, one process. The naive loop is timed on a sample and
extrapolated (it is ~100x slower); the engines score the whole query set. Every engine result is
checked against the naive values on the sampled queries before its time counts.

    python benchmarks/icl_throughput.py                # K = 10, 100; 2,000 queries; writes docs/benchmarks/
    python benchmarks/icl_throughput.py --queries 10000 --shots 10,100,200
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from iclsft.engine.hf import HFEngine, pack
from iclsft.engine.reference import naive_score
from iclsft.models import load_model, resolve_model
from iclsft.prompts import PromptBuilder
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks import linear2d

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    """Measured GFLOP/s of a square matmul: the machine's practical limit for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - t) / 1e9


def model_flops(model, nodes: int, head_rows: int, prefix_len: int, mean_depth: float) -> float:
    """Forward FLOPs of the packed work: linear layers per node, label-row head, attention reads."""
    cfg = model.config
    embed = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for p in model.parameters()) - embed  # tied head counted once below
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (prefix_len + mean_depth)
    return nodes * (2 * body + attention) + head_rows * 2 * embed


def run(args) -> dict:
    ref = resolve_model(args.model)
    task = TaskSpec(angle=args.angle)
    queries = linear2d.queries(task)
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(queries), size=args.queries, replace=False))
    sample = rng.choice(len(chosen), size=args.naive_sample, replace=False)
    results = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "model": args.model, "queries": args.queries,
               "naive_sample": args.naive_sample, "token_budget": args.token_budget,
               "peak_gflops": {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)},
               "rows": []}
    models = {dtype: load_model(ref, dtype)[0] for dtype in args.dtypes}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    builder = PromptBuilder(tokenizer, TemplateSpec(), task.labels)
    query_ids = builder.queries(queries.n1.values[chosen], queries.n2.values[chosen])
    sample_ids = [query_ids[i] for i in sample]
    for k in args.shots:
        ex = linear2d.exemplars(task, 0, k)
        prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
        t = time.perf_counter()
        reference = naive_score(models.get("float32") or next(iter(models.values())), prefix, sample_ids,
                                builder.label_ids)
        naive_qps = len(sample_ids) / (time.perf_counter() - t)
        results["rows"].append({"engine": "naive HF loop (extrapolated)", "dtype": "float32", "shots": k,
                                "prefix_tokens": len(prefix), "qps": naive_qps, "seconds_10k": 10_000 / naive_qps})
        for dtype, model in models.items():
            engine = HFEngine(model, token_budget=args.token_budget, progress=False)
            engine.prefix_kv(prefix)  # warm-up; the prefix is computed once per K in real runs too
            engine.score(prefix, sample_ids, builder.label_ids)
            t0 = time.perf_counter()
            engine._prefix_kv.clear()
            scores = engine.score(prefix, query_ids, builder.label_ids)
            seconds = time.perf_counter() - t0
            err = float(np.abs(scores[sample] - reference).max())
            batches = pack(query_ids, builder.label_ids, args.token_budget)
            nodes = sum(len(b) for b in batches)
            rows = sum(len({r for _, pl in b.reads for pairs in pl for r, _ in pairs}) for b in batches)
            depth = float(np.mean([d for b in batches for d in b.depth]))
            flops = model_flops(model, nodes, rows, len(prefix), depth)
            results["rows"].append({
                "engine": "hf packed", "dtype": dtype, "shots": k, "prefix_tokens": len(prefix),
                "qps": len(query_ids) / seconds, "seconds_10k": seconds * 10_000 / len(query_ids),
                "speedup_vs_naive": len(query_ids) / seconds / naive_qps, "nodes_per_query": nodes / len(query_ids),
                "gflops": flops / seconds / 1e9, "max_abs_err_vs_naive_fp32": err,
            })
            print(json.dumps(results["rows"][-1]), flush=True)
    return results


def markdown(results: dict) -> str:
    peak = results["peak_gflops"]
    lines = [
        f"### ICL scoring throughput, {results['date']} ({results['model']}, {results['threads']} threads, "
        f"{results['queries']} queries, token budget {results['token_budget']})",
        "",
        f"Measured matmul peak: fp32 {peak['float32']:.1f} GFLOP/s, bf16 {peak['bfloat16']:.1f} GFLOP/s. "
        f"Naive loop timed on {results['naive_sample']} queries and extrapolated.",
        "",
        "| engine | dtype | K | prefix tokens | queries/s | 10k grid (s) | vs naive | nodes/query | GFLOP/s "
        "| max abs err vs naive fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['engine']} | {r['dtype']} | {r['shots']} | {r['prefix_tokens']} | {r['qps']:.1f} | "
            f"{r['seconds_10k']:.0f} | {r.get('speedup_vs_naive', 1):.0f}x | "
            f"{r.get('nodes_per_query', float('nan')):.2f} | "
            f"{r.get('gflops', float('nan')):.0f} | {r.get('max_abs_err_vs_naive_fp32', 0):.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--angle", type=float, default=90.0)
    parser.add_argument("--shots", default="10,100", help="comma-separated K per class")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--naive-sample", type=int, default=10)
    parser.add_argument("--dtypes", default="float32",
                        help="e.g. float32,bfloat16 (bf16 is slow on CPUs without AVX512-BF16/AMX)")
    parser.add_argument("--token-budget", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    args.shots = [int(k) for k in args.shots.split(",")]
    args.dtypes = args.dtypes.split(",")
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "icl_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "icl_throughput.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
