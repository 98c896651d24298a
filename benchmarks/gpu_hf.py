"""The `hf` engine on a GPU: correctness against the naive loop, and throughput on the full grid.

Weights do not change throughput, so models are randomly initialised from a config: the default
model's own config (SmolLM2-135M) and a Llama-3-8B-shaped config. Prompts use the real SmolLM2
tokenizer. Run on a machine with CUDA:

    python benchmarks/gpu_hf.py --assets DIR --out OUT   # DIR holds config.json + tokenizer files
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from iclsft.artifacts import atomic_write_json
from iclsft.engine.hf import HFEngine, pack
from iclsft.engine.reference import naive_score
from iclsft.prompts import PromptBuilder
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks import linear2d

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)


def build(config, dtype: torch.dtype):
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(old)
    return model.eval()


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--assets", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shots", default="10,100,200")
    p.add_argument("--budgets", default="2048,8192")
    p.add_argument("--big", action="store_true", help="also the 8B-shaped model")
    p.add_argument("--checks-only", action="store_true", help="only the correctness checks")
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.assets)
    task = TaskSpec(angle=90)
    builder = PromptBuilder(tok, TemplateSpec(), task.labels)
    grid = linear2d.queries(task)
    queries = builder.queries(grid.n1, grid.n2)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "checks": []}
    small = AutoConfig.from_pretrained(args.assets)
    configs = {"smollm2-135m (random init)": small}
    if args.big:
        configs["llama3-8b-shape (random init)"] = LlamaConfig(**LLAMA3_8B)

    # correctness on the GPU: packed vs naive fp32, at the config's init scale and at a large one
    # (large weights make log-probs vary a lot between queries, so a wrong mask would show)
    ex = linear2d.exemplars(task, 0, 20)
    prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
    sample = [queries[i] for i in np.random.default_rng(0).choice(len(queries), 40, replace=False)]
    for init in (small.initializer_range, 0.2):
        config = small.__class__.from_dict({**small.to_dict(), "initializer_range": init})
        model32 = build(config, torch.float32)
        ref = naive_score(model32, prefix, sample, builder.label_ids)
        for dtype in (torch.float32, torch.bfloat16):
            model = model32 if dtype == torch.float32 else build(config, dtype)
            got = HFEngine(model, token_budget=256, progress=False).score(prefix, sample, builder.label_ids)
            check = {"init": init, "dtype": str(dtype), "max_abs_err_vs_naive_fp32": float(np.abs(got - ref).max()),
                     "spread_of_values": float(ref.std()), "tf32": torch.backends.cuda.matmul.allow_tf32}
            results["checks"].append(check)
            print(json.dumps(check), flush=True)
        del model32
    if args.checks_only:
        configs = {}

    for name, config in configs.items():
        for dtype in (torch.bfloat16, torch.float32) if "135m" in name else (torch.bfloat16,):
            model = build(config, dtype)
            params = sum(p.numel() for p in model.parameters())
            for k in [int(s) for s in args.shots.split(",")]:
                ex = linear2d.exemplars(task, 0, k)
                prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
                for budget in [int(b) for b in args.budgets.split(",")]:
                    engine = HFEngine(model, token_budget=budget, progress=False)
                    engine.score(prefix, queries[:200], builder.label_ids)  # warm-up
                    engine.clear_prefix_cache()
                    _, seconds = timed(lambda e=engine, p=prefix: e.score(p, queries, builder.label_ids))
                    nodes = sum(len(b) for b in pack(queries, builder.label_ids, budget))
                    row = {"model": name, "params": params, "dtype": str(dtype), "shots": k,
                           "prefix_tokens": len(prefix), "token_budget": budget, "queries": len(queries),
                           "seconds": seconds, "qps": len(queries) / seconds,
                           "approx_tflops": 2 * params * nodes / seconds / 1e12}
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
            del model
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "gpu_hf.json", results)


if __name__ == "__main__":
    main()
