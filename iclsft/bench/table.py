"""The benchmark's Markdown table, and its results written as STEM.json and STEM.md."""

from __future__ import annotations

import json
from pathlib import Path

from iclsft.artifacts import atomic_write_bytes
from iclsft.bench.spec import AGREE, METHODS

OURS = ("hf", "hf-mask", "vllm")  # rows that get speed ratios against every other method
NAMES = {"naive": "naive HF loop", "hf": "hf engine (ours)", "hf-mask": "hf engine, masked attention",
         "vllm": "vllm engine (ours)",
         "vllm-plain": "vLLM, plain use", "lm-eval": "lm-eval-style loglikelihood"}


def markdown(results: dict) -> str:
    spec, peaks = results["spec"], results["peak_gflops"]
    methods = [m for m in METHODS if any(r["method"] == m for r in results["rows"])]
    lines = [
        f"### Scoring throughput, {results['date']} ({spec['model']}, {spec['dtype']}, {results['cpus']} CPUs, "
        f"{results['torch_threads']} torch threads, {results['cpu_capability']})",
        "",
        f"Measured in the same run: matmul peak fp32 {peaks['float32']:.1f} GFLOP/s, bf16 {peaks['bfloat16']:.1f} "
        f"GFLOP/s. {results['grid_queries']} grid queries per workload; rows marked * are timed on a sample "
        "of them and extrapolated. × columns: this row's queries/s over that method's. GFLOP/s: model matmul "
        "FLOPs of the forward passes the method ran / wall time (vllm engine: from its token totals, "
        "approximate). FLOP limit: the peak / FLOPs per query of the token tree's unique query tokens (the "
        "prefix, computed once, left out).",
        "",
        "| work | method | queries timed | queries/s | prompt tok/s | computed tok/query | "
        + " | ".join(f"× {NAMES[m]}" for m in methods) + " | GFLOP/s | of peak | of FLOP limit | max abs Δ vs naive |",
        "|" + "---|" * (10 + len(methods)),
    ]
    for r in results["rows"]:
        ratios = " | ".join(_ratio(r["speedup"][m]) if r["method"] in OURS and m in r["speedup"] else ""
                            for m in methods)
        diff = r["max_abs_diff_vs_naive"]
        diff = "" if diff is None or r["method"] == "naive" else f"{diff:.1e}" + (
            "" if diff <= AGREE[spec["dtype"]] else " (disagrees!)")
        timed = f"{r['queries_timed']}{'*' if r['extrapolated'] else ''}" + (
            f" × {r['adapters']} adapters" if r["adapters"] else "")
        lines.append(
            f"| {r['work']} (P={r['prefix_tokens']}) | {NAMES[r['method']]} | {timed} | {r['qps']:.2f} | "
            f"{r['prompt_tokens_per_s']:.0f} | {r['computed_tokens_per_query']:.1f} | {ratios} | {r['gflops']:.1f} | "
            f"{r['fraction_of_peak']:.0%} | {r['fraction_of_flop_limit']:.0%} | {diff} |")
    limits = {r["work"]: r["flop_limit_qps"] for r in results["rows"]}
    lines += ["", "FLOP limit (queries/s): " + ", ".join(f"{w} {v:.0f}" for w, v in limits.items()) + "."]
    if results.get("vllm_start_seconds"):
        lines.append("vLLM engine start (not counted): " + ", ".join(
            f"{m} {s:.0f} s" for m, s in results["vllm_start_seconds"].items()) + ".")
    if results.get("vllm_block_size"):
        lines.append("vLLM KV cache block (prefix-cache granularity, tokens): " + ", ".join(
            f"{m} {b}" for m, b in results["vllm_block_size"].items()) + ".")
    return "\n".join(lines) + "\n"


def _ratio(x: float) -> str:
    return f"{x:.0f}×" if x >= 10 else f"{x:.1f}×" if x >= 1 else f"{x:.2g}×"


def write_results(results: dict, stem: str | Path) -> tuple[Path, Path]:
    """`stem`.json and `stem`.md, each written atomically."""
    stem = Path(stem)
    paths = stem.with_suffix(".json"), stem.with_suffix(".md")
    atomic_write_bytes(paths[0], (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(paths[1], markdown(results).encode())
    return paths
