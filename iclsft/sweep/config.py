"""A sweep's config: one YAML file names models × tasks × methods × shot counts × seeds × orders ×
checkpoints (and the implicit suite).

Config files are plain YAML read with `yaml.safe_load`; `key=value` overrides use dotted paths
(`shots=[1,2]`, `tasks.0.angles=[0,90]`, `sft.lora.epochs=3`) with YAML values. Unknown keys are
errors that name the key and list the allowed ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from iclsft.engine_spec import EngineSpec, owner
from iclsft.errors import first_error
from iclsft.graph.resources import Resources
from iclsft.names import (
    CHECKPOINTS_KEEP,
    DEFAULT_MODEL,
    DTYPES,
    IMPLICIT_METHODS,
    METHODS,
    RECIPES,
    RSA_SUBSETS,
    SFT_METHODS,
)
from iclsft.spec import ExecutorSpec, Frozen, SftSpec, TaskSpec, TemplateSpec, sft_spec
from iclsft.tasks import registry
from iclsft.tasks.linear2d import check_order


class SweepTask(Frozen):
    name: str = "linear2d"  # a 2D task of the registry (iclsft.tasks.registry)
    angles: tuple[float, ...] = (45.0,)
    words: str | None = None  # tasks that write words (semantic): the word list (None: the task's default)
    # the methods run at these angles (None: every method of the sweep), e.g. ICL alone at extra angles
    methods: tuple[str, ...] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        registry.get(v, "linear2d")
        return v

    @model_validator(mode="after")
    def _words(self) -> SweepTask:
        TaskSpec(name=self.name, angle=0, words=self.words)  # the task's own check of its word list
        return self


class ImplicitSweep(Frozen):
    """The implicit-pattern suite (SPEC §8) for every model of the sweep: ICL at each K and the SFT
    methods, both variants, matched evaluation sets; then circuit shift (docs/implicit.md)."""

    tasks: tuple[str, ...] = ("expression", "relation", "boolean", "code")
    methods: tuple[str, ...] = IMPLICIT_METHODS
    shots: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)
    train_size: int = 1000
    eval_size: int = 200
    faithful: bool = False
    sft: dict[str, dict] = Field(default_factory=dict)  # per-method overrides of IMPLICIT_SFT_DEFAULTS
    # "original" adds the arm implicit-full-original, the study's recipe (overrides: sft.full-original)
    recipes: tuple[Literal[RECIPES], ...] = ("ours",)
    circuits: bool = True
    circuit_pairs: int = Field(default=32, ge=1)
    circuit_shots: int = Field(default=8, ge=1)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            registry.get(name, "implicit")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if m not in IMPLICIT_METHODS]
        if bad:
            raise ValueError(f"implicit method {bad[0]!r} is not allowed; allowed: {', '.join(IMPLICIT_METHODS)}")
        return v


class SweepConfig(Frozen):
    """A whole experiment. `sft` holds per-method overrides of the SFT defaults (docs/sft.md)."""

    out: str
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    tasks: tuple[SweepTask, ...] = (SweepTask(),)
    methods: tuple[str, ...] = ("icl", "lora")
    shots: tuple[int, ...] = (1, 2, 5, 10)
    seeds: tuple[int, ...] = (0,)
    orders: tuple[str, ...] = ("random",)
    # the SFT arms' orders (None: `orders`); with an even batch size every order probe trains the same
    # model as random order (docs/sft.md), so `[random]` keeps the probes for ICL and scores each model once
    sft_orders: tuple[str, ...] | None = None
    checkpoints: tuple[float, ...] = (1.0,)
    labels: tuple[str, str] = (" Baz", " Rud")
    swap_labels: bool = False
    grid_step: int = 1
    dtype: Literal[DTYPES] = "float32"
    template: TemplateSpec = TemplateSpec()
    engine: str = "auto"
    engine_options: dict = Field(default_factory=dict)  # flat: each read by its engine (EngineSpec.of)
    sft: dict[str, dict] = Field(default_factory=dict)
    executor: ExecutorSpec = ExecutorSpec()
    resources: Resources = Resources()  # scorers and trainers of the work graph (iclsft.graph.resources)
    rsa: bool = False
    # full fine-tunes' checkpoints kept once everything that reads them is written: every one, each
    # training's last, none (iclsft.sft.retention); LoRA adapters are always kept
    checkpoints_keep: Literal[CHECKPOINTS_KEEP] = "all"
    retrain_deleted: bool = False  # train a deleted checkpoint again when work needs it (else refused by name)
    rsa_subset: Literal[RSA_SUBSETS] = "exemplars"  # the 400x400 matrix's points (iclsft.rsa.points)
    report: bool = True
    implicit: ImplicitSweep | None = None

    @field_validator("engine_options")
    @classmethod
    def _engine_options(cls, v: dict) -> dict:
        """Known options of one engine with allowed values (whether `engine` reads them, the plan checks:
        which engine `auto` is depends on the machine)."""
        readers = sorted({owner(k) or "" for k in v})
        if len(readers) > 1 and "" not in readers:
            raise ValueError(f"engine_options mixes options of the {' and '.join(readers)} engines: "
                             "an engine reads only its own")
        try:
            EngineSpec.of(readers[-1] if v else "hf", **v)  # an unknown option (ValueError) or a bad value
        except ValidationError as e:
            _, field, value, message = first_error(e)
            option = field.split(".")[-1]
            raise ValueError(message if option not in v else
                             f"engine_options.{option} = {value!r} is not allowed: {message}") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _drop_full_weights(cls, data):
        # the key before checkpoints_keep: `drop_full_weights: true` is `checkpoints_keep: none`
        if isinstance(data, dict) and "drop_full_weights" in data:
            data = dict(data)
            drop = data.pop("drop_full_weights")
            if drop and data.setdefault("checkpoints_keep", "none") != "none":
                raise ValueError(f"drop_full_weights: true means checkpoints_keep: none, not "
                                 f"{data['checkpoints_keep']!r}; give checkpoints_keep alone")
        return data

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if m not in METHODS]
        if bad:
            raise ValueError(f"method {bad[0]!r} is not allowed; allowed: {', '.join(METHODS)}")
        return v

    @field_validator("orders", "sft_orders")
    @classmethod
    def _orders(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and not v:
            raise ValueError("name at least one order ('random' or a pattern such as 1221)")
        return None if v is None else tuple(check_order(o) for o in v)

    @model_validator(mode="after")
    def _task_methods(self) -> SweepConfig:
        seen: dict[tuple, int] = {}
        for i, task in enumerate(self.tasks):
            bad = [m for m in task.methods or () if m not in self.methods]
            if bad:
                raise ValueError(f"tasks.{i}.methods: {bad[0]!r} is not one of the sweep's methods "
                                 f"({', '.join(self.methods)})")
            for method in task.methods or self.methods:
                for angle in task.angles:
                    key = (task.name, task.words, float(angle), method)
                    if key in seen:
                        raise ValueError(f"tasks.{seen[key]} and tasks.{i} both run {method} on {task.name} at "
                                         f"angle {angle:g}; give each (task, angle, method) once")
                    seen[key] = i
        return self

    @field_validator("sft")
    @classmethod
    def _sft(cls, v: dict[str, dict]) -> dict[str, dict]:
        for method, overrides in v.items():
            if method not in SFT_METHODS:
                raise ValueError(f"sft.{method}: unknown SFT method; allowed: {', '.join(SFT_METHODS)}")
            try:
                sft_spec(method, **overrides)
            except ValidationError as e:
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
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
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
