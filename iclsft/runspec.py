"""Building a run spec from user inputs: validate everything, then resolve the model."""

from __future__ import annotations

from collections.abc import Sequence

from iclsft.models import ModelRef, resolve_model
from iclsft.scoring import check_shots
from iclsft.spec import EngineSpec, ModelSpec, RunSpecBase, TaskSpec, TemplateSpec
from iclsft.tasks import linear2d


def make_spec(
    spec_cls: type[RunSpecBase],
    *,
    model: str = "smollm2-135m",
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
    the semantic task's word list (None: its default)."""
    tasks = tuple(
        TaskSpec(name=task, angle=a, labels=tuple(labels), swap_labels=swap_labels, grid_step=grid_step, words=words)
        for a in angles
    )
    for order in orders:
        linear2d.check_order(order)
    check_shots(tasks, shots)
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
