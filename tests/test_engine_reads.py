"""What the vLLM engines share, without vLLM: how label reads are planned and summed, how adapters
are named, engine selection and its spec, and the `serve` command built from a run directory.

Everything here is pure Python on hand-made inputs (no model, no server): each test checks values
that a wrong merge, a path-dependent name or a wrong rank rounding would change.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iclsft import serve
from iclsft.engine.base import resolve_engine
from iclsft.engine.reads import adapter_name, adapter_rank, plan_reads, vllm_lora_rank
from iclsft.serve import run_adapters, run_base_model, serve_command
from iclsft.sft.adapters import ADAPTERS_DIR, MARKER
from iclsft.spec import EngineSpec

# -- plan_reads / assemble -------------------------------------------------------------------------


def test_single_token_labels_cost_one_read_per_query():
    plan = plan_reads([1, 2], [[10, 11], [12], [13, 14, 15]], [[5], [6]])
    assert plan.prompts == [[1, 2, 10, 11], [1, 2, 12], [1, 2, 13, 14, 15]]
    assert plan.token_ids == [[5, 6], [5, 6], [5, 6]]
    assert plan.parts == [(0, 0, 0, 5), (0, 1, 0, 6), (1, 0, 1, 5), (1, 1, 1, 6), (2, 0, 2, 5), (2, 1, 2, 6)]


def test_labels_sharing_a_first_token_share_reads():
    # " Bazooka"/" Bazel"-like labels: the first token is read once, the second tokens after it together
    plan = plan_reads([1], [[10], [20]], [[5, 6], [5, 7]])
    assert plan.prompts == [[1, 10], [1, 10, 5], [1, 20], [1, 20, 5]]
    assert plan.token_ids == [[5], [6, 7], [5], [6, 7]]


def test_identical_prompts_share_a_read_across_queries():
    # query [10, 6] is query [10] followed by label [6, 7]'s first token: the same prompt, read once
    plan = plan_reads([1], [[10], [10, 6]], [[6, 7]])
    assert plan.prompts == [[1, 10], [1, 10, 6], [1, 10, 6, 6]]
    assert plan.token_ids == [[6], [7, 6], [7]]
    assert plan.parts == [(0, 0, 0, 6), (0, 0, 1, 7), (1, 0, 1, 6), (1, 0, 2, 7)]


def test_assemble_sums_token_log_probs_per_label():
    plan = plan_reads([1], [[10, 11], [12]], [[5], [6, 7]])
    assert plan.prompts == [[1, 10, 11], [1, 10, 11, 6], [1, 12], [1, 12, 6]]
    values = [{5: -0.1, 6: -0.2, 99: -5.0}, {7: -0.3}, {5: -1.0, 6: -2.0}, {7: -3.0}]
    out = plan.assemble(values, n_queries=2, n_labels=2)
    # by hand: query 0: [-0.1, -0.2 + -0.3]; query 1: [-1.0, -2.0 + -3.0]
    np.testing.assert_allclose(out, [[-0.1, -0.5], [-1.0, -5.0]], rtol=0, atol=1e-12)


def test_assemble_refuses_a_missing_token():
    plan = plan_reads([1], [[10]], [[5], [6, 7]])
    values = [{5: -0.1, 6: -0.2}, {}]  # the server answered the second read without token 7
    with pytest.raises(RuntimeError, match="no log-prob for token 7 .read 1 of query 0"):
        plan.assemble(values, n_queries=1, n_labels=2)


@pytest.mark.parametrize("labels", [[[5], []], []])
def test_empty_labels_are_rejected(labels):
    with pytest.raises(ValueError, match="at least one (token|label)"):
        plan_reads([1], [[10]], labels)


# -- adapter names and ranks -----------------------------------------------------------------------


def make_adapter(path: Path, *, rank: int = 8, weights: bytes = b"\x00\x01lora weights") -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16, "peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_adapter_name_depends_on_content_not_path(tmp_path):
    original = make_adapter(tmp_path / "a")
    name = adapter_name(original)
    assert re.fullmatch(r"iclsft-[0-9a-f]{24}", name)
    copy = shutil.copytree(original, tmp_path / "elsewhere" / "b")
    assert adapter_name(copy) == name
    assert adapter_name(str(copy)) == name

    changed = shutil.copytree(original, tmp_path / "c")
    weights = bytearray((changed / "adapter_model.safetensors").read_bytes())
    weights[0] ^= 1
    (changed / "adapter_model.safetensors").write_bytes(bytes(weights))
    assert adapter_name(changed) != name

    rank16 = make_adapter(tmp_path / "d", rank=16)
    assert adapter_name(rank16) != name


@pytest.mark.parametrize("files", [(), ("adapter_model.safetensors",)])
def test_adapter_name_needs_an_adapter_config(tmp_path, files):
    path = tmp_path / "not-an-adapter"
    path.mkdir()
    for f in files:
        (path / f).write_bytes(b"weights")
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(path)))):
        adapter_name(path)


def test_adapter_rank_reads_the_config(tmp_path):
    assert adapter_rank(make_adapter(tmp_path / "a", rank=12)) == 12


@pytest.mark.parametrize("rank, expected", [(1, 1), (3, 8), (8, 8), (9, 16), (300, 320), (512, 512)])
def test_vllm_lora_rank_rounds_up(rank, expected):
    assert vllm_lora_rank(rank) == expected


def test_vllm_lora_rank_refuses_too_large():
    with pytest.raises(ValueError, match="LoRA rank 600 exceeds .* 512"):
        vllm_lora_rank(600)


# -- engine choice and spec ------------------------------------------------------------------------


def test_resolve_engine_names():
    assert resolve_engine("hf") == "hf"
    assert resolve_engine("vllm") == "vllm"
    assert resolve_engine("vllm-server") == "vllm-server"
    with pytest.raises(ValueError, match="unknown engine 'sglang'; available: auto, hf, vllm, vllm-server"):
        resolve_engine("sglang")


def test_resolve_auto_is_hf_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_engine("auto") == "hf"


def test_engine_spec_checks_the_server_url():
    with pytest.raises(ValueError, match="needs the server's address"):
        EngineSpec(name="vllm-server")
    with pytest.raises(ValueError, match="'localhost:8000' must start with http://"):
        EngineSpec.of("vllm-server", url="localhost:8000")
    assert EngineSpec.of("vllm-server", url="https://gpu.example:8000").server.url == "https://gpu.example:8000"


def test_engine_spec_never_stores_the_api_key():
    spec = EngineSpec.of("vllm-server", url="http://127.0.0.1:8000", api_key="sk-secret-123")
    assert spec.server.api_key == "sk-secret-123"
    dumped = spec.model_dump(mode="json")
    assert "api_key" not in dumped
    assert "sk-secret-123" not in json.dumps(dumped)
    assert "sk-secret-123" not in spec.model_dump_json()
    assert "sk-secret-123" not in repr(spec)


# -- serving a run's adapters ----------------------------------------------------------------------

SPEC = {"model": {"name": "smollm2-135m", "fingerprint": "0123456789abcdef"}, "dtype": "bfloat16"}


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / ADAPTERS_DIR).mkdir(parents=True)
    (run / "spec.json").write_text(json.dumps({"arms": {"sft": SPEC}}))
    return run


def make_checkpoint(run: Path, dirname: str, *, angle: float = 45.0, shots: int = 10, method: str = "lora",
                    seed: int = 0, fraction: float = 1.0, rank: int = 8, finished: bool = True) -> Path:
    """A checkpoint directory the way sft/adapters.save_checkpoint leaves it: files, then the marker."""
    path = run / ADAPTERS_DIR / dirname
    if method == "lora":
        make_adapter(path, rank=rank, weights=dirname.encode())
    else:  # a full fine-tune is a model directory of its own
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"full weights")
    if finished:
        marker = {"key": dirname * 3, "fraction": fraction, "method": method, "seed": seed, "task": "linear2d",
                  "angle": angle, "shots": shots}
        (path / MARKER).write_text(json.dumps(marker))
    return path


@pytest.fixture
def fake_base(monkeypatch, tmp_path):
    """run_base_model without resolving a model: the run's arms and a stand-in model directory."""
    base = tmp_path / "models" / "smollm2"
    base.mkdir(parents=True)

    def fake(run_dir):
        return json.loads((Path(run_dir) / "spec.json").read_text())["arms"], base

    monkeypatch.setattr(serve, "run_base_model", fake)
    return base


def test_run_adapters_names_finished_lora_checkpoints(tmp_path):
    run = make_run(tmp_path)
    make_checkpoint(run, "a1" * 10, angle=45.0, shots=10, seed=0)
    make_checkpoint(run, "b2" * 10, angle=45.0, shots=10, seed=0, fraction=0.5)
    make_checkpoint(run, "c3" * 10, angle=22.5, shots=2, seed=3, rank=16)
    make_checkpoint(run, "d4" * 10, finished=False)  # still training (or crashed): no marker
    make_checkpoint(run, "e5" * 10, method="full")  # not an adapter
    (run / ADAPTERS_DIR / ".tmp-f6-123").mkdir()  # a save in progress
    found = run_adapters(run)
    assert [(a.name, a.path.name, a.rank) for a in found] == [
        ("linear2d-a45-K10-lora-s0", "a1" * 10, 8),
        ("linear2d-a45-K10-lora-s0-c0.5", "b2" * 10, 8),
        ("linear2d-a22.5-K2-lora-s3", "c3" * 10, 16),
    ]


def test_run_adapters_makes_colliding_names_unique(tmp_path):
    # two trainings that differ only in what the name leaves out (e.g. the learning rate)
    run = make_run(tmp_path)
    make_checkpoint(run, "0123456789abcdef0123")
    make_checkpoint(run, "fedcba98765432100123")
    make_checkpoint(run, "aaaaaaaaaaaaaaaaaaaa", seed=1)
    names = [a.name for a in run_adapters(run)]
    assert names == ["linear2d-a45-K10-lora-s0-01234567", "linear2d-a45-K10-lora-s1",
                     "linear2d-a45-K10-lora-s0-fedcba98"]


def test_run_adapters_of_a_run_without_adapters(tmp_path):
    assert run_adapters(make_run(tmp_path)) == []
    assert run_adapters(tmp_path / "missing") == []


def test_run_base_model_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run directory .no spec.json"):
        run_base_model(tmp_path)


def test_serve_command_registers_every_adapter(tmp_path, fake_base):
    run = make_run(tmp_path)
    make_checkpoint(run, "a1" * 10, rank=8)
    make_checkpoint(run, "c3" * 10, angle=30.0, rank=12)
    make_checkpoint(run, "e5" * 10, method="full")
    cmd, adapters = serve_command(run, port=8123, extra=("--max-model-len", "512"))
    assert [a.name for a in adapters] == ["linear2d-a45-K10-lora-s0", "linear2d-a30-K10-lora-s0"]

    assert cmd[:5] == [sys.executable, "-m", "iclsft.engine.vllm_cli", "serve", str(fake_base)]

    def option(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert option("--host") == "127.0.0.1"
    assert option("--port") == "8123"
    assert option("--served-model-name") == "smollm2-135m"
    assert option("--dtype") == "bfloat16"
    assert "--enable-lora" in cmd
    assert option("--max-lora-rank") == "16"  # the largest rank, 12, rounded up to a rank vLLM accepts
    if not torch.cuda.is_available():  # LoRA on a CPU server: prompt log-probs one at a time (vLLM #16668)
        assert option("--middleware") == "iclsft.engine.vllm_guard.PromptLogprobsGuard"
    start = cmd.index("--lora-modules") + 1
    assert cmd[start:-2] == [f"linear2d-a45-K10-lora-s0={(run / ADAPTERS_DIR / ('a1' * 10)).resolve()}",
                             f"linear2d-a30-K10-lora-s0={(run / ADAPTERS_DIR / ('c3' * 10)).resolve()}"]
    assert cmd[-2:] == ["--max-model-len", "512"]


def test_serve_command_without_adapters(tmp_path, fake_base):
    run = make_run(tmp_path)
    cmd, adapters = serve_command(run, host="0.0.0.0", dtype="float32")
    assert adapters == []
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert "--enable-lora" not in cmd and "--lora-modules" not in cmd and "--middleware" not in cmd
    assert cmd[cmd.index("--block-size") + 1] == "32"  # on CPUs: vLLM's 128-token default recomputes more
    cmd, _ = serve_command(run, extra=("--block-size", "64"))
    assert cmd.count("--block-size") == 1 and cmd[-2:] == ["--block-size", "64"]

    # runtime loading needs LoRA enabled even with nothing registered
    cmd, _ = serve_command(run, allow_adapter_loading=True)
    assert "--enable-lora" in cmd and "--lora-modules" not in cmd
    assert ("--middleware" in cmd) == (not torch.cuda.is_available())
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8"

    # adapters of a larger rank, loaded later, need the room made for them at start
    cmd, _ = serve_command(run, allow_adapter_loading=True, max_lora_rank=24)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32"
