"""A sweep's plan: the arm specs each model runs (every input checked before anything runs), what
is left to compute, and a time estimate from measured rates (`--dry-run`).

Layout: `OUT/<model>/` is one run directory per model (the arms of a run share model and template):
the ICL arm `icl` and one SFT arm per method (`sft-lora`, …); `OUT/<model>/implicit/` holds the
implicit suite's arms. Each arm resumes on its own.
"""

from __future__ import annotations

from pathlib import Path

from iclsft.spec import EngineSpec
from iclsft.sweep.config import SweepConfig


def model_dir(out: str | Path, model: str) -> Path:
    return Path(out) / model.strip("/").replace("/", "--")


def arm_specs(config: SweepConfig, model: str) -> list:
    """(arm spec, model ref) for each method, in run order: ICL first, then each SFT method."""
    from iclsft.engine.base import resolve_engine
    from iclsft.runspec import make_icl_spec, make_sft_spec
    from iclsft.spec import sft_spec

    engine = EngineSpec(name=resolve_engine(config.engine), **config.engine_options)
    specs = []
    for task in config.tasks:
        common = dict(model=model, task=task.name, angles=task.angles, words=task.words, shots=config.shots,
                      seeds=config.seeds, labels=config.labels, swap_labels=config.swap_labels,
                      grid_step=config.grid_step, orders=config.orders, dtype=config.dtype,
                      template=config.template, engine=engine)
        for method in config.methods:
            if method == "icl":
                specs.append(make_icl_spec(**common))
            else:
                specs.append(make_sft_spec(**common, sft=sft_spec(method, **config.sft.get(method, {})),
                                           checkpoints=config.checkpoints, executor=config.executor))
    return _merge_tasks(specs)


def implicit_specs(config: SweepConfig, model: str) -> list:
    """(arm spec, model ref) of each method of the implicit suite; [] when the config has none."""
    if config.implicit is None:
        return []
    from iclsft.engine.base import resolve_engine
    from iclsft.runspec import make_implicit_spec

    imp = config.implicit
    engine = EngineSpec(name=resolve_engine(config.engine), **config.engine_options)
    common = dict(model=model, engine=engine, executor=config.executor, tasks=imp.tasks, shots=imp.shots,
                  seeds=config.seeds, train_size=imp.train_size, eval_size=imp.eval_size, faithful=imp.faithful,
                  dtype=config.dtype)
    arms = [make_implicit_spec(method=method, sft=imp.sft.get(method), **common)
            for method in imp.methods if method == "icl" or "ours" in imp.recipes]  # recipes are fine-tunings
    if "original" in imp.recipes:
        arms.append(make_implicit_spec(method="full", recipe="original", sft=imp.sft.get("full-original"), **common))
    return arms


def implicit_dir(out: str | Path, model: str) -> Path:
    return model_dir(out, model) / "implicit"


def _merge_tasks(specs: list) -> list:
    """One spec per arm: the per-task specs of an arm become one spec holding every task."""
    merged: dict[str, tuple] = {}
    for spec, ref in specs:
        if spec.arm in merged:
            prev, _ = merged[spec.arm]
            spec = type(prev).model_validate({**dict(prev), "tasks": prev.tasks + spec.tasks})
        merged[spec.arm] = (spec, ref)
    return list(merged.values())


def plan(config: SweepConfig) -> dict:
    """What the sweep computes and what is left, per model and arm: conditions, trainings (one per
    distinct training with a condition left: conditions whose batches hold the same exemplars share
    one, `iclsft.arms.linear2d.training_groups`; at most that many), training steps, queries."""
    from iclsft.arms.linear2d import training_groups
    from iclsft.sft.train import total_steps
    from iclsft.store import RunDir
    from iclsft.tasks.linear2d import GRID

    rows = []
    for model in config.models:
        run = RunDir(model_dir(config.out, model))
        for spec, _ in arm_specs(config, model):
            conds = spec.conditions()
            todo = [c for c in conds if not run.is_done(c)]
            queries = sum((GRID // c.task.grid_step) ** 2 for c in todo)
            trainings = training_groups(todo, spec.sft) if spec.kind == "sft" else {}
            steps = sum(total_steps(2 * k, spec.sft) for (_, _, k, _) in trainings)
            rows.append({"model": model, "arm": spec.arm, "conditions": len(conds), "todo": len(todo),
                         "trainings": len(trainings), "train_steps": steps, "queries": queries,
                         "prefix_tokens": _mean_prefix_tokens(todo) if spec.kind == "icl" else 0})
        run = RunDir(implicit_dir(config.out, model))
        for spec, _ in implicit_specs(config, model):
            todo = [c for c in spec.conditions() if not run.is_done(c)]
            trainings = {c.training_group for c in todo} if spec.sft else set()
            per_model = total_steps(spec.examples_per_model, spec.sft) if spec.sft else 0
            rows.append({"model": model, "arm": spec.arm, "conditions": len(spec.conditions()), "todo": len(todo),
                         "trainings": len(trainings), "queries": sum(c.eval_size for c in todo),
                         "train_steps": len(trainings) * per_model,
                         # ~40 tokens per demo across the four tasks (code: ~100, boolean: ~25)
                         "prefix_tokens": float(sum(40 * c.shots for c in todo) / len(todo)) if todo else 0.0})
    return {"rows": rows}


def _mean_prefix_tokens(conds) -> float:
    # one exemplar of the default template is ~9 tokens; 2K exemplars per prompt
    return float(sum(18 * c.shots for c in conds) / len(conds)) if conds else 0.0


# Measured throughput, for estimates only (docs/sweep.md): per device kind, seconds per query
# (a + b * prefix tokens), per training step (LoRA / full), and RSA as a second pass over queries.
RATES = {
    # hf engine, fp32, 2 threads, full grid (docs/benchmarks/throughput.md): 132 q/s at a 166-token
    # prefix, 97 at 1,650, 68 at 3,317 -> 7.2 ms + 2.26 us per prefix token
    "cpu": {"query": 1 / 140, "per_prefix_token": 2.26e-6, "lora_step": 0.5, "full_step": 1.0},
    "gpu": {"query": 1 / 13_600, "per_prefix_token": 0.0, "lora_step": 0.05, "full_step": 0.08},
}


def estimate_seconds(rows: list[dict], device: str, rsa: bool) -> float:
    r = RATES[device]
    total = 0.0
    for row in rows:
        per_query = r["query"] + r["per_prefix_token"] * row["prefix_tokens"]
        scoring = row["queries"] * per_query
        total += scoring * (2 if rsa else 1)
        step = r["lora_step"] if row["arm"] in ("sft-lora", "implicit-lora") else r["full_step"]
        total += row["train_steps"] * step
    return total


def format_plan(config: SweepConfig, device: str) -> str:
    p = plan(config)
    lines = [f"{'model':<20} {'arm':<26} {'conditions':>10} {'to run':>7} {'trainings':>9} {'queries':>11}"]
    for r in p["rows"]:
        lines.append(f"{r['model']:<20} {r['arm']:<26} {r['conditions']:>10} {r['todo']:>7} {r['trainings']:>9} "
                     f"{r['queries']:>11,}")
    tot = {k: sum(r[k] for r in p["rows"]) for k in ("conditions", "todo", "trainings", "queries", "train_steps")}
    lines.append(f"{'total':<47} {tot['conditions']:>10} {tot['todo']:>7} {tot['trainings']:>9} "
                 f"{tot['queries']:>11,}")
    seconds = estimate_seconds(p["rows"], device, config.rsa)
    lines.append(f"estimate on one {device.upper()} (SmolLM2-135M-class model; rates in docs/sweep.md): "
                 f"{_duration(seconds)} ({tot['train_steps']:,} training steps"
                 f"{', RSA as a second pass' if config.rsa else ''})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
