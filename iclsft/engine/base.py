"""The engine protocol: label log-probs for many queries that share one prefix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Engine(Protocol):
    """Scores label continuations.

    `score` returns an array of shape (len(queries), len(labels)) holding, for each query, the
    full-vocabulary log-probability of each label's token sequence after prefix + query (the exact
    sum over the label's tokens). `adapter` names a fine-tuned adapter directory, or None for the
    base model.
    """

    def score(
        self,
        prefix: Sequence[int],
        queries: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        adapter: str | None = None,
    ) -> np.ndarray: ...

    def release(self, adapter: str | None) -> None:
        """Free what the engine holds for `adapter` once its conditions are scored."""


ENGINES = ("hf",)


def make_engine(name: str, model, **options) -> Engine:
    """Build an engine by name around a loaded HF model (heavy imports stay lazy)."""
    if name == "hf":
        from iclsft.engine.hf import HFEngine

        return HFEngine(model, **options)
    raise ValueError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")
