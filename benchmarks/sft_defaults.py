"""Choose SFT defaults: a small sweep on the default model, with ICL at the same K for reference.

    python benchmarks/sft_defaults.py            # writes docs/benchmarks/sft_defaults.{json,md}

Each configuration trains LoRA (or a full fine-tune) at θ=90° and the listed K on the exemplar
stream of seed 0 and scores a step-5 sub-lattice (400 queries); trainings run in-process one after
another so their wall times are comparable.
"""

from __future__ import annotations

import argparse
import logging
import time
from datetime import date
from pathlib import Path

import pandas as pd

from iclsft.arms import make_icl_spec, make_sft_spec
from iclsft.artifacts import atomic_write_bytes
from iclsft.graph.driver import run_spec
from iclsft.spec import ExecutorSpec, SftSpec
from iclsft.store import RunDir

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["accuracy", "holdout_accuracy", "auc", "cal_accuracy", "confidence", "label_mass", "inferred_angle"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--angle", type=float, default=90.0)
    p.add_argument("--shots", default="10,50")
    p.add_argument("--grid-step", type=int, default=5)
    p.add_argument("--configs", default="lora:3e-4:5:0,lora:1e-3:5:0,lora:3e-3:5:0,lora:1e-3:5:60,lora:3e-3:5:60",
                   help="method:lr:epochs:min_steps, comma-separated")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "sft-sweep")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the runs' progress lines
    shots = tuple(int(k) for k in args.shots.split(","))
    rows = []
    spec, ref = make_icl_spec(angles=(args.angle,), shots=shots, grid_step=args.grid_step)
    icl = run_spec(spec, args.work / "icl", ref, progress=False)
    for _, r in icl.iterrows():
        rows.append({"config": "icl", "shots": r.shots, "train_s": 0.0, **{c: r[c] for c in COLUMNS}})
    for config in args.configs.split(","):
        method, lr, epochs, min_steps = config.split(":")
        sft = SftSpec(method=method, lr=float(lr), epochs=int(epochs), min_steps=int(min_steps))
        spec, ref = make_sft_spec(angles=(args.angle,), shots=shots, grid_step=args.grid_step, sft=sft,
                                  executor=ExecutorSpec(name="local"))
        t = time.time()
        work = args.work / config.replace(":", "_")
        run_spec(spec, work, ref, progress=False)
        seconds = time.time() - t
        for _, _, rec in RunDir(work).finished():
            if rec["checkpoint"] != 1.0:
                continue
            rows.append({"config": config, "shots": rec["shots"], "train_s": rec.get("train_seconds") or 0.0,
                         "steps": rec.get("train_steps"), "final_loss": rec.get("final_loss"),
                         **{c: rec["metrics"][c] for c in COLUMNS}})
        print(f"{config}: {seconds:.0f} s", flush=True)
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "sft_defaults.json", frame.to_json(orient="records", indent=2).encode())
    md = [f"### SFT defaults sweep, {date.today().isoformat()} (smollm2-135m, θ={args.angle:g}°, seed 0, "
          f"step-{args.grid_step} lattice)", "", frame.to_markdown(index=False, floatfmt=".3f")]
    atomic_write_bytes(args.out / "sft_defaults.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))


if __name__ == "__main__":
    main()
