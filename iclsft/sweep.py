"""Sweeps: one YAML config names models × tasks × methods × shot counts × seeds × orders ×
checkpoints; `run_sweep` runs (or resumes) all of it, then RSA and the report.

Layout: `OUT/<model>/` is one run directory per model (the arms of a run share model and
template): the ICL arm `icl` and one SFT arm per method (`sft-lora`, …), each resumable on its
own, so an interrupted sweep recomputes nothing that finished. `OUT/sweep.json` holds the expanded
config. Within an SFT arm Ray trains while the driver scores finished adapters.

Config files are plain YAML read with `yaml.safe_load`; `key=value` overrides use dotted paths
(`shots=[1,2]`, `tasks.0.angles=[0,90]`, `sft.lora.epochs=3`) with YAML values. Unknown keys are
errors that name the key and list the allowed ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from iclsft.spec import EngineSpec, ExecutorSpec, Frozen, TemplateSpec

METHODS = ("icl", "lora", "full", "full-frozen-unembed")
Log = Callable[[str], None]


class SweepTask(Frozen):
    name: Literal["linear2d", "xor", "semantic"] = "linear2d"
    angles: tuple[float, ...] = (45.0,)
    words: Literal["sentiment", "size"] | None = None  # semantic only: its adjectives (None: sentiment)


class ImplicitSweep(Frozen):
    """The implicit-pattern suite (SPEC §8) for every model of the sweep: ICL at each K and the SFT
    methods, both variants, matched evaluation sets; then circuit shift (docs/implicit.md)."""

    tasks: tuple[Literal["expression", "relation", "boolean", "code"], ...] = (
        "expression", "relation", "boolean", "code")
    methods: tuple[Literal["icl", "lora", "full"], ...] = ("icl", "lora", "full")
    shots: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)
    train_size: int = 1000
    eval_size: int = 200
    faithful: bool = False
    sft: dict[str, dict] = Field(default_factory=dict)  # per-method overrides of IMPLICIT_SFT_DEFAULTS
    # "original" adds the arm implicit-full-original, the study's recipe (overrides: sft.full-original)
    recipes: tuple[Literal["ours", "original"], ...] = ("ours",)
    circuits: bool = True
    circuit_pairs: int = Field(default=32, ge=1)
    circuit_shots: int = Field(default=8, ge=1)


class SweepConfig(Frozen):
    """A whole experiment. `sft` holds per-method overrides of the SFT defaults (docs/sft.md)."""

    out: str
    models: tuple[str, ...] = ("smollm2-135m",)
    tasks: tuple[SweepTask, ...] = (SweepTask(),)
    methods: tuple[Literal["icl", "lora", "full", "full-frozen-unembed"], ...] = ("icl", "lora")
    shots: tuple[int, ...] = (1, 2, 5, 10)
    seeds: tuple[int, ...] = (0,)
    orders: tuple[str, ...] = ("random",)
    checkpoints: tuple[float, ...] = (1.0,)
    labels: tuple[str, str] = (" Baz", " Rud")
    swap_labels: bool = False
    grid_step: int = 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    template: TemplateSpec = TemplateSpec()
    engine: str = "auto"
    engine_options: dict = Field(default_factory=dict)  # EngineSpec fields other than name
    sft: dict[str, dict] = Field(default_factory=dict)
    executor: ExecutorSpec = ExecutorSpec()
    rsa: bool = False
    rsa_subset: Literal["exemplars", "grid"] = "exemplars"  # the 400x400 matrix's points (iclsft.rsa.points)
    report: bool = True
    implicit: ImplicitSweep | None = None

    @field_validator("sft")
    @classmethod
    def _sft(cls, v: dict[str, dict]) -> dict[str, dict]:
        from iclsft.spec import sft_spec

        for method, overrides in v.items():
            if method not in METHODS[1:]:
                raise ValueError(f"sft.{method}: unknown SFT method; allowed: {', '.join(METHODS[1:])}")
            try:
                sft_spec(method, **overrides)
            except ValidationError as e:
                from iclsft.spec import SftSpec

                bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"sft.{method}: {bad} (allowed keys: {', '.join(SftSpec.model_fields)})") from None
        return v


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a YAML config, apply `key=value` overrides, validate everything."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config {str(path)!r} does not exist") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # one line: what yaml found, and where
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config {str(path)!r} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from e
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ValueError(f"config {str(path)!r} must be a mapping of keys to values (at least `out: DIR`), not {got}")
    for item in overrides:
        apply_override(data, item)
    try:
        return SweepConfig(**data)
    except ValidationError as e:
        raise ValueError(f"config {str(path)!r}: {_explain(e)}") from e


def apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like key=value (e.g. shots=[1,2] or tasks.0.angles=[0,90])")
    value = yaml.safe_load(raw) if raw else ""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {item!r}: {part!r} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"override {item!r}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {where!r}; allowed here: {_allowed(err['loc'])}")
        else:
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def _allowed(loc: tuple) -> str:
    model: type = SweepConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            continue
        args = getattr(field.annotation, "__args__", ())
        inner = next((a for a in args if isinstance(a, type) and issubclass(a, Frozen)), field.annotation)
        if isinstance(inner, type) and issubclass(inner, Frozen):
            model = inner
    return ", ".join(model.model_fields)


# -- expansion ----------------------------------------------------------------------------------
def model_dir(out: str | Path, model: str) -> Path:
    return Path(out) / model.strip("/").replace("/", "--")


def arm_specs(config: SweepConfig, model: str) -> list:
    """(arm spec, model ref) for each method, in run order: ICL first, then each SFT method."""
    from iclsft.engine.base import resolve_engine
    from iclsft.icl import make_icl_spec
    from iclsft.sft.runner import make_sft_spec
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
    from iclsft.implicit.run import make_implicit_spec

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
    one, `iclsft.sft.runner.training_groups`; at most that many), training steps, queries."""
    from iclsft.sft.runner import training_groups
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


# -- running ------------------------------------------------------------------------------------
def run_sweep(config: SweepConfig, *, log: Log | None = None, progress: bool = True) -> dict:
    """Run or resume everything; return {model: metrics table}. Failed conditions are recorded in
    their run and summarised at the end (rerun to retry them); other conditions go on."""
    from iclsft.store import RunDir

    log = log or (lambda _msg: None)
    planned = {model: arm_specs(config, model) for model in config.models}  # every input checked first
    _check_labels(planned)
    planned_implicit = {model: implicit_specs(config, model) for model in config.models}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    # One sweep per output directory (an flock on OUT/.lock, gone when its holder exits or is killed); each
    # run directory below has its own lock too, so an `icl` or `sft` command cannot write into it meanwhile.
    sweep_lock = RunDir(out)
    sweep_lock.acquire_lock(instead="give this sweep another out=")
    try:
        return _run_planned(config, planned, planned_implicit, out, log, progress)
    finally:
        sweep_lock.release_lock()


def _check_labels(planned: dict) -> None:
    """Labels each model's tokenizer can tell apart, before the sweep writes anything (the runs check
    again, later)."""
    from transformers import AutoTokenizer

    from iclsft.prompts import prompt_builders

    for arms in planned.values():
        if arms:
            tokenizer = AutoTokenizer.from_pretrained(arms[0][1].path)
            for spec, _ in arms:
                prompt_builders(tokenizer, spec.template, spec.tasks)


def _run_planned(config: SweepConfig, planned: dict, planned_implicit: dict, out: Path, log: Log,
                 progress: bool) -> dict:
    import json

    from iclsft.artifacts import atomic_write_json
    from iclsft.icl import ConditionsFailed, run_icl
    from iclsft.sft.runner import run_sft
    from iclsft.store import RunDir

    atomic_write_json(out / "sweep.json", json.loads(config.model_dump_json()))
    tables, failures = {}, []
    started = time.time()
    for model in config.models:
        path = model_dir(out, model)
        arms = planned[model]
        run = RunDir(path)
        for i, (spec, ref) in enumerate(arms, 1):
            conds = spec.conditions()
            done = sum(run.is_done(c) for c in conds)
            log(f"== {model} · {spec.arm} ({i}/{len(arms)} arms): {done}/{len(conds)} conditions done, "
                f"{len(conds) - done} to run · {_elapsed(started)}")
            runner = run_icl if spec.kind == "icl" else run_sft
            try:
                tables[model] = runner(spec, path, ref, log=lambda m, a=spec.arm: log(f"  [{a}] {m}"),
                                       progress=progress)
            except ConditionsFailed as e:
                failures.append(f"{model} {spec.arm}: {e}")
                log(f"  [{spec.arm}] {e}")
        if arms:
            _finish_2d(config, path, failures, started, log, progress)
        if planned_implicit[model]:
            _run_implicit_arms(config, model, planned_implicit[model], failures, started, log, progress)
    if config.report and sum(bool(arms) for arms in planned.values()) > 1:
        from iclsft.report.models import build_models_report

        log(f"== models compared: {build_models_report(out, model_reports=False)}")  # reports built above
    if failures:
        raise ConditionsFailed("; ".join(failures))
    return tables


def _run_implicit_arms(config: SweepConfig, model: str, arms: list, failures: list, started: float, log: Log,
                       progress: bool) -> None:
    from iclsft.icl import ConditionsFailed
    from iclsft.implicit.run import run_implicit
    from iclsft.store import RunDir

    path = implicit_dir(config.out, model)
    run = RunDir(path)
    for i, (spec, ref) in enumerate(arms, 1):
        conds = spec.conditions()
        done = sum(run.is_done(c) for c in conds)
        log(f"== {model} · {spec.arm} ({i}/{len(arms)} implicit arms): {done}/{len(conds)} conditions done, "
            f"{len(conds) - done} to run · {_elapsed(started)}")
        try:
            run_implicit(spec, path, ref, log=lambda m, a=spec.arm: log(f"  [{a}] {m}"), progress=progress)
        except ConditionsFailed as e:
            failures.append(f"{model} {spec.arm}: {e}")
            log(f"  [{spec.arm}] {e}")
    imp = config.implicit
    if imp.circuits:
        from iclsft.implicit.circuits import compute_circuits

        log(f"== {model} · implicit circuit shift · {_elapsed(started)}")
        try:
            compute_circuits(path, pairs=imp.circuit_pairs, shots=imp.circuit_shots,
                             log=lambda m: log(f"  [circuits] {m}"))
        except ConditionsFailed as e:
            failures.append(f"{model} circuits: {e}")
            log(f"  [circuits] {e}")
    if config.report:
        from iclsft.report import build_report

        log(f"== {model} · implicit report: {build_report(path)}")


def _finish_2d(config: SweepConfig, path: Path, failures: list, started: float, log: Log, progress: bool) -> None:
    """RSA and the report of one model's 2D run."""
    from iclsft.icl import ConditionsFailed

    model = path.name
    if config.rsa:
        from iclsft.rsa import compute_rsa

        log(f"== {model} · RSA · {_elapsed(started)}")
        try:
            compute_rsa(path, dtype=config.dtype, subset=config.rsa_subset, progress=progress,
                        log=lambda m: log(f"  [rsa] {m}"))
        except ConditionsFailed as e:
            failures.append(f"{model} rsa: {e}")
            log(f"  [rsa] {e}")
    if config.report:
        from iclsft.report import build_report

        log(f"== {model} · report: {build_report(path)}")


def _elapsed(started: float) -> str:
    s = time.time() - started
    return f"{int(s // 60)}m{int(s % 60):02d}s elapsed"

