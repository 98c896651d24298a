"""The ICL workload the engine benchmarks time (benchmarks/profile_engine.py, prefix_kernels.py): one
model's prompt builder, a fixed sample of 2D grid queries at 45°, and the prefix of K exemplars per class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iclsft.models import ModelRef, resolve_model
from iclsft.prompts import PromptBuilder
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks import linear2d


@dataclass(frozen=True)
class GridSample:
    ref: ModelRef
    task: TaskSpec
    builder: PromptBuilder
    queries: list  # token ids of each sampled query

    def prefix(self, shots: int) -> list[int]:
        """The ICL prompt of `shots` exemplars per class (seed 0)."""
        ex = linear2d.exemplars(self.task, 0, shots)
        return self.builder.prefix(ex.n1, ex.n2, ex.truth)


def grid_sample(model: str, queries: int, seed: int = 0) -> GridSample:
    """`queries` grid points drawn without replacement (in grid order) and tokenized for `model`."""
    from transformers import AutoTokenizer

    ref = resolve_model(model)
    task = TaskSpec(angle=45.0)
    builder = PromptBuilder(AutoTokenizer.from_pretrained(ref.path), TemplateSpec(), task.labels)
    grid = linear2d.queries(task)
    pick = np.sort(np.random.default_rng(seed).choice(len(grid), queries, replace=False))
    return GridSample(ref, task, builder, builder.queries(grid.n1.values[pick], grid.n2.values[pick]))
