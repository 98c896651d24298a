"""GPU check for issue 17 (one script, a few minutes on one large GPU): training at scale and scoring
for two model shapes with the `hf` engine.

- SmolLM2-135M shape: LoRA and full fine-tuning steps in bf16-mixed (fp32 master weights, bf16
  autocast) and in fp32 for the ratio, on the real training examples of one condition (θ=90°, K=10);
- Llama-3-8B shape: LoRA steps in bf16-mixed, with and without gradient checkpointing;
- both shapes: the full 10,000-query grid scored at K=10 and K=200 in bf16 with the engine's token
  budget chosen for the device, and, for the small shape, packed-vs-naive agreement in fp32.

Weights do not change speed, so models are randomly initialised from their configs (as
benchmarks/gpu_hf.py does); prompts use the real SmolLM2 tokenizer. Nothing here reaches a hub.

    python benchmarks/gpu_models.py --make-assets benchmarks/assets    # here: SmolLM2 config + tokenizer
    python benchmarks/gpu_models.py --assets benchmarks/assets --out OUT    # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from gpu_hf import LLAMA3_8B, build, timed  # same folder: the random-model builder and CUDA timing
from transformers import AutoConfig, AutoTokenizer, LlamaConfig

from iclsft.arms.linear2d import training_examples
from iclsft.artifacts import atomic_write_json
from iclsft.engine.hf import HFEngine
from iclsft.engine.reference import naive_score
from iclsft.prompts import PromptBuilder
from iclsft.sft.train import batch_indices, batch_loss, make_trainable
from iclsft.spec import TaskSpec, TemplateSpec, sft_spec
from iclsft.tasks import linear2d

ASSET_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_assets(dest: Path) -> None:
    """Copy the default model's config and tokenizer files (no weights: a few MB to carry)."""
    from iclsft.models import resolve_model

    src = Path(resolve_model("smollm2-135m").path)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    print(f"assets in {dest}: {sorted(p.name for p in dest.iterdir())}")


def train_steps(config, method: str, precision: str, examples: list, steps: int,
                checkpointing: bool = False) -> dict:
    """Median step time (after 2 warm-up steps), first/last loss and peak memory of `steps` AdamW steps."""
    torch.cuda.empty_cache()  # the previous shape's model went with its frame
    torch.cuda.reset_peak_memory_stats()
    sft = sft_spec(method, precision=precision, gradient_checkpointing=checkpointing)
    model = make_trainable(build(config, torch.float32), sft)  # fp32 master weights, as the trainer keeps
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sft.lr)
    times, losses = [], []
    for step in range(steps + 2):
        batch = [examples[i] for i in batch_indices(step, len(examples), sft.batch_size)]

        def one_step(batch=batch):
            loss = batch_loss(model, batch, 0, "label", precision)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, sft.max_grad_norm)
            opt.step()
            return float(loss)

        loss, seconds = timed(one_step)
        losses.append(loss)
        times.append(seconds)
    row = {"method": method, "precision": precision, "gradient_checkpointing": checkpointing,
           "batch_size": sft.batch_size, "trainable_params": sum(p.numel() for p in params),
           "step_s": statistics.median(times[2:]), "loss_first": losses[0], "loss_last": losses[-1],
           "finite": bool(np.isfinite(losses).all()), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return row  # the model and optimizer go with this frame; the next build reuses their memory


def score_grid(config, builder: PromptBuilder, task: TaskSpec, shots: list[int]) -> list[dict]:
    model = build(config, torch.bfloat16)
    grid = linear2d.queries(task)
    rows = []
    for k in shots:
        ex = linear2d.exemplars(task, 0, k)
        prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
        queries = builder.queries_after(prefix, grid.n1, grid.n2)
        engine = HFEngine(model, progress=False)  # token budget chosen for the device
        engine.score(prefix, queries[:200], builder.label_ids)  # warm-up (kernels, allocator)
        engine.clear_prefix_cache()  # time the prefix too
        lp, seconds = timed(lambda e=engine, p=prefix, q=queries: e.score(p, q, builder.label_ids))
        rows.append({"shots": k, "prefix_tokens": len(prefix), "queries": len(queries), "seconds": seconds,
                     "qps": len(queries) / seconds, "token_budget": engine.token_budget,
                     "finite": bool(np.isfinite(lp).all())})
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make-assets", type=Path, help="write the config + tokenizer files here and stop")
    p.add_argument("--assets", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip-8b", action="store_true")
    args = p.parse_args()
    if args.make_assets:
        return make_assets(args.make_assets)
    if not (args.assets and args.out):
        p.error("--assets and --out are needed (or --make-assets DIR)")
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA device")
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.assets)
    task = TaskSpec(angle=90.0)
    builder = PromptBuilder(tok, TemplateSpec(), task.labels)
    examples = training_examples(builder, linear2d.exemplars(task, 0, 10))
    small = AutoConfig.from_pretrained(args.assets)
    shapes = {"smollm2-135m shape": small}
    if not args.skip_8b:
        shapes["llama3-8b shape"] = LlamaConfig(**LLAMA3_8B)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "training": [], "scoring": [],
           "checks": []}

    # correctness first: packed engine vs a naive per-query forward, fp32, small shape
    model = build(small, torch.float32)
    ex = linear2d.exemplars(task, 0, 10)
    prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
    sample = builder.queries_after(prefix, list(range(0, 100, 7)), list(range(3, 100, 7)))
    got = HFEngine(model, progress=False).score(prefix, sample, builder.label_ids)
    ref = naive_score(model, prefix, sample, builder.label_ids)
    out["checks"].append({"what": "hf engine vs naive, fp32, K=10", "max_abs_diff": float(np.abs(got - ref).max())})
    print(json.dumps(out["checks"][-1]), flush=True)
    del model

    for method in ("lora", "full"):
        for precision in ("bf16-mixed", "fp32"):
            row = {"shape": "smollm2-135m shape", **train_steps(small, method, precision, examples, args.steps)}
            out["training"].append(row)
            print(json.dumps(row), flush=True)
    if not args.skip_8b:
        for checkpointing in (False, True):
            row = {"shape": "llama3-8b shape", **train_steps(LlamaConfig(**LLAMA3_8B), "lora", "bf16-mixed", examples,
                                                             max(3, args.steps // 3), checkpointing)}
            out["training"].append(row)
            print(json.dumps(row), flush=True)
    for name, config in shapes.items():
        for row in score_grid(config, builder, task, [10, 200]):
            out["scoring"].append({"shape": name, "dtype": "bfloat16", **row})
            print(json.dumps(out["scoring"][-1]), flush=True)
    out["seconds_total"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "gpu_models.json", out)
    print(f"wrote {args.out / 'gpu_models.json'} in {out['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
