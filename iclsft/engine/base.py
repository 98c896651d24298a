"""Opening engines: `resolve_engine` (what `auto` means on this machine), `engine_class` (what an engine
can do before one is opened: `can_load_weights`) and `open_engine`. The contract every engine (hf, vllm,
vllm-server) implements, `Engine`, is `iclsft.engine.contract`'s (re-exported here); the engines build on
it, this module builds them: only the hf engine, which imports torch, is imported when it is asked for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from iclsft import models
from iclsft.engine.contract import Engine
from iclsft.engine.vllm_engine import VLLMEngine
from iclsft.engine.vllm_options import options_from
from iclsft.engine.vllm_server import VLLMServerEngine
from iclsft.names import ENGINES
from iclsft.spec import EngineSpec

__all__ = ["Engine", "engine_class", "open_engine", "resolve_engine"]


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


def engine_class(name: str) -> type[Engine]:
    """The class of the engine called `name`, for what it can do before one is opened (`can_load_weights`)."""
    if name == "hf":
        from iclsft.engine.hf import HFEngine  # torch: imported only for the hf engine

        return HFEngine
    if name == "vllm":
        return VLLMEngine
    if name == "vllm-server":
        return VLLMServerEngine
    raise ValueError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")


def open_engine(engine: EngineSpec, model_path: str | Path, dtype: str = "float32", *, progress: bool = True,
                lora_rank: int | None = None) -> Engine:
    """Build the engine `engine.name` for the model directory `model_path` (heavy imports stay lazy).
    `lora_rank`: the largest adapter rank it will be asked to score (None: base model only)."""
    if engine.name == "hf":
        model, _ = models.load_model(models.ModelRef(name=str(model_path), path=Path(model_path), fingerprint=""),
                                     dtype, device_map=engine.device_map)
        return engine_class("hf")(model, token_budget=engine.token_budget, threads=engine.threads,
                                  progress=progress, source=model_path, workers=engine.workers)
    if engine.name == "vllm":
        rank = engine.max_lora_rank or lora_rank
        return VLLMEngine(model_path, dtype=dtype, lora_rank=rank, options=options_from(engine), progress=progress)
    if engine.name == "vllm-server":
        return VLLMServerEngine(engine.url, api_key=engine.api_key, timeout=engine.timeout, retries=engine.retries,
                                concurrency=engine.concurrency, progress=progress)
    raise ValueError(f"unknown engine {engine.name!r}; available: {', '.join(ENGINES)}")
