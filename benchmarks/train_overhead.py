"""What a training costs beyond its model's compute: the seconds of `iclsft.sft.train.train` (base model
load, LoRA set-up, steps, checkpoint save) at two step counts, per model, in one process, the best of
`--rounds`; a line fit gives seconds per step and fixed seconds per training. The planner's rates scale
SmolLM2-135M's by compute (iclsft.graph.costs.model_scale); a model far smaller than it still pays the
per-step and per-training overheads measured here (`step_floor`, `load_floor` in RATES).

    python benchmarks/train_overhead.py      # the tiny test Llama and smollm2-135m, LoRA, K=10 at 45°

Writes docs/benchmarks/train_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from sft_bench import linear2d_examples

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_dir(tokenizer_dir: Path, out: Path) -> Path:
    """The tests' tiny Llama (tests/conftest.make_tiny_llama) saved with SmolLM2's tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    make_tiny_llama(len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def timed(path: str, examples, steps: int, method: str, scratch: Path) -> float:
    from iclsft.sft.train import TrainJob, train
    from iclsft.spec import sft_spec

    sft = sft_spec(method, epochs=1, min_steps=steps, batch_size=4)
    out = Path(tempfile.mkdtemp(dir=scratch))
    job = TrainJob(key="bench", base_path=path, examples=examples, sft=sft, seed=0, checkpoints=[(1.0, str(out / "c"))])
    t = time.perf_counter()
    train(job)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="5,25")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "train_overhead.json")
    args = parser.parse_args()
    import torch

    from iclsft.bench.machine import cpu_description
    from iclsft.graph.costs import model_scale, model_shape

    lo, hi = (int(s) for s in args.steps.split(","))
    ref, examples = linear2d_examples("smollm2-135m", 45.0, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        models = {"tiny-llama (tests)": str(tiny_model_dir(ref.path, scratch / "tiny")), "smollm2-135m": str(ref.path)}
        best = {(m, s): float("inf") for m in models for s in (lo, hi)}
        for _ in range(args.rounds):
            for (m, s) in best:
                best[m, s] = min(best[m, s], timed(models[m], examples, s, args.method, scratch))
        for m, path in models.items():
            step = (best[m, hi] - best[m, lo]) / (hi - lo)
            rows.append({"model": m, "method": args.method, "scale": model_scale(model_shape(path)),
                         f"seconds_{lo}_steps": round(best[m, lo], 3), f"seconds_{hi}_steps": round(best[m, hi], 3),
                         "seconds_per_step": round(step, 4), "fixed_seconds": round(best[m, lo] - lo * step, 3)})
    record = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
