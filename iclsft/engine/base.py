"""Opening engines: `resolve_engine` (what `auto` means on this machine), `engine_class` (what an engine
can do before one is opened: `can_load_weights`) and `open_engine`. The contract every engine (hf, vllm,
vllm-server) implements, `Engine`, is `iclsft.engine.contract`'s (re-exported here); the engines build on
it, this module builds them: only the hf engine, which imports torch, is imported when it is asked for.
An engine of your own joins them with `register_engine` (tests/test_engine_registry.py registers a fake one).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from iclsft import models
from iclsft.engine.contract import Engine
from iclsft.engine.vllm_engine import VLLMEngine
from iclsft.engine.vllm_server import VLLMServerEngine
from iclsft.names import ENGINES, add_engine, engine_choices, engines, remove_engine
from iclsft.spec import EngineSpec

__all__ = ["Engine", "engine_class", "open_engine", "register_engine", "resolve_engine", "unregister_engine"]


def resolve_engine(name: str) -> str:
    """`auto`: vLLM where it is installed and a GPU is present; else `hf`, which on CPUs is the faster
    of the two by far (docs/benchmarks/throughput.md: vLLM's CPU cache blocks make it recompute most of
    each query's tail, and it cannot share tokens between queries)."""
    if name != "auto":
        if name not in engines():
            raise ValueError(f"unknown engine {name!r}; available: {', '.join(engine_choices())}")
        return name
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


Opener = Callable[..., Engine]  # (engine spec, model directory, dtype, *, progress, lora_rank) -> an open engine


def _hf_class() -> type[Engine]:
    from iclsft.engine.hf import HFEngine  # torch: imported only for the hf engine

    return HFEngine


def _open_hf(engine: EngineSpec, path: Path, dtype: str, *, progress: bool, lora_rank: int | None) -> Engine:
    o = engine.hf
    model, _ = models.load_model(models.ModelRef(name=str(path), path=path, fingerprint=""), dtype,
                                 device_map=o.device_map)
    return _hf_class()(model, token_budget=o.token_budget, threads=o.threads, progress=progress, source=path,
                       workers=o.workers, prefix_kernel=o.prefix_kernel)


def _open_vllm(engine: EngineSpec, path: Path, dtype: str, *, progress: bool, lora_rank: int | None) -> Engine:
    return VLLMEngine(path, dtype=dtype, lora_rank=engine.vllm.max_lora_rank or lora_rank, options=engine.vllm,
                      progress=progress)


def _open_server(engine: EngineSpec, path: Path, dtype: str, *, progress: bool, lora_rank: int | None) -> Engine:
    o = engine.server
    return VLLMServerEngine(o.url, api_key=o.api_key, timeout=o.timeout, retries=o.retries,
                            concurrency=o.concurrency, progress=progress)


# name -> (its class, loaded when asked for; how to open one)
_ENGINES: dict[str, tuple[Callable[[], type[Engine]], Opener]] = {
    "hf": (_hf_class, _open_hf),
    "vllm": (lambda: VLLMEngine, _open_vllm),
    "vllm-server": (lambda: VLLMServerEngine, _open_server),
}


def register_engine(name: str, engine: type[Engine], opener: Opener | None = None) -> None:
    """Add an engine of your own under `name` (then `--engine NAME`, `engine: NAME` in configs and specs):
    its class (an `Engine`: what it can do, `can_load_weights`) and `opener(engine_spec, model_dir, dtype, *,
    progress, lora_rank)`, by default `engine(model_dir, dtype=dtype, progress=progress)`. Registered in
    this process: a Ray worker sees it when the module that registers it is imported there too."""
    if name in _ENGINES or name == "auto":
        raise ValueError(f"an engine named {name!r} exists already; choose another name")
    if not (isinstance(engine, type) and issubclass(engine, Engine)):
        raise ValueError(f"engine {name!r} must be a subclass of iclsft.engine.contract.Engine, not {engine!r}")

    def default(spec, path, dtype, *, progress, lora_rank):
        return engine(path, dtype=dtype, progress=progress)

    _ENGINES[name] = (lambda: engine, opener or default)
    add_engine(name)


def unregister_engine(name: str) -> None:
    """Remove an engine `register_engine` added (the built-ins stay)."""
    if name in ENGINES:
        raise ValueError(f"{name!r} is a built-in engine")
    _ENGINES.pop(name, None)
    remove_engine(name)


def engine_class(name: str) -> type[Engine]:
    """The class of the engine called `name`, for what it can do before one is opened (`can_load_weights`)."""
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(engines())}")
    return _ENGINES[name][0]()


def open_engine(engine: EngineSpec, model_path: str | Path, dtype: str = "float32", *, progress: bool = True,
                lora_rank: int | None = None) -> Engine:
    """Build the engine `engine.name` for the model directory `model_path` (heavy imports stay lazy).
    `lora_rank`: the largest adapter rank it will be asked to score (None: base model only)."""
    if engine.name not in _ENGINES:
        raise ValueError(f"unknown engine {engine.name!r}; available: {', '.join(engines())}")
    return _ENGINES[engine.name][1](engine, Path(model_path), dtype, progress=progress, lora_rank=lora_rank)
