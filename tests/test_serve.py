"""`serve`, `query` and the `vllm-server` engine end to end on the default model, on loopback.

One run directory (an ICL arm and a small LoRA arm, scored by `hf`) is served by a real
`iclsft-eval serve` subprocess (vLLM's OpenAI-compatible server, API key set, runtime adapter
loading on). What the server returns is compared with what `hf` stored; the server is then killed
in the middle of a `vllm-server` run, which must fail clearly, keep what finished, and resume after
a restart. Tolerance as in test_engine_vllm.py (measured on this model: 2.4e-5 ICL, 6.1e-5 adapter).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from processes import marked

from iclsft.arms import make_icl_spec, make_sft_spec
from iclsft.cli import main
from iclsft.engine.vllm_server import ServerError, VLLMServerEngine
from iclsft.graph.driver import run_spec
from iclsft.serve import query_points, run_adapters, run_base_model
from iclsft.spec import EngineSpec, ExecutorSpec, sft_spec

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
pytest.importorskip("vllm")
pytest.importorskip("peft")

ATOL = 1e-3
KEY = "test-key-7d1c"
ANGLE = 45.0
START_TIMEOUT = 420  # seconds: vLLM compiles for one to two minutes on its first start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, port: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "iclsft.cli", "serve", str(run_dir), "--port", str(port), "--api-key", KEY,
           "--allow-adapter-loading"]
    deadline = time.time() + 60
    while not port_free(port) and time.time() < deadline:  # a server stopped just before may still hold it
        time.sleep(0.5)
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                         headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=5):
                return proc
        except OSError:
            time.sleep(2)
    stop_server(proc)
    pytest.fail(f"the server did not answer within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_server(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def run_dir(default_model_ref, tmp_path_factory):
    """ICL at K=2 and one LoRA adapter at K=2 (a few steps: enough to differ from the base model)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    common = dict(model="smollm2-135m", angles=(ANGLE,), shots=(2,), grid_step=20)
    icl, ref = make_icl_spec(**common)
    run_spec(icl, out, ref, progress=False)
    sft, _ = make_sft_spec(**common, sft=sft_spec("lora", epochs=1, min_steps=6, batch_size=4),
                           executor=ExecutorSpec(name="local"))
    run_spec(sft, out, ref, progress=False)
    return out


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    info = {"url": f"http://127.0.0.1:{port}", "proc": start_server(run_dir, port, log), "port": port, "log": log,
            "run": run_dir}
    yield info
    stop_server(info["proc"])  # the one running now: a test may have killed and restarted it


def stored_scores(run_dir: Path, method: str) -> pd.DataFrame:
    (cond,) = [d for d in (run_dir / "conditions").iterdir()
               if json.loads((d / "record.json").read_text()).get("method", "icl") == method]
    return pd.read_parquet(cond / "scores.parquet")


def test_adapters_are_registered_not_loaded_at_start(server):
    """serve registers the run's adapters by name only (vllm_cli's lazy registration): vLLM's start-up
    loading, which logs each adapter it loads, did not run; the adapter loads at its first request."""
    log = server["log"].read_text()
    assert "Loaded new LoRA adapter: name 'linear2d-a45-K2-lora-s0'" not in log
    assert "'max_model_len': 2048" in log  # vLLM's "non-default args" line: sized for the run, not 8192


def test_server_lists_the_runs_adapter_under_a_readable_name(server):
    engine = VLLMServerEngine(server["url"], api_key=KEY)
    served = {m["id"] for m in engine.served_models()}
    (adapter,) = run_adapters(server["run"])
    assert adapter.name == "linear2d-a45-K2-lora-s0"
    assert {"smollm2-135m", adapter.name} <= served


def test_query_adapter_matches_hf_scores(server):
    want = stored_scores(server["run"], "lora").iloc[::4]
    points = list(zip(want.n1.tolist(), want.n2.tolist()))
    rows = query_points(server["url"], points, run_dir=server["run"], adapter="linear2d-a45-K2-lora-s0",
                        api_key=KEY)
    got = np.log([[r[" Baz"], r[" Rud"]] for r in rows])
    np.testing.assert_allclose(got, want[["lp_0", "lp_1"]].to_numpy(), rtol=0, atol=ATOL)
    base = query_points(server["url"], points, run_dir=server["run"], api_key=KEY)
    assert np.abs(np.log([[r[" Baz"], r[" Rud"]] for r in base]) - got).max() > 0.05


def test_query_icl_prompt_from_the_cli(server):
    want = stored_scores(server["run"], "icl")
    row = want.iloc[7]
    result = CliRunner().invoke(main, ["query", "--url", server["url"], "--api-key", KEY, "--icl",
                                       str(server["run"]), "--shots", "2", str(row.n1), str(row.n2)])
    assert result.exit_code == 0, result.output
    header, line = result.output.strip().splitlines()
    assert header.split() == ["n1", "n2", "p(Baz)", "p(Rud)"]
    values = [float(v) for v in line.split()]
    assert values[:2] == [row.n1, row.n2]
    np.testing.assert_allclose(values[2:], np.exp([row.lp_0, row.lp_1]), atol=6e-5)  # 4 decimals printed


def test_runtime_loaded_adapter_matches_hf(server):
    """The vllm-server engine loads an adapter by content-hash name and scores it like hf."""
    (adapter,) = run_adapters(server["run"])
    want = stored_scores(server["run"], "lora")
    from transformers import AutoTokenizer

    from iclsft.prompts import PromptBuilder
    from iclsft.spec import TemplateSpec

    builder = PromptBuilder(AutoTokenizer.from_pretrained(run_base_model(server["run"])[1]), TemplateSpec(),
                            (" Baz", " Rud"))
    engine = VLLMServerEngine(server["url"], api_key=KEY, chunk=7, concurrency=3)
    got = engine.score(builder.start(), builder.queries(want.n1, want.n2), builder.label_ids, adapter=str(adapter.path))
    np.testing.assert_allclose(got, want[["lp_0", "lp_1"]].to_numpy(), rtol=0, atol=ATOL)
    engine.release(str(adapter.path))


def test_server_generation_equals_hf(server):
    """Greedy generation through the completions API (implicit code-task prompts, the base model and the
    run's adapter loaded at run time) equals the hf engine's, token for token."""
    from iclsft.engine.hf import HFEngine
    from iclsft.implicit.data import TaskPrompts, demo_stream, eval_items
    from iclsft.models import ModelRef, load_model
    from iclsft.tasks.implicit import get_task

    (adapter,) = run_adapters(server["run"])
    base = run_base_model(server["run"])[1]
    model, tokenizer = load_model(ModelRef("smollm2-135m", base, ""), "float32", device="cpu")
    task = get_task("code")
    prompts = TaskPrompts(tokenizer, task)
    prefix = prompts.prefix(demo_stream(task, 0)[:2])
    queries = prompts.queries(eval_items(task, "broken", 0, 5, 100))
    remote = VLLMServerEngine(server["url"], api_key=KEY, chunk=2, concurrency=2)
    hf = HFEngine(model, progress=False)
    for a in (None, str(adapter.path)):
        for stop in (prompts.stop_ids(), []):
            want = hf.generate(prefix, queries, stop_ids=stop, max_new_tokens=8, adapter=a)
            assert remote.generate(prefix, queries, stop_ids=stop, max_new_tokens=8, adapter=a) == want, (a, stop)
            if not stop:
                assert all(len(t) == 8 for t in want)
    remote.release(str(adapter.path))


def test_wrong_key_and_wrong_url_are_clear_errors(server):
    with pytest.raises(ServerError, match="API key"):
        VLLMServerEngine(server["url"], api_key="wrong")
    with pytest.raises(ServerError, match="API key"):
        VLLMServerEngine(server["url"])
    closed = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["query", "--url", closed, "1", "2"])
    assert result.exit_code != 0
    assert closed in result.output and "Traceback" not in result.output


def test_vllm_server_run_matches_hf_then_survives_a_server_kill(server, tmp_path):
    """A vllm-server ICL run equals the hf run; killed mid-run, the server leaves finished conditions
    intact and the rest recorded as failed; after a restart the same command resumes."""
    common = dict(model="smollm2-135m", angles=(ANGLE,), shots=(2,), grid_step=20)
    remote = EngineSpec.of("vllm-server", url=server["url"], api_key=KEY, retries=1)
    spec, ref = make_icl_spec(**common, engine=remote)
    run_spec(spec, tmp_path / "same", ref, progress=False)
    got = pd.read_parquet(next((tmp_path / "same" / "conditions").iterdir()) / "scores.parquet")
    want = stored_scores(server["run"], "icl")
    np.testing.assert_allclose(got[["lp_0", "lp_1"]], want[["lp_0", "lp_1"]], rtol=0, atol=ATOL)

    # several conditions; the server is killed as soon as the first one is finished
    out = tmp_path / "killed"
    args = ["icl", "--angle", "45", "--shots", "1,2,3,4", "--grid-step", "10", "--engine", "vllm-server",
            "--vllm-url", server["url"], "--vllm-retries", "1", "--out", str(out)]
    env = {**os.environ, "ICLSFT_VLLM_API_KEY": KEY}
    client = subprocess.Popen([sys.executable, "-m", "iclsft.cli", *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and client.poll() is None and not finished(out):
        time.sleep(0.2)
    stop_server(server["proc"], signal.SIGKILL)
    output, _ = client.communicate(timeout=300)
    assert client.returncode != 0, output
    assert "failed" in output and server["url"] in output and "rerun" in output
    done = finished(out)
    assert 1 <= len(done) < 4, output
    kept = {d: (d / "scores.parquet").stat().st_mtime_ns for d in done}
    for d in (out / "conditions").iterdir():
        record = json.loads((d / "record.json").read_text())
        assert record["status"] in ("ok", "error")
        if record["status"] == "error":
            assert server["url"] in record["error"] and not (d / "scores.parquet").exists()

    server["proc"] = start_server(server["run"], server["port"], server["log"])
    result = subprocess.run([sys.executable, "-m", "iclsft.cli", *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(finished(out)) == 4
    assert {d: (d / "scores.parquet").stat().st_mtime_ns for d in done} == kept  # not rescored
    # the resumed conditions hold the same numbers an uninterrupted hf run gives (spot check K=3)
    spec3, _ = make_icl_spec(model="smollm2-135m", angles=(ANGLE,), shots=(3,), grid_step=10)
    run_spec(spec3, tmp_path / "hf3", ref, progress=False)
    (cond,) = spec3.conditions()
    a = pd.read_parquet(out / "conditions" / cond.dirname / "scores.parquet")
    b = pd.read_parquet(tmp_path / "hf3" / "conditions" / cond.dirname / "scores.parquet")
    np.testing.assert_allclose(a[["lp_0", "lp_1"]], b[["lp_0", "lp_1"]], rtol=0, atol=ATOL)


def post(server, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{server['url']}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def hf_prompt_logprobs(run_dir: Path, prompts: list[list[int]], adapter: Path | None) -> list[np.ndarray]:
    """log p(token t | tokens before t) for t >= 1 of each prompt: a plain forward of the base model, or of
    the base model with the adapter (peft), fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_base_model(run_dir)[1], dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy())
    return out


def test_echo_batches_on_a_lora_server_are_answered_and_equal_hf(server):
    """vLLM on CPU with LoRA on dies when several prompt-log-prob sequences share an engine step (vLLM
    #16668; a 12-prompt echo request, or one echoed prompt beside running generations, killed it here).
    Through serve's guard (iclsft.engine.vllm_guard) both are answered, each prompt's log-probs equal a
    plain hf forward, and the server goes on answering."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    (adapter,) = run_adapters(server["run"])
    tokenizer = AutoTokenizer.from_pretrained(run_base_model(server["run"])[1])
    prompts = [tokenizer(f"{i} {90 - i} -> Baz\n{i + 7} {i} ->")["input_ids"] for i in range(12)]
    reference = {}
    for model, path in (("smollm2-135m", None), (adapter.name, adapter.path)):
        status, answer = post(server, {"model": model, "prompt": prompts, "echo": True, "logprobs": 1,
                                       "max_tokens": 1, "temperature": 0})
        assert status == 200, answer
        assert [c["index"] for c in answer["choices"]] == list(range(12))
        want = hf_prompt_logprobs(server["run"], prompts, path)
        reference[model] = want
        for ids, choice, ref in zip(prompts, answer["choices"], want):
            got = choice["logprobs"]["token_logprobs"]
            assert got[0] is None
            np.testing.assert_allclose(got[1:len(ids)], ref, rtol=0, atol=ATOL)
        assert answer["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)

    generate = {"model": "smollm2-135m", "prompt": "Count: 1 2 3", "max_tokens": 24, "temperature": 0}
    echo = {"model": adapter.name, "prompt": prompts[0], "echo": True, "logprobs": 0, "max_tokens": 1}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda body: post(server, body), [generate, generate, echo, generate]))
    assert [status for status, _ in answers] == [200] * 4, answers
    np.testing.assert_allclose(answers[2][1]["choices"][0]["logprobs"]["token_logprobs"][1:len(prompts[0])],
                               reference[adapter.name][0], rtol=0, atol=ATOL)
    assert len({a["choices"][0]["text"] for i, (_, a) in enumerate(answers) if i != 2}) == 1  # greedy, same prompt


def test_prompt_logprob_requests_that_cannot_run_alone_are_refused_clearly(server):
    for extra, words in (({"n": 2}, "n=2"), ({"stream": True}, "stream=true")):
        status, answer = post(server, {"model": "smollm2-135m", "prompt": ["1 2 ->", "3 4 ->"], "echo": True,
                                       "logprobs": 1, "max_tokens": 1, **extra})
        assert status == 400 and words in answer["error"]["message"] and "16668" in answer["error"]["message"]
    status, answer = post(server, {"model": "smollm2-135m", "prompt": ["1 2 ->", "3 4 ->"], "max_tokens": 2, "n": 2})
    assert status == 200 and len(answer["choices"]) == 4  # without prompt log-probs nothing is changed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_everything_on_a_signal(run_dir, tmp_path, sig):
    """`kill PID` (or Ctrl-C) of `iclsft-eval serve` ends the vLLM server and its engine processes: within
    30 s no process of it is left (found by an environment variable every descendant inherits) and the
    port can be bound again."""
    port, mark = free_port(), f"serve-stop-{sig.name}-{os.getpid()}"
    proc = start_server(run_dir, port, tmp_path / "server.log", env={**os.environ, "ICLSFT_TEST_MARK": mark})
    assert len(marked(mark)) >= 3  # the CLI, vLLM's API server, its engine core
    os.kill(proc.pid, sig)  # the CLI alone, not its process group
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while marked(mark) and time.time() < deadline:
        time.sleep(0.5)
    assert not marked(mark), (marked(mark), (tmp_path / "server.log").read_text()[-2000:])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds (TIME_WAIT may remain)
        s.bind(("127.0.0.1", port))
    assert f"after {sig.name}" in (tmp_path / "server.log").read_text()


def finished(out: Path) -> list[Path]:
    root = out / "conditions"
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if (d / "record.json").is_file()
            and json.loads((d / "record.json").read_text()).get("status") == "ok"]
