"""The sweep scheduler on timed stand-ins (`sweep --simulate`) for a config at several GPU counts, per
scoring engine: makespan, total work / workers, utilisation per role, engine starts. Seconds on a CPU;
no model is loaded (the model's config only, for checkpoint sizes).

    python benchmarks/simulation.py --config configs/paper-linear2d.yaml --gpus 1,8,64 \\
        --out docs/benchmarks/simulation.json

The rates behind every duration are written beside the rows (iclsft/graph/costs.py); the issue's target
(issue 16): at 8 GPUs at least 85% busy and a makespan within 1.2x of total work / workers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from iclsft.graph.costs import RATES
from iclsft.graph.simulate import simulate
from iclsft.sweep import load_config
from iclsft.sweep.plan import parse_gpus, simulation_works

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper-linear2d.yaml")
    parser.add_argument("--gpus", default="1,8,64")
    parser.add_argument("--engines", default="hf,vllm", help="scoring engines to simulate, comma-separated")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    gpus = parse_gpus(args.gpus)
    config = load_config(ROOT / args.config)
    rows = []
    for engine in args.engines.split(","):
        began = time.perf_counter()
        works = simulation_works(config, "gpu", engine)
        built = time.perf_counter() - began
        for g in gpus:
            began = time.perf_counter()
            sim = simulate(config, works, gpus=g)
            row = {"engine": engine, **sim.record(), "ratio": round(sim.makespan / sim.bound, 3),
                   "works": len(works), "build_seconds": round(built, 2),
                   "simulate_seconds": round(time.perf_counter() - began, 3)}
            rows.append(row)
            roles = row["usage"]
            print(f"{engine:>5} {g:>4g} GPUs: {row['scorers']} scorers, {row['trainers']} trainers; makespan "
                  f"{sim.makespan / 60:.1f} min, work/workers {sim.bound / 60:.1f} min (x{row['ratio']:.2f}), "
                  f"{100 * sim.utilisation:.0f}% busy (scorers {100 * roles['scorer']['utilisation']:.0f}%, "
                  f"trainers {100 * roles['trainer']['utilisation']:.0f}%), {sim.engine_starts} engine starts")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "rates": RATES["gpu"], "rows": rows}, indent=1)
                                  + "\n")


if __name__ == "__main__":
    main()
