"""Specs of the implicit-pattern suite (SPEC §8): one frozen spec per arm, one condition per cell.

An arm is one method: `icl` (K solved demos in the prompt, K in `shots`) or an SFT method (`lora`,
`full`: one model per (task, seed) trained on `train_size` pattern-holds items, scored zero-shot).
Every condition is evaluated on the same matched evaluation set of its (task, variant, seed): ICL at
each K and the fine-tuned models see exactly the same questions, in both variants.

Two fine-tuning recipes (`recipe`): "ours" (default) is the 2D arm's, one model per (task, seed), loss
on the answer tokens; "original" is the study's (notes/implicit-patterns-facts.md §5): one fully
fine-tuned model per seed trained on one mixed file of every task's items, written bare (no
instruction), loss on every token, lr 1e-5; its conditions have method "full-original".
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from iclsft.names import CHECKPOINTS_KEEP, IMPLICIT_METHODS, RECIPES, VARIANTS
from iclsft.spec import ArmSpec, ConditionBase, ExecutorSpec, ModelSpec, SftSpec
from iclsft.tasks import registry
from iclsft.versions import HASH_VERSION

MAX_SHOTS = 64  # the demo stream's length: prompts at every K are token prefixes of one stream


def implicit_tasks() -> tuple[str, ...]:
    """The registered tasks of the suite, in registry order (the mixed file's order)."""
    return registry.names("implicit")


def _task_name(name: str) -> str:
    registry.get(name, "implicit")  # one line naming the allowed tasks otherwise
    return name


class ImplicitCondition(ConditionBase):
    """One cell: its id is the hash of all of these fields."""

    STUDY: ClassVar[str] = "implicit"
    suite: Literal["implicit"] = "implicit"
    task: str
    variant: Literal[VARIANTS]
    model: ModelSpec
    method: str
    shots: int  # ICL demos; 0 for fine-tuned models (scored zero-shot)
    seed: int
    train_size: int  # fixes the evaluation set too: it is kept disjoint from the training items
    eval_size: int
    faithful: bool
    dtype: str
    sft: SftSpec | None = None
    # the original recipe only (None otherwise, so the ids of "ours" stay as they were): the recipe and
    # the tasks whose items make the one mixed training file
    recipe: Literal["original"] | None = None
    mixture: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        """What a progress line calls it."""
        k = f"K={self.shots}" if self.method == "icl" else f"n={self.train_size}"
        return f"{self.task} {self.variant} {self.method} {k} seed {self.seed}"

    @property
    def dirname(self) -> str:
        k = f"-K{self.shots}" if self.method == "icl" else f"-n{self.train_size}"
        return f"{self.task}-{self.variant}-{self.method}{k}-s{self.seed}-{self.id[-8:]}"

    def row(self) -> dict:
        return {"condition": self.id, "task": self.task, "variant": self.variant, "method": self.method,
                "shots": self.shots, "seed": self.seed, "train_size": self.train_size, "eval_size": self.eval_size,
                "model": self.model.name, "dtype": self.dtype, "faithful": self.faithful,
                "recipe": self.recipe or "ours"}

    @property
    def checkpoint(self) -> float | None:
        """A fine-tuned condition is scored on its model's final checkpoint (fraction 1); ICL on the base."""
        return None if self.method == "icl" else 1.0

    @property
    def queries(self) -> int:
        return self.eval_size

    @property
    def prompt_examples(self) -> int:
        return self.shots if self.method == "icl" else 0

    @property
    def chain(self) -> tuple:
        return (self.task, self.seed)  # both variants' items after the same prompt

    @property
    def chain_rank(self) -> tuple:
        return (self.shots, self.variant)

    @property
    def training_group(self) -> tuple:
        """Conditions with the same group are scored on one trained model."""
        return (self.mixture or self.task, self.seed)


class ImplicitSpec(ArmSpec):
    """Everything one arm of the suite computes."""

    kind: Literal["implicit"] = "implicit"
    hash_version: str = HASH_VERSION
    method: Literal[IMPLICIT_METHODS] = "icl"
    tasks: tuple[str, ...] = ("expression", "relation", "boolean", "code")
    shots: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)
    train_size: int = Field(default=1000, ge=1, le=100_000)
    eval_size: int = Field(default=200, ge=1, le=100_000)
    faithful: bool = False
    sft: SftSpec | None = None
    recipe: str = "ours"
    executor: ExecutorSpec = ExecutorSpec()
    checkpoints_keep: Literal[CHECKPOINTS_KEEP] = "all"  # as SftRunSpec's (iclsft.sft.retention)
    retrain_deleted: bool = False

    TRANSPORT: ClassVar[set[str]] = {"engine", "executor", "checkpoints_keep", "retrain_deleted"}

    @property
    def training(self) -> SftSpec | None:
        return self.sft

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: str) -> str:
        if v not in RECIPES:
            raise ValueError(f"recipe {v!r} is not allowed: choose one of {', '.join(RECIPES)}")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"name at least one task of {', '.join(implicit_tasks())}")
        return tuple(dict.fromkeys(_task_name(t) for t in v))

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [k for k in v if not 0 <= k <= MAX_SHOTS]
        if not v or bad:
            raise ValueError(f"shot count {bad[0] if bad else None} is not allowed: demos must be in 0..{MAX_SHOTS}")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _method(self) -> ImplicitSpec:
        if self.method == "icl" and self.sft is not None:
            raise ValueError("the icl arm takes no SFT settings")
        if self.method != "icl" and (self.sft is None or self.sft.method != self.method):
            raise ValueError(f"the {self.method} arm needs SFT settings of method {self.method!r}")
        if self.recipe == "original" and self.method != "full":
            raise ValueError(f"recipe 'original' is full fine-tuning, not method {self.method!r}: use method full")
        return self

    @property
    def label(self) -> str:
        """The method as result tables name it: "full-original" for the original recipe."""
        return f"{self.method}-original" if self.recipe == "original" else self.method

    @property
    def arm(self) -> str:
        return f"implicit-{self.label}"

    @property
    def examples_per_model(self) -> int:
        """Training items of one model: every task's `train_size` items for the mixed file."""
        return self.train_size * (len(self.tasks) if self.recipe == "original" else 1)

    def conditions(self) -> list[ImplicitCondition]:
        shots = self.shots if self.method == "icl" else (0,)
        mixture = tuple(t for t in implicit_tasks() if t in self.tasks)  # one order, whatever order was asked
        original = {"recipe": "original", "mixture": mixture} if self.recipe == "original" else {}
        return [
            ImplicitCondition(task=task, variant=variant, model=self.model, method=self.label, shots=k, seed=seed,
                              train_size=self.train_size, eval_size=self.eval_size, faithful=self.faithful,
                              dtype=self.dtype, sft=self.sft, **original)
            for task in self.tasks
            for seed in self.seeds
            for k in shots
            for variant in VARIANTS
        ]
