"""The engines an arm scores with, for both studies: the base model's engine (opened once, proved to
hold the run's model by its fingerprint), LoRA adapters on that shared base, and full fine-tunes,
each a model of its own. A checkpoint is verified against its marker's checksums before it is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iclsft.engine.base import open_engine
from iclsft.models import ModelRef
from iclsft.sft.checkpoints import verify_checkpoint
from iclsft.spec import EngineSpec


class Scorer:
    """`base()`: the base model's engine; `checkpoint(ckpt, lora)`: what scores a trained checkpoint,
    `release(ckpt)` when its conditions are done."""

    def __init__(self, engine: EngineSpec, ref: ModelRef, dtype: str, *, progress: bool = True,
                 lora_rank: int | None = None):
        self.engine_spec, self.ref, self.dtype = engine, ref, dtype
        self.progress, self.lora_rank = progress, lora_rank
        self._base = None
        self._full: dict[str, Any] = {}

    def base(self):
        if self._base is None:
            self._base = open_engine(self.engine_spec, self.ref.path, self.dtype, progress=self.progress,
                                     lora_rank=self.lora_rank)
            self._base.check_model(self.ref.path, self.ref.fingerprint)  # e.g. a server holding another model
        return self._base

    def checkpoint(self, ckpt: str | Path, lora: bool) -> tuple[Any, str | None]:
        """(engine, adapter) that score a trained checkpoint: a LoRA adapter on the base engine, or a full
        fine-tune in an engine of its own (opened once for all the conditions it serves). A missing or
        damaged checkpoint raises ValueError naming it (its conditions fail; a rerun trains it again)."""
        ckpt = str(ckpt)
        verify_checkpoint(ckpt)  # the one check of every reader of trained models (sft/checkpoints.py)
        if lora:
            return self.base(), ckpt
        if self.engine_spec.name == "vllm-server":
            raise ValueError("the vllm-server engine scores LoRA adapters only; score full fine-tunes with "
                             "--engine hf or vllm")
        if ckpt not in self._full:
            self._full[ckpt] = open_engine(self.engine_spec, ckpt, self.dtype, progress=self.progress)
        return self._full[ckpt], None

    def release(self, ckpt: str | Path) -> None:
        """Free what scoring `ckpt` held, once its conditions are scored."""
        ckpt = str(ckpt)
        if ckpt in self._full:
            self._full.pop(ckpt).close()
        elif self._base is not None:
            self._base.release(ckpt)

    def close(self) -> None:
        for ckpt in list(self._full):
            self._full.pop(ckpt).close()
        if self._base is not None:
            self._base.close()
            self._base = None
