"""Building an arm's frozen spec from user inputs: validate everything, then resolve the model
(nothing is written). One builder per study: `make_spec` (the 2D arms), `make_implicit_spec`."""

from __future__ import annotations

from collections.abc import Sequence

from iclsft.implicit.spec import ImplicitSpec
from iclsft.models import ModelRef, resolve_model
from iclsft.names import DEFAULT_MODEL
from iclsft.spec import (
    EngineSpec,
    ExecutorSpec,
    IclRunSpec,
    ModelSpec,
    RunSpecBase,
    SftRunSpec,
    SftSpec,
    TaskSpec,
    TemplateSpec,
    sft_spec,
)
from iclsft.tasks import linear2d

# One pass over hundreds to thousands of items (the study: ~100 steps of batch 16), not the 2D
# arm's 5 epochs over 2K exemplars.
IMPLICIT_SFT_DEFAULTS = {"epochs": 1, "min_steps": 0}
# The study's full fine-tuning (notes/implicit-patterns-facts.md §5): lr 1e-5, effective batch 16,
# 20 warm-up steps of the ~100 it evaluated (here a ratio); one pass over 4 x 400 items = 100 steps.
ORIGINAL_SFT_DEFAULTS = {"lr": 1e-5, "epochs": 1, "min_steps": 0, "batch_size": 16, "warmup_ratio": 0.2}


def make_spec(
    spec_cls: type[RunSpecBase],
    *,
    model: str = DEFAULT_MODEL,
    task: str = "linear2d",
    angles: Sequence[float] = (45.0,),
    shots: Sequence[int] = (1, 2, 5, 10),
    seeds: Sequence[int] = (0,),
    labels: tuple[str, str] = (" Baz", " Rud"),
    swap_labels: bool = False,
    grid_step: int = 1,
    words: str | None = None,
    orders: Sequence[str] = ("random",),
    dtype: str = "float32",
    template: TemplateSpec | None = None,
    engine: EngineSpec | None = None,
    **arm_fields,
):
    """Validate the inputs, resolve the model, and build the frozen spec of `spec_cls` (nothing is
    written). `arm_fields` are the arm's own fields (e.g. `sft`, `checkpoints`, `executor`); `words` is
    the task's word list (None: its default)."""
    tasks = tuple(
        TaskSpec(name=task, angle=a, labels=tuple(labels), swap_labels=swap_labels, grid_step=grid_step, words=words)
        for a in angles
    )
    for order in orders:
        linear2d.check_order(order)
    linear2d.check_shots(tasks, shots)
    spec = spec_cls(  # validates every field before the model is touched
        tasks=tasks,
        template=template or TemplateSpec(),
        model=ModelSpec(name=model, fingerprint="unresolved"),
        shots=tuple(shots),
        seeds=tuple(seeds),
        orders=tuple(orders),
        dtype=dtype,
        engine=engine or EngineSpec(),
        **{k: v for k, v in arm_fields.items() if v is not None},
    )
    ref: ModelRef = resolve_model(model)
    return spec.model_copy(update={"model": ModelSpec(name=model, fingerprint=ref.fingerprint)}), ref


def make_icl_spec(**inputs) -> tuple[IclRunSpec, ModelRef]:
    """The ICL arm's spec (see `make_spec` for the inputs)."""
    return make_spec(IclRunSpec, **inputs)


def make_sft_spec(*, sft: SftSpec | None = None, checkpoints: Sequence[float] = (1.0,),
                  executor: ExecutorSpec | None = None, **inputs) -> tuple[SftRunSpec, ModelRef]:
    """An SFT arm's spec (see `make_spec` for the inputs)."""
    return make_spec(SftRunSpec, sft=sft, checkpoints=tuple(checkpoints), executor=executor, **inputs)


def make_implicit_spec(*, model: str = DEFAULT_MODEL, method: str = "icl", sft: dict | None = None,
                       engine: EngineSpec | None = None, executor: ExecutorSpec | None = None,
                       recipe: str = "ours", **fields):
    """The spec of one arm of the implicit suite. recipe="original" (method full only): the study's
    fine-tuning, ORIGINAL_SFT_DEFAULTS then `sft`."""
    defaults = ORIGINAL_SFT_DEFAULTS if recipe == "original" else IMPLICIT_SFT_DEFAULTS
    settings = sft_spec(method, **{**defaults, **(sft or {})}) if method != "icl" else None
    spec = ImplicitSpec(model=ModelSpec(name=model, fingerprint="unresolved"), method=method, sft=settings,
                        engine=engine or EngineSpec(), executor=executor or ExecutorSpec(), recipe=recipe, **fields)
    ref = resolve_model(model)
    return spec.model_copy(update={"model": ModelSpec(name=model, fingerprint=ref.fingerprint)}), ref
