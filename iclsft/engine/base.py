"""The engine contract: what every engine (hf, vllm, vllm-server) does, and the factory.

An engine holds one base model and scores or continues token-id prompts that share a prefix:
`score` (the exact log-probability of each label after prefix + query), `generate` (greedy
continuations), `release` (free what an adapter holds), `check_model` (prove it holds the run's
model) and `close`; engines that can (`can_load_weights`) also swap a full fine-tune's weights into their
live model (`load_weights`). Callers use these only; everything else is an engine's own business.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iclsft.names import ENGINES
from iclsft.spec import EngineSpec


class Engine(ABC):
    """Scores label continuations and generates greedy ones, for the base model or a LoRA adapter.

    `adapter` names a fine-tuned adapter directory (peft), or None for the base model."""

    name: str  # the engine's name in ENGINES, for messages

    @abstractmethod
    def score(self, prefix: Sequence[int], queries: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
              adapter: str | None = None) -> np.ndarray:
        """Array of shape (len(queries), len(labels)): for each query, the full-vocabulary
        log-probability of each label's token sequence after prefix + query (the exact sum over the
        label's tokens)."""

    @abstractmethod
    def generate(self, prefix: Sequence[int], queries: Sequence[Sequence[int]], *, stop_ids: Sequence[int],
                 max_new_tokens: int, adapter: str | None = None) -> list[list[int]]:
        """Greedy continuation of prefix + each query: the new tokens up to the first token in
        `stop_ids` (left out) or `max_new_tokens` tokens, in the order of `queries`. The model's own
        end-of-sequence token stops it only when it is in `stop_ids`."""

    @abstractmethod
    def release(self, adapter: str | None) -> None:
        """Free what the engine holds for `adapter` once its conditions are scored."""

    @abstractmethod
    def check_model(self, path: str | Path, fingerprint: str) -> None:
        """Raise ValueError unless the engine holds the model at `path` (same directory, or the same
        content `fingerprint`: iclsft.models.fingerprint)."""

    @abstractmethod
    def close(self) -> None:
        """Free the model and everything the engine started; the engine is not used afterwards."""

    # Full fine-tunes: an engine that can swap a checkpoint's weights into its live model scores every
    # checkpoint of a full fine-tune arm with one engine start (iclsft.arms.scorer); the others open a new
    # engine per checkpoint.
    can_load_weights = False

    def load_weights(self, path: str | Path) -> None:
        """Replace the model's weights with those of the full fine-tune in the model directory `path`
        (same architecture), dropping every cache; afterwards `check_model` is against `path`."""
        raise ValueError(f"the {self.name} engine cannot swap weights into its model; open an engine on {path}")


def check_generate_args(engine: str, queries: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """The checks every engine's `generate` makes on its input, with one message for all."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r} ({engine} engine)")
    empty = [i for i, q in enumerate(queries) if len(q) == 0]
    if empty:
        raise ValueError(f"query {empty[0]} has no tokens: every query needs at least one token ({engine} engine)")


def check_model_dir(engine: str, source: str | Path | None, path: str | Path, fingerprint: str) -> None:
    """`check_model` for an engine that loaded its model from the directory `source`."""
    from iclsft.models import fingerprint as model_fingerprint

    if source is None or not Path(source).is_dir():
        raise ValueError(f"the {engine} engine cannot tell which model it holds: it was not loaded from a model "
                         f"directory ({source!r}); open it with open_engine(spec, model_path) to check it")
    if Path(source).resolve() == Path(path).resolve():
        return
    found = model_fingerprint(Path(source))
    if found != fingerprint:
        raise ValueError(f"the {engine} engine holds the model at {source} (fingerprint {found}), not the run's "
                         f"model {path} (fingerprint {fingerprint})")


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
        from iclsft.engine.hf import HFEngine

        return HFEngine
    if name == "vllm":
        from iclsft.engine.vllm_engine import VLLMEngine

        return VLLMEngine
    if name == "vllm-server":
        from iclsft.engine.vllm_server import VLLMServerEngine

        return VLLMServerEngine
    raise ValueError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")


def open_engine(engine: EngineSpec, model_path: str | Path, dtype: str = "float32", *, progress: bool = True,
                lora_rank: int | None = None) -> Engine:
    """Build the engine `engine.name` for the model directory `model_path` (heavy imports stay lazy).
    `lora_rank`: the largest adapter rank it will be asked to score (None: base model only)."""
    if engine.name == "hf":
        from iclsft.engine.hf import HFEngine
        from iclsft.models import ModelRef, load_model

        model, _ = load_model(ModelRef(name=str(model_path), path=Path(model_path), fingerprint=""), dtype,
                              device_map=engine.device_map)
        return HFEngine(model, token_budget=engine.token_budget, threads=engine.threads, progress=progress,
                        source=model_path, workers=engine.workers)
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
