"""The vllm-server engine's client against a fake OpenAI-compatible server (no vLLM, no model).

The fake answers `/v1/completions` like `vllm serve` does for token-id prompts with `max_tokens=1`,
`logprob_token_ids` and `return_tokens_as_token_ids`, with log-probs that are a fixed function of
the model, prompt and token (`fake_logprob`). Every test that scores compares exact values with
`expected`, which reads labels token by token without the engine's read planning, so a read sent
to the wrong prompt, a reply matched to the wrong read or a wrong sum changes the numbers.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from iclsft.engine import vllm_server
from iclsft.engine.reads import adapter_name
from iclsft.engine.vllm_server import ServerError, VLLMServerEngine

BASE = "smollm2-135m"
TOL = 1e-12  # the values travel as JSON floats: exact up to the last bit of a double sum


def fake_logprob(model: str, prompt: list[int], token: int) -> float:
    shift = 0 if model == BASE else 50  # an adapter answers differently from the base model
    return -((sum(prompt) % 97) + token + shift) / 100


def expected(model: str, prefix, queries, labels) -> np.ndarray:
    return np.array([[sum(fake_logprob(model, [*prefix, *q, *label[:i]], t) for i, t in enumerate(label))
                      for label in labels] for q in queries])


class FakeVLLM(ThreadingHTTPServer):
    """`vllm serve` as the engine sees it; knobs for its failures, and a log of what it was sent."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.api_key: str | None = None
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict | None, dict]] = []  # method, path, body, headers
        self.adapters = {"registered-at-start"}  # served adapters (vllm serve --lora-modules)
        self.list_base = True
        self.allow_loading = True  # VLLM_ALLOW_RUNTIME_LORA_UPDATING
        self.fail: list[int] = []  # statuses for the next completion requests, first to last
        self.die_after: int | None = None  # completion requests answered before the server "dies"
        self.death = "500"  # how it dies: "500", "close" (no answer at all) or "truncate" (half a body)
        self.drop_choice = False
        self.html_models = False  # a proxy's HTML page where /v1/models should be
        self.bad_json = 0  # completion replies that claim JSON but are not, before good ones

    def sent(self, path: str) -> list[dict]:
        return [body for _, p, body, _ in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    server: FakeVLLM

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _reply(self, status: int, payload, content_type: str = "application/json") -> None:
        data = (json.dumps(payload) if content_type == "application/json" else payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        fake = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with fake.lock:
            fake.requests.append((method, self.path, body, dict(self.headers)))
            n_completions = len(fake.sent("/v1/completions"))
        if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            return self._reply(401, {"error": "Unauthorized"})
        if (method, self.path) == ("GET", "/v1/models") and fake.html_models:
            return self._reply(200, "<html><body>Welcome to nginx</body></html>", "text/html")
        if (method, self.path) == ("GET", "/v1/models"):
            data = [{"id": name, "object": "model", "root": f"/adapters/{name}", "parent": BASE}
                    for name in sorted(fake.adapters)]
            if fake.list_base:
                data.insert(1, {"id": BASE, "object": "model", "root": "/models/smollm2", "parent": None})
            return self._reply(200, {"object": "list", "data": data})
        if (method, self.path) == ("POST", "/v1/load_lora_adapter"):
            if not fake.allow_loading:  # vLLM does not register the route at all
                return self._reply(404, {"detail": "Not Found"})
            if body["lora_name"] in fake.adapters:
                return self._reply(400, {"error": {"message": f"The lora adapter '{body['lora_name']}' has "
                                                              "already been loaded."}})
            fake.adapters.add(body["lora_name"])
            return self._reply(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.", "text/plain")
        if (method, self.path) == ("POST", "/v1/unload_lora_adapter"):
            fake.adapters.discard(body["lora_name"])
            return self._reply(200, "Success", "text/plain")
        if (method, self.path) == ("POST", "/v1/completions"):
            return self._complete(body, n_completions)
        return self._reply(404, {"detail": "Not Found"})

    def _complete(self, body: dict, n: int) -> None:
        fake = self.server
        with fake.lock:
            status = fake.fail.pop(0) if fake.fail else None
        if status is not None:
            return self._reply(status, {"error": {"message": f"injected {status}"}})
        with fake.lock:
            garbled = fake.bad_json > 0
            fake.bad_json -= garbled
        if garbled:
            return self._reply(200, '{"choices": [', "application/json; charset=utf-8")  # not dumped: raw
        if fake.die_after is not None and n > fake.die_after:
            if fake.death == "close":
                self.close_connection = True
                return None
            if fake.death == "truncate":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"choices": [{"index": 0, ')
                self.close_connection = True
                return None
            return self._reply(500, {"error": {"message": "EngineDeadError"}})
        if body["model"] != BASE and body["model"] not in fake.adapters:
            return self._reply(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
        if body.get("max_tokens") != 1 or body.get("return_tokens_as_token_ids") is not True or not body["logprobs"]:
            return self._reply(400, {"error": {"message": f"unexpected request {body}"}})
        threading.Event().wait(0.02 if n % 2 == 0 else 0.0)  # replies finish out of order
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            top = {f"token_id:{t}": fake_logprob(body["model"], prompt, t) for t in body["logprob_token_ids"]}
            top["token_id:0"] = -0.01  # the sampled token comes along, as in vLLM
            choices.append({"index": index, "text": "token_id:0", "finish_reason": "length",
                            "logprobs": {"tokens": ["token_id:0"], "token_logprobs": [-0.01],
                                         "top_logprobs": [top], "text_offset": [0]}})
        choices.reverse()  # the engine must match choices by index, not by position
        if fake.drop_choice:
            choices = choices[1:]
        return self._reply(200, {"id": f"cmpl-{n}", "object": "text_completion", "model": body["model"],
                                 "choices": choices})


@pytest.fixture
def server():
    fake = FakeVLLM()
    thread = threading.Thread(target=fake.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield fake
    fake.shutdown()
    fake.server_close()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Backoff delays the engine asked for, without waiting them."""
    asked: list[float] = []
    monkeypatch.setattr(vllm_server.time, "sleep", asked.append)
    return asked


def engine_for(fake: FakeVLLM, **options) -> VLLMServerEngine:
    return VLLMServerEngine(fake.url, **{"timeout": 10.0, "retries": 0, "progress": False, **options})


def make_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(b"lora weights")
    return path


PREFIX = [1, 40, 41, 42]
QUERIES = [[10 + i, 20 + 3 * i] for i in range(9)]


# -- values ----------------------------------------------------------------------------------------


def test_single_token_labels_exact_values(server):
    engine = engine_for(server)
    got = engine.score([1], [[10, 11], [12]], [[5], [6]])
    # by hand: prompt [1, 10, 11] sums to 22 -> -(22 + 5)/100, -(22 + 6)/100; [1, 12] sums to 13
    np.testing.assert_allclose(got, [[-0.27, -0.28], [-0.18, -0.19]], rtol=0, atol=TOL)


def test_values_and_order_with_small_chunks_and_concurrency(server):
    engine = engine_for(server, chunk=2, concurrency=3)
    labels = [[5], [6]]
    got = engine.score(PREFIX, QUERIES, labels)
    np.testing.assert_allclose(got, expected(BASE, PREFIX, QUERIES, labels), rtol=0, atol=TOL)
    bodies = server.sent("/v1/completions")
    # one read alone first (the prefix enters the cache), then the other 8 in chunks of 2
    assert [len(b["prompt"]) for b in bodies] == [1, 2, 2, 2, 2]
    assert all(b["model"] == BASE and sorted(b["logprob_token_ids"]) == [5, 6] for b in bodies)
    sent = sorted(tuple(p) for b in bodies for p in b["prompt"])
    assert sent == sorted(tuple(PREFIX + q) for q in QUERIES)  # each query read exactly once


def test_multi_token_labels_read_token_by_token(server):
    engine = engine_for(server, chunk=3, concurrency=2)
    labels = [[5, 6, 7], [5, 8], [9]]  # the first two share their first token
    got = engine.score(PREFIX, QUERIES, labels)
    np.testing.assert_allclose(got, expected(BASE, PREFIX, QUERIES, labels), rtol=0, atol=TOL)
    # by hand, query [10, 20] (prompt sum 154): label [5, 8] reads 5 after the prompt, 8 after prompt + [5]
    assert got[0, 1] == pytest.approx(-((154 % 97) + 5) / 100 - ((159 % 97) + 8) / 100, abs=TOL)
    prompts = sorted(tuple(p) for b in server.sent("/v1/completions") for p in b["prompt"])
    assert prompts == sorted(tuple(PREFIX + q + tail) for q in QUERIES for tail in ([], [5], [5, 6]))


def test_base_model_is_the_entry_without_parent(server):
    engine = engine_for(server)
    assert engine.base_model == BASE  # the listing starts with an adapter, whose parent is the base


def test_server_without_base_model(server):
    server.list_base = False
    with pytest.raises(ServerError, match=re.escape(server.url) + " lists no base model"):
        engine_for(server)


# -- adapters --------------------------------------------------------------------------------------


def test_adapter_is_loaded_once_under_its_content_name(server, tmp_path):
    adapter = make_adapter(tmp_path / "adapters" / "abc")
    name = adapter_name(adapter)
    engine = engine_for(server, chunk=4)
    labels = [[5], [6, 7]]
    for _ in range(2):
        got = engine.score(PREFIX, QUERIES, labels, adapter=str(adapter))
        np.testing.assert_allclose(got, expected(name, PREFIX, QUERIES, labels), rtol=0, atol=TOL)
    assert server.sent("/v1/load_lora_adapter") == [{"lora_name": name, "lora_path": str(adapter.resolve())}]
    assert {b["model"] for b in server.sent("/v1/completions")} == {name}

    base = engine.score(PREFIX, QUERIES, labels)  # the base model is still the base model
    np.testing.assert_allclose(base, expected(BASE, PREFIX, QUERIES, labels), rtol=0, atol=TOL)
    assert not np.allclose(base, got)

    engine.release(str(adapter))
    assert server.sent("/v1/unload_lora_adapter") == [{"lora_name": name}]
    assert name not in server.adapters
    engine.release(str(adapter))  # nothing held any more: no second unload
    engine.release(None)
    assert len(server.sent("/v1/unload_lora_adapter")) == 1


def test_adapter_the_server_already_serves_is_not_loaded_again(server, tmp_path):
    adapter = make_adapter(tmp_path / "abc")
    server.adapters.add(adapter_name(adapter))  # e.g. loaded by an earlier run against this server
    engine = engine_for(server)
    got = engine.score([1], [[10]], [[5]], adapter=str(adapter))
    np.testing.assert_allclose(got, [[-(11 + 5 + 50) / 100]], rtol=0, atol=TOL)
    assert server.sent("/v1/load_lora_adapter") == []


def test_adapter_loading_disabled_names_the_switch(server, tmp_path):
    server.allow_loading = False
    engine = engine_for(server)
    with pytest.raises(ServerError, match="404.*--allow-adapter-loading"):
        engine.score([1], [[10]], [[5]], adapter=str(make_adapter(tmp_path / "abc")))
    assert server.sent("/v1/completions") == []


# -- authentication --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong"])
def test_missing_or_wrong_api_key(server, key):
    server.api_key = "sk-right"
    with pytest.raises(ServerError, match=r"\(401\): wrong or missing API key"):
        engine_for(server, api_key=key)


def test_api_key_travels_in_the_authorization_header(server):
    server.api_key = "sk-right"
    engine = engine_for(server, api_key="sk-right", chunk=4)
    got = engine.score(PREFIX, QUERIES, [[5], [6]])
    np.testing.assert_allclose(got, expected(BASE, PREFIX, QUERIES, [[5], [6]]), rtol=0, atol=TOL)
    assert len(server.requests) == 4  # /v1/models, then 1 read alone and the other 8 in 2 chunks of 4
    assert {headers["Authorization"] for _, _, _, headers in server.requests} == {"Bearer sk-right"}


# -- failures --------------------------------------------------------------------------------------


def test_server_error_is_retried(server, sleeps):
    server.fail = [500]
    engine = engine_for(server, retries=2)
    got = engine.score([1], [[10, 11], [12]], [[5], [6]])
    np.testing.assert_allclose(got, [[-0.27, -0.28], [-0.18, -0.19]], rtol=0, atol=TOL)
    assert len(server.sent("/v1/completions")) == 3  # the first read twice, then the second
    assert sleeps == [2.0]


def test_bad_request_is_not_retried(server, sleeps):
    server.fail = [400]
    engine = engine_for(server, retries=3)
    with pytest.raises(ServerError, match="/v1/completions answered 400: .*injected 400"):
        engine.score([1], [[10]], [[5]])
    assert len(server.sent("/v1/completions")) == 1
    assert sleeps == []


def test_refused_connection_fails_fast_at_construction():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with pytest.raises(ServerError, match=re.escape(url) + ".*refused"):
        VLLMServerEngine(url, retries=3, timeout=10.0)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("death", ["500", "close", "truncate"])
def test_server_dying_mid_scoring_is_an_error(server, sleeps, death):
    server.die_after, server.death = 2, death
    engine = engine_for(server, chunk=2, concurrency=2, retries=1)
    with pytest.raises(ServerError, match=re.escape(server.url) + " failed /v1/completions after 2 attempt"):
        engine.score(PREFIX, QUERIES, [[5], [6]])
    assert len(server.sent("/v1/completions")) > 2  # it did get past the first reads


def test_fewer_choices_than_prompts_is_an_error(server):
    server.drop_choice = True
    engine = engine_for(server, chunk=4)
    with pytest.raises(ServerError, match="returned 0 results for 1 prompts"):
        engine.score(PREFIX, QUERIES, [[5], [6]])


def test_a_page_that_is_not_json_is_a_clear_error(server):
    server.html_models = True
    with pytest.raises(ServerError, match="did not answer with JSON.*nginx"):
        VLLMServerEngine(server.url)


def test_invalid_json_reply_is_retried_then_an_error(server, sleeps):
    engine = VLLMServerEngine(server.url, retries=1, progress=False)
    server.bad_json = 1
    got = engine.score([1, 2], [[3], [4]], [[5], [6]])  # one garbled reply, then the retry succeeds
    np.testing.assert_allclose(got, expected(BASE, [1, 2], [[3], [4]], [[5], [6]]), rtol=0, atol=TOL)
    server.bad_json = 10
    with pytest.raises(ServerError, match="not valid JSON"):
        engine.score([1, 2], [[7]], [[5]])
