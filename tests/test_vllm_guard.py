"""serve's guard against vLLM's CPU LoRA prompt-log-prob crash (iclsft.engine.vllm_guard), around a
stand-in for vLLM's app that records what reaches it and how many requests it holds at once. The real
server is checked in tests/test_serve.py (a 12-prompt echo request and one beside generations)."""

from __future__ import annotations

import asyncio
import json

from iclsft.engine.vllm_guard import PromptLogprobsGuard, join, prompts_of, wants_prompt_logprobs


class FakeVLLM:
    """Answers a completions request with one choice per prompt (text = the prompt), after `delay` s;
    records each body and the most requests it held at once while a prompt-log-prob one was among them."""

    def __init__(self, delay=0.05):
        self.delay, self.bodies, self.inflight, self.mixed = delay, [], [], 0

    async def __call__(self, scope, receive, send):
        data, more = b"", True
        while more:
            message = await receive()
            data, more = data + message.get("body", b""), message.get("more_body", False)
        body = json.loads(data) if data else {}
        self.bodies.append(body)
        self.inflight.append(body)
        if len(self.inflight) > 1 and any(wants_prompt_logprobs(scope["path"], b) for b in self.inflight):
            self.mixed += 1
        await asyncio.sleep(self.delay)
        self.inflight.remove(body)
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) and not isinstance(prompt[0], int) else [prompt]
        if body.get("prompt") == "bad":
            return await _reply(send, 422, {"error": {"message": "bad prompt"}})
        answer = {"id": "x", "choices": [{"index": i, "text": str(p)} for i, p in enumerate(prompts)],
                  "usage": {"prompt_tokens": 3 * len(prompts), "completion_tokens": 1,
                            "total_tokens": 3 * len(prompts) + 1}}
        await _reply(send, 200, answer)


async def _reply(send, status, payload):
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def call(app, body: dict | None, path="/v1/completions", method="POST"):
    data = json.dumps(body).encode() if body is not None else b""
    chunks = [data[: len(data) // 2], data[len(data) // 2:]]  # the body in two messages, as a client may send it
    sent, start, out = iter(enumerate(chunks)), {}, []

    async def receive():
        try:
            i, part = next(sent)
        except StopIteration:
            await asyncio.sleep(3600)  # no disconnect
        return {"type": "http.request", "body": part, "more_body": i == 0}

    async def send(message):
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            out.append(message.get("body", b""))

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}
    await app(scope, receive, send)
    return start["status"], json.loads(b"".join(out) or b"null")


ECHO = {"model": "m", "echo": True, "logprobs": 1, "max_tokens": 1}


def test_which_requests_compute_prompt_logprobs():
    """As vLLM's to_sampling_params decides: completions with echo and logprobs (0 included), any
    prompt_logprobs, chat completions with echo (top_logprobs defaults to 0)."""
    assert wants_prompt_logprobs("/v1/completions", {"echo": True, "logprobs": 0})
    assert not wants_prompt_logprobs("/v1/completions", {"echo": True})
    assert not wants_prompt_logprobs("/v1/completions", {"logprobs": 5})
    assert wants_prompt_logprobs("/v1/completions", {"prompt_logprobs": 0})
    assert wants_prompt_logprobs("/v1/chat/completions", {"echo": True})
    assert not wants_prompt_logprobs("/v1/chat/completions", {"logprobs": True, "top_logprobs": 3})
    assert not wants_prompt_logprobs("/v1/completions", ["not", "a", "dict"])
    assert prompts_of("/v1/completions", {"prompt": [1, 2, 3]}) is None  # one prompt of token ids
    assert prompts_of("/v1/completions", {"prompt": [[1, 2], [3]]}) == [[1, 2], [3]]
    assert prompts_of("/v1/completions", {"prompt": ["a"]}) is None
    assert prompts_of("/v1/chat/completions", {"prompt": ["a", "b"]}) is None


def test_several_prompts_go_one_by_one_and_come_back_as_one_answer():
    app = FakeVLLM()
    status, answer = asyncio.run(call(PromptLogprobsGuard(app), {**ECHO, "prompt": ["a", "b", [7, 8]]}))
    assert status == 200
    assert [b["prompt"] for b in app.bodies] == ["a", "b", [7, 8]]
    assert all(b["echo"] and b["logprobs"] == 1 for b in app.bodies)  # the rest of the request unchanged
    assert [(c["index"], c["text"]) for c in answer["choices"]] == [(0, "a"), (1, "b"), (2, "[7, 8]")]
    assert answer["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def test_a_prompt_logprob_request_never_shares_the_engine():
    """Generations, echo requests and batches sent at once: whenever a prompt-log-prob request is in
    the engine it is alone there; without the guard the stand-in sees them mixed."""
    async def burst(app):
        bodies = [{"model": "m", "prompt": f"g{i}", "max_tokens": 4} for i in range(6)]
        bodies[1:1] = [{**ECHO, "prompt": "e0"}]
        bodies[4:4] = [{**ECHO, "prompt": ["e1", "e2"]}, {"model": "m", "prompt": "p", "prompt_logprobs": 0}]
        return await asyncio.gather(*(call(app, b) for b in bodies))

    bare = FakeVLLM()
    asyncio.run(burst(bare))
    assert bare.mixed > 0
    app = FakeVLLM()
    answers = asyncio.run(burst(PromptLogprobsGuard(app)))
    assert [s for s, _ in answers] == [200] * len(answers)
    assert app.mixed == 0 and len(app.bodies) == 10
    assert [c["text"] for c in answers[4][1]["choices"]] == ["e1", "e2"]


def test_what_cannot_run_alone_is_refused_and_the_rest_passes_through():
    app = FakeVLLM()
    guard = PromptLogprobsGuard(app)
    for extra, words in (({"n": 3}, "n=3"), ({"use_beam_search": True}, "beam search"),
                         ({"stream": True, "prompt": ["a", "b"]}, "2 prompts with stream=true")):
        status, answer = asyncio.run(call(guard, {**ECHO, "prompt": "a", **extra}))
        assert status == 400 and words in answer["error"]["message"] and "#16668" in answer["error"]["message"]
    assert app.bodies == []  # nothing reached vLLM
    status, _ = asyncio.run(call(guard, {**ECHO, "prompt": "a", "stream": True}))  # one prompt streams fine
    status2, answer = asyncio.run(call(guard, {"model": "m", "prompt": ["a", "b"], "n": 2}))
    assert status == status2 == 200 and len(answer["choices"]) == 2 and app.bodies[-1]["prompt"] == ["a", "b"]
    assert asyncio.run(call(guard, None, path="/v1/models", method="GET"))[0] == 200


def test_the_first_failed_part_is_the_answer():
    app = FakeVLLM()
    status, answer = asyncio.run(call(PromptLogprobsGuard(app), {**ECHO, "prompt": ["a", "bad", "c"]}))
    assert status == 422 and answer == {"error": {"message": "bad prompt"}}
    assert [b["prompt"] for b in app.bodies] == ["a", "bad"]  # stopped there


def test_join_keeps_the_first_answers_fields():
    joined = join([{"id": "1", "model": "m", "choices": [{"index": 0, "text": "x"}], "usage": None},
                   {"id": "2", "model": "m", "choices": [{"index": 0, "text": "y"}], "usage": None}])
    assert joined["id"] == "1" and [c["index"] for c in joined["choices"]] == [0, 1] and joined["usage"] is None
