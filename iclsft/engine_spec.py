"""The engine spec: an engine's name and one options model per built-in engine (transport: none of
these may change results beyond float noise, so none is hashed). Each option is declared once, here,
with its help text; the CLI's engine options (`iclsft.cli.engine_options`) and `vllm.LLM`'s keyword
arguments (`iclsft.engine.vllm_options`) are built from these models.

Users give options flat (`--kv-cache-gib 2`, a sweep's `engine_options: {kv_cache_gib: 2}`):
`EngineSpec.of` puts each into its engine's model and refuses one that the chosen engine does not read.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from iclsft.frozen import Frozen
from iclsft.names import PREFIX_KERNELS, VLLM_DTYPES, engines


class HFOptions(Frozen):
    """The packed hf engine (iclsft.engine.hf)."""

    token_budget: int | None = Field(
        default=None, ge=16,
        description="hf engine: tokens per packed forward pass (default: 1024 on CPUs, from free memory on CUDA; "
                    "docs/large_models.md).")
    threads: int | None = Field(default=None, ge=1, description="hf engine: torch CPU threads (default: torch's).")
    workers: int | None = Field(
        default=None, ge=1, json_schema_extra={"flag": "--batch-workers"},
        description="hf on CPUs: packed batches scored at once, torch's threads shared out (default 1; 2 on a "
                    "2-core machine that other jobs share was 1.3-1.9x faster: docs/throughput.md).")
    prefix_kernel: Literal[PREFIX_KERNELS] = Field(
        default="flash",
        description="hf engine on CPUs: the prefix attention, torch's flash kernel or GEMMs around an fp32 softmax "
                    "(in bf16 on CPUs with native bf16 1.1-1.3x the q/s at K=200, its q.k products rounded to bf16: "
                    "docs/throughput.md).")
    device_map: str | None = Field(
        default=None, pattern=r"^(auto|balanced|balanced_low_0|sequential|cpu|cuda(:\d+)?)$",
        description="hf engine: spread the model over GPUs ('auto', 'balanced', 'sequential') or put it on one "
                    "device ('cuda:1'); default: one device (docs/large_models.md).")


class VLLMOptions(Frozen):
    """The in-process vLLM engine (iclsft.engine.vllm_engine) and `serve`; None: chosen for the device
    and the prompts (iclsft.engine.vllm_options.resolve, docs/vllm.md)."""

    max_model_len: int | None = Field(
        default=None, ge=16,
        description="vllm: longest sequence (default: the longest read plus its labels, at least 2048).")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs per engine.")
    max_num_seqs: int | None = Field(default=None, ge=1, description="vllm: sequences at once (default: vLLM's).")
    enforce_eager: bool = Field(default=False, description="vllm: no CUDA-graph capture (faster start).")
    dtype: Literal[VLLM_DTYPES] | None = Field(
        default=None, json_schema_extra={"flag": None},  # a run's engine takes its arm's dtype (--dtype)
        description="vllm: weights' dtype (default: bf16 on GPUs, fp32 on CPUs).")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1,
                                                 description="vllm on GPUs: memory fraction (default 0.9).")
    max_loras: int = Field(default=1, ge=1, description="vllm: adapters per batch.")
    max_cpu_loras: int | None = Field(default=None, ge=1,
                                      description="vllm: adapters kept in memory (default: max(4, --max-loras)).")
    max_lora_rank: int | None = Field(default=None, ge=1, le=512,
                                      description="vllm: largest adapter rank (default: the run's).")
    block_size: int | None = Field(default=None, ge=16, multiple_of=16,
                                   description="vllm: KV cache block size, the prefix cache's granularity "
                                               "(default: 32 on CPUs, the attention backend's on GPUs).")
    kv_cache_gib: float | None = Field(default=None, gt=0, description="vllm on CPUs: KV cache GiB (default 4).")

    @model_validator(mode="after")
    def _cpu_loras(self) -> VLLMOptions:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras {self.max_cpu_loras} is below max_loras {self.max_loras}: vLLM "
                             "keeps every adapter of a batch in its CPU cache; give at least max_loras")
        return self


class ServerOptions(Frozen):
    """A running vLLM server (iclsft.engine.vllm_server); its CLI flags are spelled --vllm-NAME."""

    url: str | None = Field(default=None, description="vllm-server engine: address of a running vLLM server.")
    api_key: str | None = Field(default=None, exclude=True, repr=False,
                                json_schema_extra={"envvar": "ICLSFT_VLLM_API_KEY"},
                                description="vllm-server engine: API key (or $ICLSFT_VLLM_API_KEY); never stored.")
    timeout: float = Field(default=300.0, gt=0, description="vllm-server engine: seconds to wait for one request.")
    retries: int = Field(default=3, ge=0, description="vllm-server engine: retries of a failed request (with "
                                                       "backoff) before the condition is recorded as failed.")
    concurrency: int = Field(default=4, ge=1, description="vllm-server engine: requests in flight at once.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError(f"--vllm-url {v!r} must start with http:// or https://")
        return v


# engine name -> (the EngineSpec field holding its options, their model, the CLI flags' prefix)
OPTIONS: dict[str, tuple[str, type[Frozen], str]] = {
    "hf": ("hf", HFOptions, "--"),
    "vllm": ("vllm", VLLMOptions, "--"),
    "vllm-server": ("server", ServerOptions, "--vllm-"),
}


def flag(engine: str, field: str) -> str | None:
    """The CLI flag of one engine option (None: not a CLI option)."""
    _, model, prefix = OPTIONS[engine]
    extra = model.model_fields[field].json_schema_extra or {}
    return extra["flag"] if "flag" in extra else prefix + field.replace("_", "-")


def flag_at(field: str) -> str | None:
    """The CLI flag of a dotted field path ending in an engine option ("engine.hf.workers"), else None."""
    parts = field.split(".")
    engines = {attr: engine for engine, (attr, _, _) in OPTIONS.items()}
    if len(parts) < 2 or parts[-2] not in engines or parts[-1] not in OPTIONS[engines[parts[-2]]][1].model_fields:
        return None
    return flag(engines[parts[-2]], parts[-1])


def owner(option: str) -> str | None:
    """The built-in engine reading a flat option, None if none does (names are unique across engines)."""
    return next((e for e, (_, model, _) in OPTIONS.items() if option in model.model_fields), None)


class EngineSpec(Frozen):
    """Which engine scores, and the options of each built-in engine (only the chosen one's are read).
    A registered engine (`iclsft.engine.base.register_engine`) gets the whole spec."""

    name: str = "hf"  # one of names.engines(): the built-ins and any registered engine
    hf: HFOptions = HFOptions()
    vllm: VLLMOptions = VLLMOptions()
    server: ServerOptions = ServerOptions()

    @classmethod
    def of(cls, name: str = "hf", **options) -> EngineSpec:
        """The spec from flat options (None: not given), each into its engine's model. An option that
        `name` does not read is refused in one line: it would be silently ignored."""
        given: dict[str, dict] = {}
        for option, value in options.items():
            engine = owner(option)
            if engine is None:
                allowed = ", ".join(f for e, (_, model, _) in OPTIONS.items() for f in model.model_fields
                                    if flag(e, f) is not None)
                raise ValueError(f"unknown engine option {option!r}; allowed: {allowed}")
            if value is None:
                continue
            if engine != name:
                raise ValueError(f"engine option {option} ({flag(engine, option)}) = {value!r} is read by the "
                                 f"{engine} engine, not by {name}: leave it out or choose the {engine} engine")
            given.setdefault(OPTIONS[engine][0], {})[option] = value
        return cls(name=name, **given)

    @property
    def options(self) -> Frozen | None:
        """The chosen engine's options (None for a registered engine)."""
        return getattr(self, OPTIONS[self.name][0]) if self.name in OPTIONS else None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in engines():
            raise ValueError(f"unknown engine {v!r}; available: {', '.join(engines())}")
        return v

    @model_validator(mode="after")
    def _check(self) -> EngineSpec:
        if self.name == "vllm-server" and not self.server.url:
            raise ValueError("the vllm-server engine needs the server's address: --vllm-url http://HOST:PORT")
        if self.vllm.dtype is not None:
            raise ValueError(f"engine.vllm.dtype {self.vllm.dtype!r} is not allowed: a run scores in its own "
                             "dtype (--dtype, the spec's dtype)")
        return self


def nested(stored: dict) -> dict:
    """An engine spec stored before the options were nested (hash versions v1, v2: every option flat
    beside `name`) in today's form; every option kept, each in its engine's model."""
    if any(attr in stored for attr, _, _ in OPTIONS.values()):
        return stored
    out: dict = {"name": stored.get("name", "hf")}
    for option, value in stored.items():
        engine = owner(option)
        if engine is not None:
            out.setdefault(OPTIONS[engine][0], {})[option] = value
    return out
