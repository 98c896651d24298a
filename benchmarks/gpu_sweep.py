"""The prepared GPU check of issue 16: a reduced paper sweep through the work graph on one GPU.

SmolLM2-135M's shape with random weights (throughput does not depend on the weights), its real
tokenizer, the hf engine in bf16, ICL + LoRA + full fine-tunes with RSA, all on one GPU shared by
fractions: one scorer actor on half of it, trainings packed four to the other half. Records wall
time, per-role busy time and utilisation (OUT/graph.json of the sweep), engine starts, and per-stage
seconds (ICL scoring, SFT scoring, training, RSA) summed from the run's records. About 5 minutes on an
H100-class GPU; `--smoke` runs a tiny shape on CPU to check the script itself.

    python benchmarks/gpu_sweep.py --assets DIR --out OUT   # DIR: SmolLM2's config.json + tokenizer files
    cp OUT/gpu_sweep.json docs/benchmarks/                  # and note the numbers in docs/benchmarks/README
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build_model(assets: Path, out: Path, smoke: bool) -> Path:
    """A random model of SmolLM2's shape (or a tiny one), saved with the real tokenizer."""
    config = AutoConfig.from_pretrained(assets)
    if smoke:
        for k, v in TINY.items():
            setattr(config, k, v)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if not smoke else torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(assets).save_pretrained(out)
    return out


def sweep_config(out: Path, model: Path, smoke: bool) -> dict:
    gpu = not smoke
    return {
        "out": str(out), "models": [str(model)],
        "tasks": [{"name": "linear2d", "angles": [0, 45, 90] if gpu else [45]}],
        "methods": ["icl", "lora", "full"], "shots": [1, 10, 100] if gpu else [1, 2], "seeds": [0, 1] if gpu else [0],
        "orders": ["random", "1221"], "checkpoints": [0.5, 1.0], "grid_step": 1 if gpu else 25,
        "dtype": "bfloat16" if gpu else "float32", "engine": "hf",
        "sft": {"lora": {}, "full": {}} if gpu else {"lora": {"min_steps": 2, "epochs": 1},
                                                     "full": {"min_steps": 2, "epochs": 1}},
        "rsa": True, "report": False, "drop_full_weights": True,
        "resources": ({"scorers": 1, "scorer_gpus": 0.5, "scorer_cpus": 4, "trainer_gpus": 0.125, "trainer_cpus": 2}
                      if gpu else {"scorers": 1}),
    }


def stages(run: Path) -> dict:
    """Seconds per stage, summed from the run's own records."""
    out = {"icl_scoring_s": 0.0, "sft_scoring_s": 0.0, "training_s": 0.0, "rsa_s": 0.0}
    for rec in run.glob("conditions/*/record.json"):
        r = json.loads(rec.read_text())
        if r.get("status") == "ok":
            out["sft_scoring_s" if r.get("checkpoint_dir") else "icl_scoring_s"] += r.get("seconds", 0.0)
        rsa = rec.parent / "rsa.json"
        if rsa.is_file():
            out["rsa_s"] += json.loads(rsa.read_text()).get("seconds", 0.0)
    for marker in run.glob("adapters/*/iclsft-adapter.json"):
        out["training_s"] += json.loads(marker.read_text()).get("seconds", 0.0) or 0.0
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", type=Path, required=True, help="SmolLM2's config.json and tokenizer files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on CPU: checks the script, measures nothing")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke")
    import ray

    from iclsft.sweep import run_sweep
    from iclsft.sweep.config import SweepConfig

    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ICLSFT_HOME", str(args.out / "home"))
    model = build_model(args.assets, args.out / "model", args.smoke)
    run_out = args.out / "sweep"
    shutil.rmtree(run_out, ignore_errors=True)
    config = SweepConfig(**sweep_config(run_out, model, args.smoke))
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"ICLSFT_HOME": os.environ["ICLSFT_HOME"]}})
    t0 = time.perf_counter()
    try:
        run_sweep(config, progress=False)
    finally:
        wall = time.perf_counter() - t0
        ray.shutdown()
    run = next(p for p in run_out.iterdir() if (p / "metrics.parquet").is_file())
    graph = json.loads((run_out / "graph.json").read_text())
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)",
              "cpus": os.cpu_count(), "config": json.loads(config.model_dump_json()), "wall_s": round(wall, 1),
              "conditions": sum(1 for _ in run.glob("conditions/*/record.json")), "stages": stages(run),
              "graph": graph}
    (args.out / "gpu_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    u = graph["usage"]
    print(f"{result['device']}: {result['conditions']} conditions in {wall:.0f} s; "
          + ", ".join(f"{role} {r['works']} works {100 * r['utilisation']:.0f}% busy" for role, r in u.items())
          + f"; {graph['engine_starts']} engine starts; stages {result['stages']}")


if __name__ == "__main__":
    main()
