"""Specs of the implicit-pattern suite (SPEC §8): one frozen spec per arm, one condition per cell.

An arm is one method: `icl` (K solved demos in the prompt, K in `shots`) or an SFT method (`lora`,
`full`: one model per (task, seed) trained on `train_size` pattern-holds items, scored zero-shot).
Every condition is evaluated on the same matched evaluation set of its (task, variant, seed): ICL at
each K and the fine-tuned models see exactly the same questions, in both variants.
"""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from iclsft.spec import HASH_VERSION, EngineSpec, ExecutorSpec, Frozen, ModelSpec, SftSpec

IMPLICIT_TASKS = ("expression", "relation", "boolean", "code")
VARIANTS = ("holds", "broken")
IMPLICIT_METHODS = ("icl", "lora", "full")
MAX_SHOTS = 64  # the demo stream's length: prompts at every K are token prefixes of one stream
TaskName = Literal["expression", "relation", "boolean", "code"]


class ImplicitCondition(Frozen):
    """One cell: its id is the hash of all of these fields."""

    suite: Literal["implicit"] = "implicit"
    task: TaskName
    variant: Literal["holds", "broken"]
    model: ModelSpec
    method: str
    shots: int  # ICL demos; 0 for fine-tuned models (scored zero-shot)
    seed: int
    train_size: int  # fixes the evaluation set too: it is kept disjoint from the training items
    eval_size: int
    faithful: bool
    dtype: str
    sft: SftSpec | None = None

    @property
    def id(self) -> str:
        blob = json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))
        return f"{HASH_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    @property
    def dirname(self) -> str:
        k = f"-K{self.shots}" if self.method == "icl" else f"-n{self.train_size}"
        return f"{self.task}-{self.variant}-{self.method}{k}-s{self.seed}-{self.id[-8:]}"

    def row(self) -> dict:
        return {"condition": self.id, "task": self.task, "variant": self.variant, "method": self.method,
                "shots": self.shots, "seed": self.seed, "train_size": self.train_size, "eval_size": self.eval_size,
                "model": self.model.name, "dtype": self.dtype, "faithful": self.faithful}


class ImplicitSpec(Frozen):
    """Everything one arm of the suite computes."""

    kind: Literal["implicit"] = "implicit"
    hash_version: str = HASH_VERSION
    model: ModelSpec
    method: Literal["icl", "lora", "full"] = "icl"
    tasks: tuple[TaskName, ...] = IMPLICIT_TASKS
    shots: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)
    seeds: tuple[int, ...] = (0,)
    train_size: int = Field(default=1000, ge=1, le=100_000)
    eval_size: int = Field(default=200, ge=1, le=100_000)
    faithful: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    sft: SftSpec | None = None
    engine: EngineSpec = EngineSpec()
    executor: ExecutorSpec = ExecutorSpec()

    TRANSPORT: ClassVar[set[str]] = {"engine", "executor"}

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"name at least one task of {', '.join(IMPLICIT_TASKS)}")
        return tuple(dict.fromkeys(v))

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [k for k in v if not 0 <= k <= MAX_SHOTS]
        if not v or bad:
            raise ValueError(f"shot count {bad[0] if bad else None} is not allowed: demos must be in 0..{MAX_SHOTS}")
        return tuple(sorted(set(v)))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("name at least one seed")
        return tuple(dict.fromkeys(v))

    @model_validator(mode="after")
    def _method(self) -> ImplicitSpec:
        if self.method == "icl" and self.sft is not None:
            raise ValueError("the icl arm takes no SFT settings")
        if self.method != "icl" and (self.sft is None or self.sft.method != self.method):
            raise ValueError(f"the {self.method} arm needs SFT settings of method {self.method!r}")
        return self

    @property
    def arm(self) -> str:
        return f"implicit-{self.method}"

    def identity(self) -> dict:
        return self.model_dump(mode="json", exclude=self.TRANSPORT)

    def conditions(self) -> list[ImplicitCondition]:
        shots = self.shots if self.method == "icl" else (0,)
        return [
            ImplicitCondition(task=task, variant=variant, model=self.model, method=self.method, shots=k, seed=seed,
                              train_size=self.train_size, eval_size=self.eval_size, faithful=self.faithful,
                              dtype=self.dtype, sft=self.sft)
            for task in self.tasks
            for seed in self.seeds
            for k in shots
            for variant in VARIANTS
        ]
