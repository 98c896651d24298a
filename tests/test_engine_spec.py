"""The engine spec's per-engine option models and the CLI options generated from them: the flags the
commands take (listed here by hand, as the docs name them), what each puts into the spec, one clear
line for an option the chosen engine does not read or a bad value, flat options stored before the
models were nested read back into them, and a sweep config's engine_options checked on load."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from iclsft.cli import main
from iclsft.cli.engine_options import engine_options, engine_spec
from iclsft.engine_spec import EngineSpec, nested

HF = {"--token-budget", "--threads", "--batch-workers", "--prefix-kernel", "--device-map"}
VLLM = {"--max-model-len", "--tensor-parallel-size", "--max-num-seqs", "--enforce-eager", "--gpu-memory-utilization",
        "--max-loras", "--max-cpu-loras", "--max-lora-rank", "--block-size", "--kv-cache-gib"}
SERVER = {"--vllm-url", "--vllm-api-key", "--vllm-timeout", "--vllm-retries", "--vllm-concurrency"}


def flags(command: str) -> set[str]:
    return {opt for p in main.commands[command].params for opt in p.opts}


@pytest.mark.parametrize(("command", "want"), [("icl", HF | VLLM | SERVER), ("sft", HF | VLLM | SERVER),
                                               ("implicit", HF | VLLM)])
def test_every_engine_option_is_a_flag_of_the_commands_that_score(command, want):
    got = flags(command)
    assert want <= got and "--engine" in got
    assert not (HF | VLLM | SERVER) - want & got  # implicit takes no vllm-server options (nor that engine)


@click.command()
@engine_options()
def probe(**o):
    click.echo(engine_spec(o).model_dump_json())


def spec_of(*args: str, env: dict | None = None) -> dict:
    result = CliRunner().invoke(probe, list(args), env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_each_flag_lands_in_its_engines_model():
    got = spec_of("--engine", "vllm", "--kv-cache-gib", "2", "--max-loras", "3", "--enforce-eager")
    assert got["name"] == "vllm"
    assert (got["vllm"]["kv_cache_gib"], got["vllm"]["max_loras"], got["vllm"]["enforce_eager"]) == (2.0, 3, True)
    assert got["vllm"]["block_size"] is None and got["hf"]["token_budget"] is None  # not given: the defaults
    got = spec_of("--engine", "hf", "--batch-workers", "2", "--threads", "1")
    assert (got["hf"]["workers"], got["hf"]["threads"], got["vllm"]["kv_cache_gib"]) == (2, 1, None)
    got = spec_of("--engine", "vllm-server", "--vllm-url", "http://h:8000", "--vllm-retries", "0")
    assert got["server"] == {"url": "http://h:8000", "timeout": 300.0, "retries": 0, "concurrency": 4}


def test_an_api_key_from_the_environment_is_left_out_where_the_engine_does_not_read_it():
    assert spec_of("--engine", "hf", env={"ICLSFT_VLLM_API_KEY": "sk-1"})["name"] == "hf"
    spec = EngineSpec.of("vllm-server", url="http://h:1", api_key="sk-1")
    assert spec.server.api_key == "sk-1" and "sk-1" not in spec.model_dump_json()


@pytest.mark.parametrize(("args", "line"), [
    (["--engine", "hf", "--kv-cache-gib", "2"],
     "engine option kv_cache_gib (--kv-cache-gib) = 2.0 is read by the vllm engine, not by hf"),
    (["--engine", "vllm", "--batch-workers", "2"],
     "engine option workers (--batch-workers) = 2 is read by the hf engine, not by vllm"),
    (["--engine", "hf", "--vllm-api-key", "sk-1"], "(--vllm-api-key) = 'sk-1' is read by the vllm-server engine"),
])
def test_an_option_the_engine_does_not_read_is_one_line(tiny_model_dir, tmp_path, args, line):
    result = CliRunner().invoke(main, ["icl", "--out", str(tmp_path / "r"), "--model", str(tiny_model_dir), *args])
    assert result.exit_code == 1 and line in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize(("args", "line"), [
    (["--engine", "hf", "--batch-workers", "0"], "--batch-workers 0 is not allowed: Input should be greater"),
    (["--engine", "vllm", "--block-size", "24"], "--block-size 24 is not allowed: Input should be a multiple of 16"),
    (["--engine", "hf", "--device-map", "gpu0"], "--device-map 'gpu0' is not allowed: String should match"),
])
def test_a_bad_value_names_its_flag(tiny_model_dir, tmp_path, args, line):
    result = CliRunner().invoke(main, ["icl", "--out", str(tmp_path / "r"), "--model", str(tiny_model_dir), *args])
    assert result.exit_code == 1 and result.output.strip().startswith(f"Error: {line}"), result.output


def test_the_arms_dtype_is_not_an_engine_option():
    with pytest.raises(ValueError, match="engine.vllm.dtype 'bfloat16' is not allowed: a run scores in its own dtype"):
        EngineSpec(name="vllm", vllm={"dtype": "bfloat16"})
    assert "--dtype" not in {opt for p in probe.params for opt in p.opts}


def test_options_stored_flat_before_the_models_are_read_back_into_them():
    """A v2 spec.json's engine (every option beside the name, as iclsft 0.x stored it) in today's form."""
    v2 = {"name": "vllm", "token_budget": None, "threads": 2, "workers": None, "device_map": None, "max_loras": 2,
          "max_lora_rank": None, "block_size": 64, "gpu_memory_utilization": None, "kv_cache_gib": 1.0,
          "max_model_len": 512, "tensor_parallel_size": 1, "max_num_seqs": None, "enforce_eager": False,
          "max_cpu_loras": None, "url": None, "timeout": 300.0, "retries": 3, "concurrency": 4}
    spec = EngineSpec.model_validate(nested(v2))
    assert (spec.name, spec.hf.threads, spec.vllm.max_loras, spec.vllm.block_size, spec.vllm.kv_cache_gib,
            spec.vllm.max_model_len, spec.server.retries) == ("vllm", 2, 2, 64, 1.0, 512, 3)
    assert nested(spec.model_dump(mode="json")) == spec.model_dump(mode="json")  # today's form stays


@pytest.mark.parametrize(("options", "line"), [
    ({"kv_cache_gib": 1, "token_budget": 64}, "engine_options mixes options of the hf and vllm engines"),
    ({"kv_cach_gib": 1}, "unknown engine option 'kv_cach_gib'; allowed: token_budget, threads"),
    ({"token_budget": 8}, "engine_options.token_budget = 8 is not allowed: Input should be greater than or equal"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras 2 is below max_loras 4"),
])
def test_a_sweep_configs_engine_options_are_checked_on_load(tmp_path, options, line):
    config = {"out": str(tmp_path / "o"), "models": ["smollm2-135m"], "tasks": [{"name": "linear2d", "angles": [30]}],
              "methods": ["icl"], "shots": [1], "engine_options": options}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code != 0 and line in result.output and "Traceback" not in result.output, result.output


def test_the_hf_options_reach_the_engine(tiny_model_dir):
    from iclsft.engine.base import open_engine

    engine = open_engine(EngineSpec.of("hf", token_budget=32, workers=2, prefix_kernel="gemm"), tiny_model_dir,
                         progress=False)
    try:
        assert (engine.token_budget, engine.workers, engine.prefix_kernel) == (32, 2, "gemm")
    finally:
        engine.close()
    assert spec_of("--engine", "hf", "--prefix-kernel", "gemm")["hf"]["prefix_kernel"] == "gemm"
    assert spec_of("--engine", "hf")["hf"]["prefix_kernel"] == "flash"  # the default: the exact kernel


def test_no_two_engines_share_an_option_name():
    """Flat options find their engine by name (`owner`), so a name two engines used would be ambiguous."""
    from iclsft.engine_spec import OPTIONS

    names = [f for _, model, _ in OPTIONS.values() for f in model.model_fields]
    assert len(names) == len(set(names)) == 21
