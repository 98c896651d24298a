"""The `vllm` engine vs the `hf` engine on the same work, side by side in one process.

Same model, dtype, ICL prompts and queries; then the same LoRA adapter (random weights: they do
not change the cost) scored zero-shot on the same queries. Each engine is warmed up on a few
queries first (vLLM compiles on its first start; the start is reported apart). The two engines'
log-probs are compared on every query before their times count.

    python benchmarks/vllm_vs_hf.py                          # K = 10, 100; 500 queries; vLLM block size
                                                             # default and 32; writes docs/benchmarks/
    python benchmarks/vllm_vs_hf.py --queries 2000 --shots 10,100,200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def random_adapter(model_path: Path, out: Path, rank: int) -> Path:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                              init_lora_weights=False)).save_pretrained(out)
    return out


def timed(engine, prefix, queries, labels, adapter=None) -> tuple[np.ndarray, float]:
    engine.score(prefix, queries[:8], labels, adapter=adapter)  # warm-up: caches, kernels, adapter load
    t = time.perf_counter()
    scores = engine.score(prefix, queries, labels, adapter=adapter)
    return scores, time.perf_counter() - t


def run(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from iclsft.engine.hf import HFEngine
    from iclsft.engine.vllm_engine import VLLMEngine
    from iclsft.models import load_model, resolve_model
    from iclsft.prompts import PromptBuilder
    from iclsft.spec import TaskSpec, TemplateSpec
    from iclsft.tasks import linear2d

    ref = resolve_model(args.model)
    task = TaskSpec(angle=args.angle)
    grid = linear2d.queries(task)
    chosen = np.sort(np.random.default_rng(0).choice(len(grid), size=args.queries, replace=False))
    builder = PromptBuilder(AutoTokenizer.from_pretrained(ref.path), TemplateSpec(), task.labels)
    queries = builder.queries(grid.n1.values[chosen], grid.n2.values[chosen])
    labels = builder.label_ids
    adapter = str(random_adapter(ref.path, Path(tempfile.mkdtemp()) / "adapter", args.lora_rank))

    hf = HFEngine(load_model(ref, args.dtype)[0], progress=False)
    results = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "model": args.model, "dtype": args.dtype,
               "queries": args.queries, "vllm_start_seconds": {}, "rows": []}
    work = []
    for k in args.shots:
        ex = linear2d.exemplars(task, 0, k)
        work.append((f"ICL K={k}", builder.prefix(ex.n1, ex.n2, ex.truth), None))
    work.append((f"adapter r={args.lora_rank}", builder.start(), adapter))
    hf_runs = [timed(hf, prefix, queries, labels, which) for _, prefix, which in work]
    for block in args.block_sizes:
        t = time.perf_counter()
        vllm = VLLMEngine(ref.path, dtype=args.dtype, lora_rank=args.lora_rank, block_size=block, progress=False)
        config = f"block {block or 'default'}"
        results["vllm_start_seconds"][config] = round(time.perf_counter() - t, 1)
        for (name, prefix, which), (hf_scores, hf_seconds) in zip(work, hf_runs):
            vllm_scores, vllm_seconds = timed(vllm, prefix, queries, labels, which)
            row = {"work": name, "vllm": config, "prefix_tokens": len(prefix), "hf_qps": len(queries) / hf_seconds,
                   "vllm_qps": len(queries) / vllm_seconds, "hf_over_vllm": vllm_seconds / hf_seconds,
                   "max_abs_diff": float(np.abs(hf_scores - vllm_scores).max()),
                   "vllm_cached_fraction": vllm.last_stats["cached_tokens"] / vllm.last_stats["prompt_tokens"]}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        vllm.close()
    return results


def markdown(results: dict) -> str:
    lines = [
        f"### vllm vs hf engine, {results['date']} ({results['model']}, {results['dtype']}, "
        f"{results['cpus']} CPUs, CUDA {results['cuda']}, {results['queries']} queries of the 10k grid)",
        "",
        "vLLM engine start (compile, KV cache), not counted below: "
        + ", ".join(f"{k} {v} s" for k, v in results["vllm_start_seconds"].items()) + ".",
        "",
        "| work | vllm config | prefix tokens | hf queries/s | vllm queries/s | hf / vllm speed | vllm prompt tokens "
        "from cache | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['work']} | {r['vllm']} | {r['prefix_tokens']} | {r['hf_qps']:.1f} | {r['vllm_qps']:.1f} | "
                     f"{r['hf_over_vllm']:.1f}x | {r['vllm_cached_fraction']:.0%} | {r['max_abs_diff']:.1e} |")
    lines += ["", "Max abs diff: between the two engines' label log-probs (nats), over every query. vLLM on CPU "
              "binds its model worker to all cores but one (the other is left to its scheduler)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--angle", type=float, default=90.0)
    parser.add_argument("--shots", default="10,100", help="comma-separated K per class")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--block-sizes", default="default,32",
                        help="vLLM KV block sizes to try (prefix-cache granularity; CPU default 128, GPU 16)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--table-only", action="store_true", help="Rewrite the markdown from the JSON only.")
    args = parser.parse_args()
    if args.table_only:
        for path in args.out.glob("vllm_vs_hf*.json"):
            path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return
    args.shots = [int(k) for k in args.shots.split(",")]
    args.block_sizes = [None if b == "default" else int(b) for b in args.block_sizes.split(",")]
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_gpu" if results["cuda"] else ""
    (args.out / f"vllm_vs_hf{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / f"vllm_vs_hf{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
