"""The engine protocol: label log-probs for many queries that share one prefix; and the factory."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from iclsft.spec import ENGINES, EngineSpec


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


def resolve_engine(name: str) -> str:
    """`auto`: vLLM where it is installed and a GPU is present; else `hf`, which on CPUs is the faster
    of the two by far (docs/benchmarks/throughput.md: vLLM's CPU cache blocks make it recompute most of
    each query's tail, and it cannot share tokens between queries)."""
    if name != "auto":
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r}; available: auto, {', '.join(ENGINES)}")
        return name
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def open_engine(engine: EngineSpec, model_path: str | Path, dtype: str = "float32", *, progress: bool = True,
                lora_rank: int | None = None) -> Engine:
    """Build the engine `engine.name` for the model directory `model_path` (heavy imports stay lazy).
    `lora_rank`: the largest adapter rank it will be asked to score (None: base model only)."""
    if engine.name == "hf":
        from iclsft.engine.hf import HFEngine
        from iclsft.models import ModelRef, load_model

        model, _ = load_model(ModelRef(name=str(model_path), path=Path(model_path), fingerprint=""), dtype,
                              device_map=engine.device_map)
        return HFEngine(model, token_budget=engine.token_budget, threads=engine.threads, progress=progress)
    if engine.name == "vllm":
        from iclsft.engine.vllm_engine import VLLMEngine

        rank = engine.max_lora_rank or lora_rank
        from iclsft.engine.vllm_options import options_from

        return VLLMEngine(model_path, dtype=dtype, lora_rank=rank, options=options_from(engine), progress=progress)
    if engine.name == "vllm-server":
        from iclsft.engine.vllm_server import VLLMServerEngine

        return VLLMServerEngine(engine.url, api_key=engine.api_key, timeout=engine.timeout, retries=engine.retries,
                                concurrency=engine.concurrency, progress=progress)
    raise ValueError(f"unknown engine {engine.name!r}; available: {', '.join(ENGINES)}")


def close_engine(engine) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()
