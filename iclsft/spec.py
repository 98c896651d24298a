"""Frozen run specs and condition keys.

A run spec says everything that determines the results of a run; a condition is one cell of it
(task, method, shot count, seed). A condition's id is a versioned content hash of exactly the
fields that determine its numbers. Transport knobs (engine batch size, threads, progress bars)
live in `EngineSpec` and stay out of every hash.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from iclsft.engine_spec import EngineSpec
from iclsft.frozen import Frozen
from iclsft.names import BOS_CHOICES, CHECKPOINTS_KEEP, DTYPES, EXECUTORS, PRECISIONS, SFT_METHODS
from iclsft.tasks import registry
from iclsft.tasks.linear2d import GRID
from iclsft.versions import HASH_VERSION


class TemplateSpec(Frozen):
    """How exemplars and queries are rendered (SPEC §4). The exemplar must be the query, then
    `{label}`, then a separator, so that ICL prompts and SFT examples share one renderer."""

    header: str = ""
    exemplar: str = "{x1} {x2} ->{label}\n"
    query: str = "{x1} {x2} ->"
    bos: Literal[BOS_CHOICES] = "auto"
    # Wrap header + exemplars + query as the user's turn of the model's chat template (instruct
    # models); the label follows the generation prompt. Left out of the stored spec when False.
    chat: bool = False

    @model_validator(mode="after")
    def _check(self) -> TemplateSpec:
        if self.chat and self.bos != "auto":
            raise ValueError(f"template bos={self.bos!r} is not allowed with chat=True: the chat template writes "
                             "the BOS itself; use bos 'auto'")
        query_fields = _fields(self.query, "query")
        exemplar_fields = _fields(self.exemplar, "exemplar")
        if _fields(self.header, "header"):
            raise ValueError(f"template header {self.header!r} may not contain {{fields}}")
        if not query_fields <= {"x1", "x2"} or exemplar_fields - {"x1", "x2", "label"}:
            raise ValueError(
                f"template fields must be {{x1}}, {{x2}} (query) and {{label}} (exemplar); "
                f"got query {self.query!r}, exemplar {self.exemplar!r}"
            )
        if self.exemplar.count("{label}") != 1 or not self.exemplar.startswith(self.query + "{label}"):
            raise ValueError(
                f"exemplar template {self.exemplar!r} must be the query template {self.query!r} "
                "followed by '{label}' and, optionally, a separator such as '\\n'"
            )
        if _fields(self.separator, "separator"):
            raise ValueError(f"the text after {{label}} in {self.exemplar!r} may not contain fields")
        return self

    @property
    def separator(self) -> str:
        return self.exemplar[len(self.query) + len("{label}") :]


def _fields(template: str, what: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"malformed {what} template {template!r}: {e}") from e
    names = set()
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name == "" or spec or conv:
            raise ValueError(f"malformed {what} template {template!r}: use plain named fields like {{x1}}")
        names.add(name)
    return names


class TaskSpec(Frozen):
    """A 2D task at one angle (SPEC §2): any task registered for the linear2d study
    (`iclsft.tasks.registry`: linear2d; xor, the XOR of the linear tasks at angle and angle + 90°;
    semantic, linear2d with n1, n2 written as words). `words`: the task's word list (semantic:
    "sentiment", the default and the study's, or "size"); None for tasks that write integers."""

    name: str = "linear2d"
    angle: float
    labels: tuple[str, str] = (" Baz", " Rud")
    swap_labels: bool = False
    grid_step: int = 1
    words: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_words(cls, data):
        # A task with word lists gets its default filled in, so its condition ids always hash the list:
        # semantic runs made with the size list before the field existed never match a new condition.
        if isinstance(data, dict) and data.get("words") is None and isinstance(data.get("name", "linear2d"), str):
            task = registry.get(data.get("name", "linear2d"), "linear2d")
            if task.default_words is not None:
                data = {**data, "words": task.default_words}
        return data

    @model_validator(mode="after")
    def _words_of_task(self) -> TaskSpec:
        task = registry.get(self.name, "linear2d")
        if self.words is not None and self.words not in task.word_lists:
            if not task.word_lists:
                raise ValueError(f"words {self.words!r} applies to tasks that write words (semantic), "
                                 f"not {self.name!r}")
            raise ValueError(f"words {self.words!r} is not allowed: choose one of {', '.join(task.word_lists)}")
        return self

    @field_validator("angle")
    @classmethod
    def _angle(cls, v: float) -> float:
        if not 0.0 <= v < 180.0:
            raise ValueError(f"angle {v} is outside the allowed range [0, 180) degrees")
        return float(v)

    @field_validator("grid_step")
    @classmethod
    def _step(cls, v: int) -> int:
        if v < 1 or 100 % v:
            raise ValueError(f"grid_step {v} must be a positive divisor of 100 (1, 2, 4, 5, 10, 20, 25, 50)")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: tuple[str, str]) -> tuple[str, str]:
        if not all(v) or v[0] == v[1]:
            raise ValueError(f"labels {v!r} must be two different non-empty strings")
        return v


def stored_task(data: dict) -> TaskSpec:
    """The TaskSpec of a task as a run directory stored it: a semantic task stored before `words`
    existed was written with the size list (TaskSpec alone would read it as the new default)."""
    if data.get("name") == "semantic" and "words" not in data:
        data = {**data, "words": "size"}
    return TaskSpec(**data)


class ModelSpec(Frozen):
    name: str
    fingerprint: str





class TokenCounts(Frozen):
    """How the model's tokenizer writes one task's values and labels, in the query's context: tokens
    per integer 0..99 (as x1 and as x2; min, max, mean) and per label. Recorded, never hashed: it
    follows from model, template and task."""

    labels: tuple[str, str]
    words: str | None = None
    integer_min: int
    integer_max: int
    integer_mean: float
    label_tokens: tuple[int, int]


class ArmSpec(Frozen):
    """What the spec of every arm of both studies has: a model, seeds, a dtype and an engine; its
    `identity()` (what determines results, transport knobs left out) is frozen in the run directory,
    and `conditions()` lists its cells (each a `ConditionBase`)."""

    model: ModelSpec
    seeds: tuple[int, ...] = (0,)
    dtype: Literal[DTYPES] = "float32"
    engine: EngineSpec = EngineSpec()

    TRANSPORT: ClassVar[set[str]] = {"engine"}

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("seeds must name at least one seed")
        bad = [s for s in v if s < 0]
        if bad:
            raise ValueError(f"seed {bad[0]} is not allowed: seeds must be integers >= 0")
        return tuple(sorted(set(v)))

    def identity(self) -> dict:
        """The fields that determine results (transport knobs left out)."""
        return self.model_dump(mode="json", exclude=self.TRANSPORT)

    @property
    def training(self) -> SftSpec | None:
        """The fine-tuning recipe of an arm that trains models; None for ICL."""
        return None


class ConditionBase(Frozen):
    """One cell of an arm. Its id is "{HASH}-{content hash of all its fields}" (iclsft.versions: a change of
    what a condition holds bumps the version, and `iclsft-eval migrate` rewrites old run directories);
    `label` names it in progress lines, `dirname` its directory, `row()` its record's key fields."""

    HASH: ClassVar[str] = HASH_VERSION
    STUDY: ClassVar[str]  # the study whose arms compute it: "linear2d" or "implicit"

    @property
    def id(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return f"{self.HASH}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    # What the work graph and the planner need of any condition (none of it enters the id):
    @property
    def queries(self) -> int:
        """Queries it scores."""
        raise NotImplementedError

    @property
    def prompt_examples(self) -> int:
        """Examples in the prompt before the queries (0 for a fine-tuned model, scored zero-shot)."""
        raise NotImplementedError

    @property
    def chain(self) -> tuple:
        """ICL conditions with one chain share a growing prompt: scored together, `chain_rank` ascending, each
        prompt extends the last."""
        raise NotImplementedError

    @property
    def chain_rank(self) -> tuple:
        raise NotImplementedError

    @property
    def label(self) -> str:
        raise NotImplementedError

    @property
    def dirname(self) -> str:
        raise NotImplementedError

    def row(self) -> dict:
        """Its key fields (task, method, shots, seed, ...), copied into its record and metrics row."""
        raise NotImplementedError


class RunSpecBase(ArmSpec):
    """Fields every arm of the 2D study shares: what is learned (tasks, stream) and how it is shown
    (template, model)."""

    hash_version: str = HASH_VERSION
    tasks: tuple[TaskSpec, ...]
    template: TemplateSpec = TemplateSpec()
    shots: tuple[int, ...]
    orders: tuple[str, ...] = ("random",)
    tokens: tuple[TokenCounts, ...] | None = None  # filled in at run start (iclsft.tokenizers_check)

    # `tokens` is no knob but a record derived from model and template: out of identities all the same
    TRANSPORT: ClassVar[set[str]] = {"engine", "tokens"}

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("shots must name at least one shot count")
        bad = [k for k in v if k < 1]
        if bad:
            raise ValueError(f"shot count {bad[0]} is not allowed: shots are per class and must be >= 1")
        return tuple(sorted(set(v)))

    @field_validator("orders")
    @classmethod
    def _orders(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("orders must name at least one order ('random' or a pattern such as 1221)")
        return tuple(dict.fromkeys(v))  # unique, in the order given

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
        if not v:
            raise ValueError("at least one task (angle) is needed")
        unique = {t.model_dump_json(): t for t in v}  # repeated angles would compute one condition twice
        return tuple(sorted(unique.values(), key=lambda t: (t.name, t.angle)))

    def _condition(self, task: TaskSpec, k: int, seed: int, method: str, order: str, **extra) -> Condition:
        return Condition(task=task, template=self.template, model=self.model, method=method, shots=k,
                         seed=seed, order=order, dtype=self.dtype, **extra)


class IclRunSpec(RunSpecBase):
    """Everything a `iclsft-eval icl` run computes."""

    kind: Literal["icl"] = "icl"

    @property
    def arm(self) -> str:
        return "icl"

    def conditions(self) -> list[Condition]:
        return [self._condition(task, k, seed, "icl", order) for task in self.tasks for order in self.orders
                for seed in self.seeds for k in self.shots]


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SftSpec(Frozen):
    """Training hyper-parameters (SPEC §6). Everything here is hashed into the adapter's identity."""

    method: Literal[SFT_METHODS] = "lora"
    lr: float = Field(default=1e-3, gt=0)
    epochs: int = Field(default=5, ge=1)
    min_steps: int = Field(default=60, ge=0)  # small K: 2K examples x 5 epochs is only a few steps
    batch_size: int = Field(default=8, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    # "bf16-mixed": fp32 weights and optimizer state, forward/backward under bf16 autocast. It changes
    # results, so it enters ids.
    precision: Literal[PRECISIONS] = "fp32"
    # Memory knobs that leave out no id: checkpointing recomputes activations exactly; `workers` > 1
    # shards a full fine-tune over Ray Train workers (FSDP2), which changes only the reduction order
    # (fp32 rounding; tests/test_sft_scale.py bounds it). Never serialized, so never hashed.
    gradient_checkpointing: bool = Field(default=False, exclude=True)
    workers: int = Field(default=1, ge=1, exclude=True)

    @model_validator(mode="after")
    def _lora_fields(self) -> SftSpec:
        if self.method != "lora" and (self.lora_r, self.lora_alpha, self.lora_dropout, self.target_modules) != (
            8, 16.0, 0.0, DEFAULT_TARGETS
        ):
            raise ValueError(f"LoRA settings apply to method 'lora' only, not {self.method!r}")
        if self.workers > 1 and self.method == "lora":
            raise ValueError(f"workers {self.workers} applies to full fine-tunes only (sharded training); LoRA "
                             "trains in one process: use workers 1 or method full / full-frozen-unembed")
        return self


# Defaults per method, from the sweep in docs/sft.md (benchmarks/sft_defaults.py).
METHOD_DEFAULTS: dict[str, dict] = {
    "lora": {"lr": 1e-3},
    "full": {"lr": 3e-5},
    "full-frozen-unembed": {"lr": 3e-5},
}


def sft_spec(method: str = "lora", **overrides) -> SftSpec:
    """An SftSpec with the method's defaults, then the given overrides."""
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown SFT method {method!r}; choose one of {', '.join(METHOD_DEFAULTS)}")
    return SftSpec(method=method, **{**METHOD_DEFAULTS[method], **overrides})


class ExecutorSpec(Frozen):
    """Where trainings run (transport: not part of any identity)."""

    name: Literal[EXECUTORS] = "ray"
    ray_address: str | None = None
    cpus_per_task: int = Field(default=1, ge=1)
    max_retries: int = Field(default=2, ge=0)


class SftRunSpec(RunSpecBase):
    """Everything a `iclsft-eval sft` run computes: one model per (task, K, seed), scored zero-shot."""

    kind: Literal["sft"] = "sft"
    sft: SftSpec = SftSpec()
    checkpoints: tuple[float, ...] = (1.0,)
    executor: ExecutorSpec = ExecutorSpec()
    # what is kept of full fine-tunes once read (iclsft.sft.retention); not part of any identity
    checkpoints_keep: Literal[CHECKPOINTS_KEEP] = "all"
    retrain_deleted: bool = False

    TRANSPORT: ClassVar[set[str]] = {"engine", "executor", "tokens", "checkpoints_keep", "retrain_deleted"}

    @property
    def training(self) -> SftSpec:
        return self.sft

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [f for f in v if not 0 < f <= 1]
        if not v or bad:
            raise ValueError(f"checkpoint fractions {v!r} must lie in (0, 1] (e.g. 0.25,0.5,1)")
        return tuple(sorted(set(float(f) for f in v)))

    @property
    def arm(self) -> str:
        return f"sft-{self.sft.method}"

    def conditions(self) -> list[Condition]:
        return [
            self._condition(task, k, seed, self.sft.method, order, sft=self.sft, checkpoint=f)
            for task in self.tasks
            for order in self.orders
            for seed in self.seeds
            for k in self.shots
            for f in self.checkpoints
        ]


class Condition(ConditionBase):
    """One cell of a 2D arm: its id is the hash of all of these fields."""

    STUDY: ClassVar[str] = "linear2d"

    task: TaskSpec
    template: TemplateSpec
    model: ModelSpec
    method: str
    shots: int
    seed: int
    order: str
    dtype: str
    sft: SftSpec | None = None
    checkpoint: float | None = None  # fraction of training, for SFT conditions

    @property
    def label(self) -> str:
        """What a progress line calls it: every field that tells the conditions of a sweep apart."""
        words = f" ({self.task.words})" if self.task.words else ""
        ckpt = f" ckpt {self.checkpoint:g}" if self.checkpoint is not None else ""
        return (f"{self.task.name}{words} angle {self.task.angle:g} order {self.order} {self.method} K={self.shots} "
                f"seed {self.seed}{ckpt}")

    @property
    def dirname(self) -> str:
        """Readable and unique: the hash keeps conditions that differ elsewhere apart."""
        angle = f"{self.task.angle:g}"
        ckpt = f"-c{self.checkpoint:g}" if self.checkpoint is not None and self.checkpoint != 1.0 else ""
        return f"{self.task.name}-a{angle}-{self.method}-K{self.shots}-s{self.seed}{ckpt}-{self.id[-8:]}"

    @property
    def queries(self) -> int:
        return (GRID // self.task.grid_step) ** 2

    @property
    def prompt_examples(self) -> int:
        return 2 * self.shots if self.method == "icl" else 0

    @property
    def chain(self) -> tuple:
        return (self.task, self.seed, self.order)

    @property
    def chain_rank(self) -> tuple:
        return (self.shots,)

    def row(self) -> dict:
        """The columns that identify this condition in result tables."""
        return {
            "condition": self.id,
            "task": self.task.name,
            "angle": self.task.angle,
            "method": self.method,
            "shots": self.shots,
            "seed": self.seed,
            "order": self.order,
            "model": self.model.name,
            "dtype": self.dtype,
            "checkpoint": self.checkpoint,  # None for ICL
        }
