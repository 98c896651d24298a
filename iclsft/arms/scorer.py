"""The engines an arm scores with, for both studies: the base model's engine (opened once, proved to
hold the run's model by its fingerprint), LoRA adapters on that shared base, and full fine-tunes.
A full fine-tune's weights are swapped into the live engine where the engine can (hf and vllm: one
engine start for every checkpoint of the arm); an engine that cannot gets one engine per checkpoint.
A checkpoint is verified against its marker's checksums before it is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iclsft.engine.base import engine_class, open_engine
from iclsft.models import ModelRef
from iclsft.sft.checkpoints import verify_checkpoint
from iclsft.spec import EngineSpec


class Scorer:
    """`base()`: the base model's engine; `checkpoint(ckpt, lora)`: what scores a trained checkpoint,
    `release(ckpt)` when its conditions are done. `starts`: engines opened so far."""

    def __init__(self, engine: EngineSpec, ref: ModelRef, dtype: str, *, progress: bool = True,
                 lora_rank: int | None = None):
        self.engine_spec, self.ref, self.dtype = engine, ref, dtype
        self.progress, self.lora_rank = progress, lora_rank
        self.starts = 0
        self._engine = None  # on the base model, or on the full fine-tune `_weights` swapped into it
        self._weights: str | None = None
        self._full: dict[str, Any] = {}  # engines of their own, for engines that cannot swap weights

    def _open(self, path: str | Path, **options):
        self.starts += 1
        return open_engine(self.engine_spec, path, self.dtype, progress=self.progress, **options)

    def _live(self):
        if self._engine is None:
            self._engine = self._open(self.ref.path, lora_rank=self.lora_rank)
            self._engine.check_model(self.ref.path, self.ref.fingerprint)  # e.g. a server holding another model
        return self._engine

    def base(self):
        """The engine on the base model (its weights back in place if a fine-tune's were swapped in)."""
        engine = self._live()
        if self._weights is not None:
            engine.load_weights(self.ref.path)
            self._weights = None
        return engine

    def checkpoint(self, ckpt: str | Path, lora: bool) -> tuple[Any, str | None]:
        """(engine, adapter) that score a trained checkpoint: a LoRA adapter on the base engine, or a full
        fine-tune (its weights swapped into the live engine, or an engine of its own, opened once for all
        the conditions it serves). A missing or damaged checkpoint raises ValueError naming it (its
        conditions fail; a rerun trains it again)."""
        ckpt = str(ckpt)
        verify_checkpoint(ckpt)  # the one check of every reader of trained models (sft/checkpoints.py)
        if lora:
            return self.base(), ckpt
        if self.engine_spec.name == "vllm-server":
            raise ValueError("the vllm-server engine scores LoRA adapters only; score full fine-tunes with "
                             "--engine hf or vllm")
        if engine_class(self.engine_spec.name).can_load_weights:  # decided before any engine is opened
            engine = self._live()
            if self._weights != ckpt:
                engine.load_weights(ckpt)
                self._weights = ckpt
            return engine, None
        if ckpt not in self._full:
            self._full[ckpt] = self._open(ckpt)
        return self._full[ckpt], None

    def release(self, ckpt: str | Path) -> None:
        """Free what scoring `ckpt` held, once its conditions are scored."""
        ckpt = str(ckpt)
        if ckpt in self._full:
            self._full.pop(ckpt).close()
        elif self._engine is not None and ckpt != self._weights:
            self._engine.release(ckpt)

    def close(self) -> None:
        for ckpt in list(self._full):
            self._full.pop(ckpt).close()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
