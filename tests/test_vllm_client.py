"""The vllm-server engine's client against a fake OpenAI-compatible server (no vLLM, no model).

The fake answers `/v1/completions` like `vllm serve` does for token-id prompts with `max_tokens=1`,
`logprob_token_ids` and `return_tokens_as_token_ids`, with log-probs that are a fixed function of
the model, prompt and token (`fake_logprob`); and greedy generation requests (`return_token_ids`,
`stop_token_ids`) with a fixed next token per model and sequence (`fake_next`), the stop token kept
at the end of `token_ids` as vLLM keeps it. Every test that scores compares exact values with
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


def fake_next(model: str, seq: list[int]) -> int:
    shift = 0 if model == BASE else 7
    return 100 + (sum(seq) + len(seq) + shift) % 20


def expected_generation(model: str, prefix, queries, stop, n) -> list[list[int]]:
    """Greedy tokens after prefix + each query, up to a stop token (left out) or n tokens."""
    out = []
    for q in queries:
        seq, new = [*prefix, *q], []
        while len(new) < n:
            token = fake_next(model, seq)
            if token in stop:
                break
            new.append(token)
            seq.append(token)
        out.append(new)
    return out


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
        self.base_root = "/models/smollm2"  # where the server says it loaded its base model

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
                data.insert(1, {"id": BASE, "object": "model", "root": fake.base_root, "parent": None})
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
        if body.get("return_token_ids"):
            return self._generate(body, n)
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


    def _generate(self, body: dict, n: int) -> None:
        greedy = {"temperature": 0.0, "repetition_penalty": 1.0, "ignore_eos": True}
        if any(body.get(k) != v for k, v in greedy.items()) or not isinstance(body.get("stop_token_ids"), list):
            return self._reply(400, {"error": {"message": f"not a greedy request {body}"}})
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            seq, tokens = list(prompt), []
            while len(tokens) < body["max_tokens"]:
                tokens.append(fake_next(body["model"], seq))
                seq.append(tokens[-1])
                if tokens[-1] in body["stop_token_ids"]:
                    break  # vLLM keeps the stop token in token_ids
            choices.append({"index": index, "text": "", "token_ids": tokens, "finish_reason": "stop"})
        choices.reverse()
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


def test_greedy_generation_in_chunks_stops_at_stop_ids(server):
    engine = engine_for(server, chunk=3, concurrency=2)
    stop = [105, 110, 117]
    got = engine.generate(PREFIX, QUERIES, stop_ids=stop, max_new_tokens=6)
    assert got == expected_generation(BASE, PREFIX, QUERIES, stop, 6)
    # by hand, query [10, 20]: prompt [1, 40, 41, 42, 10, 20] (sum 154, 6 tokens) -> 100 + 160 % 20 = 100,
    # then sum 254, 7 tokens -> 100 + 261 % 20 = 101, then 355, 8 -> 103, then 458, 9 -> 107, ...
    assert got[0][:4] == [100, 101, 103, 107]
    assert any(len(t) < 6 for t in got) and any(len(t) == 6 for t in got)  # some stopped, some ran out
    bodies = server.sent("/v1/completions")
    sizes = [len(b["prompt"]) for b in bodies]  # one alone first, then chunks of 3 (2 at once: in any order)
    assert sizes[0] == 1 and sorted(sizes[1:]) == [2, 3, 3]
    assert all(b["max_tokens"] == 6 and b["stop_token_ids"] == stop for b in bodies)


def test_greedy_generation_with_an_adapter(server, tmp_path):
    adapter = make_adapter(tmp_path / "abc")
    engine = engine_for(server)
    got = engine.generate(PREFIX, QUERIES[:3], stop_ids=[], max_new_tokens=4, adapter=str(adapter))
    assert got == expected_generation(adapter_name(adapter), PREFIX, QUERIES[:3], [], 4)
    assert got != engine.generate(PREFIX, QUERIES[:3], stop_ids=[], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0 \\(vllm-server engine\\)"):
        engine.generate(PREFIX, QUERIES, stop_ids=[], max_new_tokens=0)


def test_check_model_compares_the_servers_model_directory(server, tmp_path):
    from iclsft.models import fingerprint

    ours, other = tmp_path / "ours", tmp_path / "other"
    for path, layers in ((ours, 2), (other, 3)):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    engine = engine_for(server)
    engine.check_model(ours, fingerprint(ours))  # "/models/smollm2" is not here: nothing to compare
    server.base_root = str(other)
    with pytest.raises(ValueError, match=f"serves {re.escape(str(other))}, not the run's model"):
        engine.check_model(ours, fingerprint(ours))
    engine.check_model(other, fingerprint(other))
    server.base_root = str(ours)
    engine.check_model(tmp_path / "ours", fingerprint(ours))


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
