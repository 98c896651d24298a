"""What the SFT benchmarks (sft_step, sft_scale, sft_heap) train on: a known model and the linear2d
training examples of one angle at K shots per class (seed 0, random order), as the SFT arm builds them."""

from __future__ import annotations

from iclsft.arms.linear2d import training_examples
from iclsft.models import resolve_model
from iclsft.prompts import builder_key, prompt_builders
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks import linear2d


def linear2d_examples(model: str, angle: float, shots: int):
    """(the model's ModelRef, the SFT arm's training examples for linear2d at `angle`, K = `shots`)."""
    from transformers import AutoTokenizer

    ref = resolve_model(model)
    task = TaskSpec(angle=angle)
    builder = prompt_builders(AutoTokenizer.from_pretrained(ref.path), TemplateSpec(), (task,))[builder_key(task)]
    return ref, training_examples(builder, linear2d.exemplars(task, 0, shots, "random"))
