"""The vLLM engine-option builder (no vLLM needed): keyword arguments for `vllm.LLM` on a CPU and on
a faked GPU, `vllm serve` flags, the max_model_len default for given prompt lengths (expected values
worked out by hand below), and one clear line for each bad value."""

from __future__ import annotations

import pytest

from iclsft.engine.vllm_options import (
    VLLMOptions,
    default_max_model_len,
    engine_kwargs,
    serve_flags,
)


def test_cpu_kwargs():
    # 3000-token prompt + 8 label tokens + 1 generated = 3009 -> next multiple of 32 is 95 * 32 = 3040
    got = engine_kwargs("/m", VLLMOptions(), gpu=False, longest_prompt=3000)
    assert got == {"model": "/m", "dtype": "float32", "enable_prefix_caching": True, "seed": 0, "block_size": 32,
                   "tensor_parallel_size": 1, "enforce_eager": False, "max_model_len": 3040,
                   "kv_cache_memory_bytes": 4 * 2**30}


def test_gpu_kwargs():
    # same prompt on a GPU: 16-token blocks, 3009 -> 189 * 16 = 3024; bf16; vLLM sizes the KV cache itself
    # and its attention backend picks the block size (no block_size passed)
    options = VLLMOptions(tensor_parallel_size=4, max_num_seqs=128, enforce_eager=True, gpu_memory_utilization=0.8,
                          max_loras=3, kv_cache_gib=2)
    got = engine_kwargs("/m", options, gpu=True, longest_prompt=3000, lora_rank=12, seed=5)
    assert got == {"model": "/m", "dtype": "bfloat16", "enable_prefix_caching": True, "seed": 5,
                   "tensor_parallel_size": 4, "enforce_eager": True, "max_model_len": 3024, "max_num_seqs": 128,
                   "gpu_memory_utilization": 0.8, "enable_lora": True, "max_lora_rank": 16, "max_loras": 3,
                   "max_cpu_loras": 4}


def test_explicit_values_win():
    options = VLLMOptions(max_model_len=1000, dtype="float32", block_size=64, max_cpu_loras=9)
    got = engine_kwargs("/m", options, gpu=True, longest_prompt=3000, lora_rank=8)
    assert (got["max_model_len"], got["dtype"], got["block_size"], got["max_cpu_loras"]) == (1000, "float32", 64, 9)
    # each device's memory option is ignored on the other device
    assert "gpu_memory_utilization" not in engine_kwargs("/m", VLLMOptions(gpu_memory_utilization=0.5), gpu=False)
    assert "max_model_len" not in engine_kwargs("/m", VLLMOptions(), gpu=False)  # nothing known: vLLM decides


@pytest.mark.parametrize(("longest", "labels", "block", "context", "want"), [
    (100, None, 16, None, 2048),     # short prompts: the 2048 floor
    (2040, None, 16, None, 2064),    # 2040 + 8 + 1 = 2049 -> 129 * 16
    (2040, 1, 16, None, 2048),       # 2040 + 1 + 1 = 2042 -> 128 * 16
    (4000, 2, 32, None, 4032),       # 4003 -> 126 * 32
    (4000, None, 16, 131072, 4016),  # a long-context model: far below its 131k
    (1500, None, 16, 1024 + 512, 1536),  # capped at the model's context (the floor does not apply)
    (4080, None, 16, 4096, 4096),    # 4089 -> 4096 = the context: still fits
])
def test_max_model_len_default(longest, labels, block, context, want):
    got = default_max_model_len(longest, label_tokens=labels, block_size=block, model_context=context)
    assert got == want
    assert got % block == 0 or got == context


def test_prompt_longer_than_the_model_is_one_clear_line():
    with pytest.raises(ValueError, match=r"^a prompt of 4090 tokens \(plus 8 label tokens\) exceeds the model's "
                                         r"context of 4096 tokens"):
        default_max_model_len(4090, block_size=16, model_context=4096)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor_parallel_size": 0}, "--tensor-parallel-size 0 is not allowed: Input should be greater than or equal"),
    ({"max_num_seqs": 2.5}, "--max-num-seqs 2.5 is not allowed: Input should be a valid integer"),
    ({"max_model_len": 8}, "--max-model-len 8 is not allowed: Input should be greater than or equal to 16"),
    ({"block_size": 20}, "--block-size 20 is not allowed: Input should be a multiple of 16"),
    ({"dtype": "int8"}, "--dtype 'int8' is not allowed: Input should be 'float32', 'bfloat16' or 'float16'"),
    ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization 1.5 is not allowed: Input should be less than or"),
    ({"kv_cache_gib": -1}, "--kv-cache-gib -1 is not allowed: Input should be greater than 0"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras 2 is below max_loras 4"),
])
def test_bad_values(kwargs, message):
    """Each bad value is one line naming its CLI flag (the message `user_errors` prints)."""
    import pydantic

    from iclsft.cli.app import _validation_message

    with pytest.raises(pydantic.ValidationError) as info:
        VLLMOptions(**kwargs)
    line = _validation_message(info.value)
    assert line.startswith(message) and "\n" not in line


def test_serve_flags_leave_the_users_own_to_them():
    flags = serve_flags(VLLMOptions(enforce_eager=True, max_loras=2), gpu=False, lora_rank=8, longest_prompt=100,
                        given=("--max-model-len", "8192", "--max-cpu-loras=16"))
    assert flags == ["--dtype", "float32", "--enable-prefix-caching", "--block-size", "32",
                     "--tensor-parallel-size", "1", "--enforce-eager", "--enable-lora", "--max-lora-rank", "8",
                     "--max-loras", "2"]
    gpu = serve_flags(VLLMOptions(), gpu=True, longest_prompt=3000)
    assert gpu[gpu.index("--max-model-len") + 1] == "3024" and gpu[gpu.index("--dtype") + 1] == "bfloat16"
    assert "--enforce-eager" not in gpu and "--enable-lora" not in gpu


def test_an_engine_specs_flat_options_go_to_the_vllm_engine():
    from iclsft.spec import EngineSpec

    spec = EngineSpec.of("vllm", max_loras=3, block_size=64, gpu_memory_utilization=0.7, token_budget=None)
    o = spec.vllm
    assert (o.max_loras, o.block_size, o.gpu_memory_utilization, o.max_model_len) == (3, 64, 0.7, None)
    assert spec.options is o and spec.hf.token_budget is None
    assert isinstance(o, VLLMOptions)  # the engine's launch options are the spec's own model


class _Counter:
    def __init__(self):
        self.n = 0

    def inc(self, k: int) -> int:
        self.n += k
        return self.n


class _Request:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path, self.base_model_name = lora_name, lora_int_id, lora_path, None


class _Models:
    """vLLM's OpenAIServingModels as far as start-up registration sees it; loading would fail."""

    def __init__(self, modules):
        import types

        self.static_lora_modules = [types.SimpleNamespace(name=n, path=p, base_model_name=b) for n, p, b in modules]
        self.lora_requests, self.lora_id_counter = {}, _Counter()

    def is_base_model(self, name):
        return name == "base"

    async def init_static_loras(self):
        raise AssertionError("vLLM's start-up loading ran")


def test_lazy_registration_reads_no_weights():
    import asyncio

    from iclsft.engine.vllm_cli import install_lazy_static_loras

    original = _Models.init_static_loras
    try:
        install_lazy_static_loras(_Models, _Request)
        models = _Models([("a", "/run/adapters/x", None), ("b", "/run/adapters/y", "base"), ("c", "/z", "other")])
        asyncio.run(models.init_static_loras())
    finally:
        _Models.init_static_loras = original
    got = {n: (r.lora_int_id, r.lora_path, r.base_model_name) for n, r in models.lora_requests.items()}
    assert got == {"a": (1, "/run/adapters/x", None), "b": (2, "/run/adapters/y", "base"), "c": (3, "/z", None)}


def test_serve_command_sizes_the_server_for_the_run(tiny_model_dir, tmp_path, monkeypatch):
    from iclsft import serve as serve_mod
    from iclsft.arms import make_icl_spec
    from iclsft.engine.vllm_cli import LAZY_ENV
    from iclsft.store import RunDir

    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(serve_mod, "_has_gpu", lambda: False)
    run = tmp_path / "run"
    spec, _ = make_icl_spec(model=str(tiny_model_dir), angles=(30.0,), shots=(1, 300), grid_step=20)
    RunDir(run).open(spec)
    longest, label = serve_mod.run_longest_prompt(run)
    assert longest > 2048 and label >= 1  # 600 exemplars of several tokens each
    cmd, _ = serve_mod.serve_command(run, options=VLLMOptions(max_loras=3), allow_adapter_loading=True)
    length = int(cmd[cmd.index("--max-model-len") + 1])
    assert length % 32 == 0 and longest + label + 1 <= length < longest + label + 1 + 32
    assert cmd[cmd.index("--max-loras") + 1] == "3" and cmd[cmd.index("--max-cpu-loras") + 1] == "4"
    assert cmd[cmd.index("--dtype") + 1] == "float32"  # the run's dtype, so that served scores match stored ones
    cmd, _ = serve_mod.serve_command(run, extra=("--max-model-len", "9000"))
    assert cmd.count("--max-model-len") == 1 and cmd[-1] == "9000"
    assert serve_mod.server_env(run, None, False, base={})[LAZY_ENV] == "1"


def test_engine_fields_are_stored_defaults_included():
    """Every field is stored (iclsft.versions v3), and read back as it was set."""
    from iclsft.spec import EngineSpec

    new = {"max_model_len", "tensor_parallel_size", "max_num_seqs", "enforce_eager", "max_cpu_loras"}
    assert {k: EngineSpec(name="vllm").model_dump(mode="json")["vllm"][k] for k in new} == {
        "max_model_len": None, "tensor_parallel_size": 1, "max_num_seqs": None, "enforce_eager": False,
        "max_cpu_loras": None}
    stored = EngineSpec.of("vllm", max_model_len=4096, tensor_parallel_size=2, max_num_seqs=8, enforce_eager=True,
                           max_cpu_loras=6).model_dump(mode="json")
    assert {k: stored["vllm"][k] for k in new} == {"max_model_len": 4096, "tensor_parallel_size": 2,
                                                   "max_num_seqs": 8, "enforce_eager": True, "max_cpu_loras": 6}
    assert set(stored) == {"name", "hf", "vllm", "server"}  # each engine's options in its own model
    assert EngineSpec.model_validate(stored).vllm.max_model_len == 4096


def test_vllm_processes_ignore_vllms_own_deprecation_and_the_environment_is_restored(monkeypatch):
    """The engine process vLLM starts inherits PYTHONWARNINGS: it ignores the FutureWarning that vLLM's
    own kernel dispatcher triggers, after the user's own entries; the caller's value comes back."""
    import os

    from iclsft.engine.vllm_engine import _quiet_engine_process

    ours = "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    with _quiet_engine_process():
        assert os.environ["PYTHONWARNINGS"] == ours
    assert "PYTHONWARNINGS" not in os.environ
    monkeypatch.setenv("PYTHONWARNINGS", "error::UserWarning")
    with _quiet_engine_process():
        assert os.environ["PYTHONWARNINGS"] == "error::UserWarning," + ours
    assert os.environ["PYTHONWARNINGS"] == "error::UserWarning"
