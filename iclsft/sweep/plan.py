"""A sweep's plan: the arm specs each model runs (every input checked before anything runs), what
is left to compute, and a time estimate from measured rates (`--dry-run`).

Layout: `OUT/<model>/` is one run directory per model (the arms of a run share model and template):
the ICL arm `icl` and one SFT arm per method (`sft-lora`, …); `OUT/<model>/implicit/` holds the
implicit suite's arms. Each arm resumes on its own.
"""

from __future__ import annotations

from pathlib import Path

from iclsft.engine.base import resolve_engine
from iclsft.graph.costs import RATES, prefix_tokens
from iclsft.graph.ray_backend import start_ray
from iclsft.graph.simulate import CHECKPOINT_ENGINE, planned_engine, simulate
from iclsft.graph.simulate import simulation_works as graph_simulation_works
from iclsft.runspec import make_icl_spec, make_implicit_spec, make_sft_spec
from iclsft.spec import EngineSpec, sft_spec
from iclsft.store import RunDir
from iclsft.study import of_spec
from iclsft.sweep.config import SweepConfig


def model_dir(out: str | Path, model: str) -> Path:
    return Path(out) / model.strip("/").replace("/", "--")


def arm_specs(config: SweepConfig, model: str) -> list:
    """(arm spec, model ref) for each method, in run order: ICL first, then each SFT method."""
    engine = EngineSpec.of(resolve_engine(config.engine), **config.engine_options)
    specs = []
    for method in config.methods:
        for task in (t for t in config.tasks if method in (t.methods or config.methods)):
            common = dict(model=model, task=task.name, angles=task.angles, words=task.words, shots=config.shots,
                          seeds=config.seeds, labels=config.labels, swap_labels=config.swap_labels,
                          grid_step=config.grid_step, dtype=config.dtype, template=config.template, engine=engine)
            if method == "icl":
                specs.append(make_icl_spec(**common, orders=config.orders))
            else:
                specs.append(make_sft_spec(**common, orders=config.sft_orders or config.orders,
                                           sft=sft_spec(method, **config.sft.get(method, {})),
                                           checkpoints=config.checkpoints, executor=config.executor,
                                           **retention(config)))
    return _merge_tasks(specs)


def implicit_specs(config: SweepConfig, model: str) -> list:
    """(arm spec, model ref) of each method of the implicit suite; [] when the config has none."""
    if config.implicit is None:
        return []
    imp = config.implicit
    engine = EngineSpec.of(resolve_engine(config.engine), **config.engine_options)
    common = dict(model=model, engine=engine, executor=config.executor, tasks=imp.tasks, shots=imp.shots,
                  seeds=config.seeds, train_size=imp.train_size, eval_size=imp.eval_size, faithful=imp.faithful,
                  dtype=config.dtype)
    arms = [make_implicit_spec(method=method, sft=imp.sft.get(method), **common,
                               **(retention(config) if method != "icl" else {}))
            for method in imp.methods if method == "icl" or "ours" in imp.recipes]  # recipes are fine-tunings
    if "original" in imp.recipes:
        arms.append(make_implicit_spec(method="full", recipe="original", sft=imp.sft.get("full-original"), **common,
                                       **retention(config)))
    return arms


def retention(config: SweepConfig) -> dict:
    """The SFT arms' checkpoint policy (iclsft.sft.retention), as spec fields."""
    return {"checkpoints_keep": config.checkpoints_keep, "retrain_deleted": config.retrain_deleted}


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
    rows = []
    for model in config.models:
        run = RunDir(model_dir(config.out, model))
        for spec, _ in arm_specs(config, model):
            conds = spec.conditions()
            todo = [c for c in conds if not run.is_done(c)]
            trainings = _trainings(spec, todo)
            rows.append({"model": model, "arm": spec.arm, "conditions": len(conds), "todo": len(todo),
                         "trainings": len(trainings), "train_steps": sum(n for _, n in trainings),
                         "queries": sum(c.queries for c in todo), "prefix_tokens": _mean_prefix_tokens(todo)})
        run = RunDir(implicit_dir(config.out, model))
        for spec, _ in implicit_specs(config, model):
            todo = [c for c in spec.conditions() if not run.is_done(c)]
            trainings = _trainings(spec, todo)
            rows.append({"model": model, "arm": spec.arm, "conditions": len(spec.conditions()), "todo": len(todo),
                         "trainings": len(trainings), "queries": sum(c.queries for c in todo),
                         "train_steps": sum(n for _, n in trainings), "prefix_tokens": _mean_prefix_tokens(todo)})
    return {"rows": rows}


def _trainings(spec, todo: list) -> list[tuple[list, int]]:
    """The trainings `todo` needs, as its study counts them: [(conditions of one model, its steps)]."""
    return of_spec(spec).trainings(spec, todo) if spec.training is not None else []


def _mean_prefix_tokens(conds) -> float:
    """Prompt tokens before the queries, mean over `conds` (their study's tokens per example)."""
    return float(sum(prefix_tokens(c) for c in conds) / len(conds)) if conds else 0.0


def cluster(config: SweepConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the sweep would run on: the Ray cluster at `executor.ray_address`, else this machine."""
    import os

    if config.executor.ray_address:
        import ray

        started = start_ray(config.executor)
        try:
            total = ray.cluster_resources()
        finally:
            if started:
                ray.shutdown()
        return float(total.get("CPU", 0)), float(total.get("GPU", 0))
    import torch

    return float(os.cpu_count() or 1), float(torch.cuda.device_count())


def parse_gpus(text: str) -> list[float]:
    """`--gpus 1,8,64` -> [1.0, 8.0, 64.0]; ValueError naming the bad value."""
    counts = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"--gpus {text!r}: {item!r} is not a whole number of GPUs (0: CPUs only); give e.g. "
                             "--gpus 1,8,64")
        counts.append(float(item))
    return counts


def work_totals(works) -> dict:
    """What the works add up to, resource counts aside: counts, device-seconds per stage, bytes on disk
    (`files`: kind -> [number, bytes])."""
    t = {"trainings": 0, "steps": 0, "conditions": 0, "scorings": 0, "queries": 0, "rsa": 0, "rsa_works": 0,
         "rsa_loads": 0, "circuits": 0, "train_seconds": 0.0, "score_seconds": 0.0, "rsa_seconds": 0.0,
         "circuit_seconds": 0.0, "files": {}}
    for w in works:
        s = w.payload
        if s.kind == "train":
            t["trainings"] += 1
            t["steps"] += s.steps
            t["train_seconds"] += w.cost
            kind, n = ("LoRA adapters" if s.method == "lora" else "full checkpoints"), s.checkpoints
        elif s.kind == "score":
            t["conditions"] += s.conditions
            t["scorings"] += 1
            t["queries"] += s.queries
            t["score_seconds"] += w.cost
            kind, n = "condition scores", s.conditions
        elif s.kind == "rsa":
            t["rsa"] += s.conditions
            t["rsa_works"] += 1
            t["rsa_loads"] += s.method not in ("icl", "lora")  # a full checkpoint loaded for its conditions
            t["rsa_seconds"] += w.cost
            kind, n = "RSA arrays (at most)", s.conditions
        else:
            t["circuits"] += 1
            t["circuit_seconds"] += w.cost
            continue
        files = t["files"].setdefault(kind, [0, 0])
        files[0] += n
        files[1] += s.bytes
    return t


def format_plan(config: SweepConfig, device: str | None = None, *, gpus: list[float] | None = None,
                cpus: float | None = None) -> str:
    """The `--dry-run` page: per model and arm what is left; then for each resource count (`gpus`; default:
    this machine's, or the Ray cluster's at `executor.ray_address`; `device` "cpu" / "gpu" means [0] / [1])
    the work per stage, engine starts, model loads, disk use and the wall time of the real scheduler on
    timed stand-ins (`iclsft.graph.simulate`), and the rates used. `cpus`: for `gpus` 0 (default: this
    machine's); with GPUs, GPU_NODE_CPUS per GPU."""
    p = plan(config)
    lines = [f"{'model':<20} {'arm':<26} {'conditions':>10} {'to run':>7} {'trainings':>9} {'queries':>11}"]
    for r in p["rows"]:
        lines.append(f"{r['model']:<20} {r['arm']:<26} {r['conditions']:>10} {r['todo']:>7} {r['trainings']:>9} "
                     f"{r['queries']:>11,}")
    tot = {k: sum(r[k] for r in p["rows"]) for k in ("conditions", "todo", "trainings", "queries")}
    lines.append(f"{'total':<47} {tot['conditions']:>10} {tot['todo']:>7} {tot['trainings']:>9} "
                 f"{tot['queries']:>11,}")
    if gpus is None:
        gpus = [1.0 if device == "gpu" else 0.0] if device else [cluster(config)[1]]
    if cpus is None and 0 in gpus and device is None:
        cpus = cluster(config)[0]
    for dev in dict.fromkeys("gpu" if g else "cpu" for g in gpus):
        engine = planned_engine(config, dev)
        works = simulation_works(config, dev, engine)
        t = work_totals(works)
        loads = t["trainings"] * RATES[dev]["model_load"]
        files = "; ".join(f"{n:,} {kind} {_bytes(b / n)} = {_bytes(b)}" for kind, (n, b) in t["files"].items() if n)
        lines += ["", f"work, timed for {dev.upper()}s (engine {engine}):",
                  f"  training  {t['trainings']:,} trainings, {t['steps']:,} steps: {_duration(t['train_seconds'])} "
                  f"(steps {_duration(t['train_seconds'] - loads)}, {t['trainings']:,} model loads {_duration(loads)})",
                  f"  scoring   {t['conditions']:,} conditions in {t['scorings']:,} works (ICL chains, "
                  f"checkpoints), {t['queries']:,} queries: "
                  f"{_duration(t['score_seconds'])}",
                  f"  disk      {files or 'nothing'}; total {_bytes(sum(b for _, b in t['files'].values()))}"]
        if t["rsa"]:
            loads = t["rsa_loads"] * RATES[dev]["model_load"]
            lines.insert(-1, f"  RSA       {t['rsa']:,} conditions in {t['rsa_works']:,} works (as scored), each one "
                             "more pass over its condition's queries: "
                             f"{_duration(t['rsa_seconds'])}" + (f" (of which {t['rsa_loads']:,} full-checkpoint "
                                                                 f"loads {_duration(loads)})" if loads else ""))
        if t["circuits"]:
            lines.insert(-1, f"  circuits  {t['circuits']:,} states of the implicit suite: "
                             f"{_duration(t['circuit_seconds'])}")
        if any(key.startswith(CHECKPOINT_ENGINE) for w in works for key, _ in w.setup):
            lines.append(f"  note      {engine} cannot swap a full fine-tune's weights into a running engine: each "
                         "full checkpoint opens an engine of its own (engine=hf swaps them: one engine per scorer)")
        for g in (g for g in gpus if ("gpu" if g else "cpu") == dev):
            sim = simulate(config, works, gpus=g, cpus=None if g else cpus)
            hooks = sim.setups.get("hooks", 0)
            where = f"{_num(g)} GPU{'' if g == 1 else 's'}" if g else f"{_num(sim.cpus)} CPUs"
            lines += [f"on {where}: {sim.slots.describe()}",
                      f"  engine starts {sim.engine_starts:,} ({_duration(_engine_seconds(sim, works))}); model loads "
                      f"{t['trainings'] + sim.engine_starts + hooks + t['rsa_loads']:,} ({t['trainings']:,} trainings, "
                      f"{sim.engine_starts:,} engine starts, {hooks:,} hook models for RSA and circuits, "
                      f"{t['rsa_loads']:,} full checkpoints for their RSA)",
                      *_disk_lines(config, sim.full_disk, sum(b for _, b in t["files"].values())),
                      f"  wall time {_duration(sim.makespan)}, {100 * sim.utilisation:.0f}% of the "
                      f"{_num(sim.devices)} {'GPU' if g else 'worker'}{'s' if sim.devices != 1 else ''} busy "
                      f"(total work / workers {_duration(sim.bound)})"]
        lines.append(f"  rates: {_rates(dev)}")
    if config.executor.name != "ray":
        lines.append("executor local: the works run in this process, one at a time (the wall time is about the "
                     "total work)")
    return "\n".join(lines)


def _disk_lines(config: SweepConfig, full_disk: dict[str, tuple[int, int]], total: int) -> list[str]:
    """The full checkpoints' disk at its peak and at the end under each `checkpoints_keep` policy (the
    chosen one first), and a warning when the run's peak exceeds the free space where it writes."""
    if not full_disk or not full_disk["all"][0]:
        return []
    chosen = config.checkpoints_keep
    order = [chosen, *(p for p in ("all", "final", "none") if p != chosen)]
    each = [f"{p}{' (chosen)' if p == chosen else ''} {_bytes(full_disk[p][0])} at the peak, {_bytes(full_disk[p][1])} "
            "at the end" for p in order]
    lines = [f"  disk      full checkpoints by checkpoints_keep: {'; '.join(each)} (each deleted once everything "
             "that reads it is written)"]
    peak = total - full_disk["all"][0] + full_disk[chosen][0]
    free = free_bytes(Path(config.out))
    if free is not None and peak > free:
        lines.append(f"  warning   this run needs up to {_bytes(peak)} on disk (checkpoints_keep: {chosen}) and the "
                     f"filesystem of {config.out} has {_bytes(free)} free"
                     + ("; checkpoints_keep: final or none needs less" if chosen != "none" else ""))
    return lines


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    import shutil

    for p in (path, *path.resolve().parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return None


def simulations(config: SweepConfig, gpus: list[float], cpus: float | None = None) -> list:
    """`iclsft.graph.simulate.simulate` for each GPU count (0: CPUs only, `cpus` of them, default this
    machine's), the works built once per device kind."""
    works = {dev: simulation_works(config, dev) for dev in dict.fromkeys("gpu" if g else "cpu" for g in gpus)}
    return [simulate(config, works["gpu" if g else "cpu"], gpus=g, cpus=None if g else cpus) for g in gpus]


def planned_arms(config: SweepConfig) -> dict[str, list]:
    """Per model, every arm of the sweep as (run directory, spec, model ref): the 2D arms, then the implicit
    suite's (the order the work graph and the simulator take them in)."""
    return {model: [(model_dir(config.out, model), spec, ref) for spec, ref in arm_specs(config, model)]
            + [(implicit_dir(config.out, model), spec, ref) for spec, ref in implicit_specs(config, model)]
            for model in config.models}


def simulation_works(config: SweepConfig, device: str, engine: str | None = None) -> list:
    """The works `config` has left, timed for `device` ("cpu" or "gpu"), scored with `engine` (default: the
    planned one): `iclsft.graph.simulate.simulation_works` of its planned arms."""
    return graph_simulation_works(config, device, planned_arms(config), engine)


def format_simulations(config: SweepConfig, gpus: list[float], cpus: float | None = None) -> str:
    """`sweep --simulate`: one row per resource count: the slots, the makespan of the real scheduler on
    timed stand-ins, total work / workers (devices), and how busy the devices and each role's slots were."""
    sims = simulations(config, gpus, cpus)
    engines = ", ".join(f"{dev} rates, engine {planned_engine(config, dev)}"
                        for dev in dict.fromkeys("gpu" if g else "cpu" for g in gpus))
    lines = [f"simulated ({engines}): the sweep's scheduler on timed stand-ins of its works",
             f"{'GPUs':>5} {'CPUs':>5} {'scorers':>8} {'trainers':>9} {'makespan':>9} {'work/workers':>13} "
             f"{'ratio':>6} {'busy':>5} {'scorers busy':>16} {'trainers busy':>16} {'engine starts':>14}"]
    for sim in sims:
        busy = {role: _slots_busy(sim, role) for role in ("scorer", "trainer")}
        ratio = sim.makespan / sim.bound if sim.bound > 0 else 0.0
        lines.append(f"{_num(sim.gpus):>5} {_num(sim.cpus):>5} {sim.slots.scorers:>8} {sim.slots.trainers:>9} "
                     f"{_duration(sim.makespan):>9} {_duration(sim.bound):>13} {ratio:>6.2f} "
                     f"{100 * sim.utilisation:>4.0f}% {busy['scorer']:>16} {busy['trainer']:>16} "
                     f"{sim.engine_starts:>14,}")
    lines.append("work/workers: the device-seconds of every work (engine starts included) over the GPUs the slots "
                 "hold (without GPUs: the slots); busy: that over the makespan; scorers busy, trainers busy: each "
                 "role's slots' busy time over slots x makespan (in brackets the least and most busy slot)")
    return "\n".join(lines)


def _slots_busy(sim, role: str) -> str:
    """A role's utilisation, and its least and most busy slot: "96% (93-98%)"."""
    busy = sim.usage.busy.get(role)
    if not busy or sim.makespan <= 0:
        return "-"
    each = [100 * b / sim.makespan for b in busy.values()]
    return f"{sum(each) / len(each):.0f}% ({min(each):.0f}-{max(each):.0f}%)"


def _engine_seconds(sim, works) -> float:
    """Seconds of the simulation's engine starts (each setup's seconds, times the slots that did it)."""
    seconds = {key: extra for w in works for key, extra in w.setup if key.startswith("engine")}
    return sim.engine_starts * (sum(seconds.values()) / len(seconds)) if seconds else 0.0


def _rates(device: str) -> str:
    r = RATES[device]
    per_token = f" + {r['per_prefix_token'] * 1e6:.2f} us per prefix token" if r["per_prefix_token"] else ""
    floors = (f"; at least {r['step_floor']:g} s a step and {r['load_floor']:g} s a load, whatever the model"
              if r["step_floor"] or r["load_floor"] else "")
    return (f"{1 / r['query']:,.0f} queries/s{per_token}, + {r['condition']:g} s per condition (RSA + "
            f"{r['rsa_condition']:g} s); SFT step LoRA {r['lora_step']:g} s, full {r['full_step']:g} s; model load "
            f"{r['model_load']:g} s; engine start hf {r['engine_start']:g} s + model load, vllm {r['vllm_start']:g} s; "
            f"a full checkpoint swapped in {r['swap_per_gb']:g} s per GB{floors} "
            f"(measured: {', '.join(r['measured'])}; the rest assumed; docs/sweep.md)")


def _num(x: float) -> str:
    return f"{x:g}"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
