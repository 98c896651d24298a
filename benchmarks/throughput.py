"""Scoring throughput: our engines against a naive HF loop, plain vLLM and lm-eval-style scoring.

One process, one model, the same queries for every method (iclsft/bench/__init__.py says what each
method is and how it is counted). Writes STEM.json and STEM.md.

    python benchmarks/throughput.py                       # full: 10,000 queries, K = 10,100,200, 3 adapters
    python benchmarks/throughput.py --queries 200 --shots 10 --adapters 1 --out /tmp/tp   # a quick check
    python benchmarks/throughput.py --table-only          # rewrite STEM.md from STEM.json

The environment is left as it is and recorded (OMP_WAIT_POLICY among it). On a machine that other
processes share, libgomp's default spin-waiting made two torch threads 3.4x slower than
OMP_WAIT_POLICY=PASSIVE; on a quiet one PASSIVE cost about 12% (docs/findings.md).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from iclsft.artifacts import atomic_write_bytes
    from iclsft.bench import METHODS, BenchSpec, markdown, run_bench, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=10_000, help="grid queries per workload (10000: the full grid)")
    parser.add_argument("--shots", default="10,100,200", help="ICL shot counts K (per class), comma-separated")
    parser.add_argument("--adapters", type=int, default=3, help="random LoRA adapters to score (0: none)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--competitors", default=",".join(METHODS), help=f"methods, from {','.join(METHODS)}")
    parser.add_argument("--naive-sample", type=int, default=4, help="queries timed for naive and lm-eval")
    parser.add_argument("--vllm-sample", type=int, default=32, help="queries timed for vllm and vllm-plain")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--token-budget", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vllm-block-size", type=int, default=None,
                        help="our vllm engine's KV block size (prefix-cache granularity; default: 32 on CPU, "
                             "vLLM's on GPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "throughput",
                        help="output stem: writes STEM.json and STEM.md")
    parser.add_argument("--table-only", action="store_true", help="rewrite STEM.md from STEM.json")
    args = parser.parse_args()
    if args.table_only:
        table = markdown(json.loads(args.out.with_suffix(".json").read_text()))
        atomic_write_bytes(args.out.with_suffix(".md"), table.encode())
        return
    spec = BenchSpec(model=args.model, queries=args.queries, shots=tuple(int(k) for k in args.shots.split(",") if k),
                     adapters=args.adapters, lora_rank=args.lora_rank,
                     methods=tuple(m.strip() for m in args.competitors.split(",") if m.strip()),
                     naive_sample=args.naive_sample, vllm_sample=args.vllm_sample, dtype=args.dtype,
                     token_budget=args.token_budget, threads=args.threads, vllm_block_size=args.vllm_block_size)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the run's progress lines
    results = run_bench(spec)
    paths = write_results(results, args.out)
    print(markdown(results))
    print("wrote", *paths)


if __name__ == "__main__":  # vLLM starts its engine core in a spawned process that re-imports this file
    main()
