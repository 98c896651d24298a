"""The `vllm-server` engine: the same reads as the `vllm` engine, sent to a running vLLM
OpenAI-compatible server (`vllm serve` or `iclsft-eval serve`).

Reads go to `/v1/completions` as token-id prompts with `max_tokens=1`, `logprob_token_ids` and
`return_tokens_as_token_ids` (so log-probs come back keyed by token id, never by decoded text), in
chunks, several chunks in flight. Adapters are loaded at run time through
`/v1/load_lora_adapter` under their content-hash name (the server must allow runtime loading:
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, or `iclsft-eval serve --allow-adapter-loading`); an
adapter the server already serves under that name is used as is.

A request carries at most `chunk` reads (64), so that it finishes well within the timeout even on
a slow server (a CPU server reads about 5 short prompts/s: 4 requests in flight wait about 50 s).
Every request has a timeout and bounded retries with backoff; when they are spent the call fails
with a message naming the server, and the condition is recorded as failed (a rerun resumes).

`generate` sends the same token-id prompts with `max_tokens` = the answer limit, temperature 0,
repetition penalty 1, the caller's `stop_token_ids`, `ignore_eos` and `return_token_ids` (vLLM's
extensions of the completions API): greedy continuations as the in-process engines give them.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from iclsft.engine.contract import Engine, check_generate_args
from iclsft.engine.reads import adapter_name, plan_reads
from iclsft.models import fingerprint as model_fingerprint


class ServerError(RuntimeError):
    """The server could not be reached or kept failing; nothing was written for the condition."""


class VLLMServerEngine(Engine):
    name = "vllm-server"

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 300.0, retries: int = 3,
                 concurrency: int = 4, chunk: int = 64, progress: bool = True):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--vllm-url {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout, self.retries, self.concurrency, self.chunk = timeout, retries, concurrency, chunk
        self.progress = progress
        self.base_model = self._base_model()
        self._loaded: set[str] = set()

    # -- HTTP -------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, *, retry: bool = True) -> dict | str:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.retries + 1 if retry else 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(2.0**attempt, 30.0))
            req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    text = resp.read().decode()
                    return json.loads(text) if "json" in resp.headers.get("Content-Type", "") else text
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code in (401, 403):
                    raise ServerError(f"vLLM server at {self.url} refused the request ({e.code}): "
                                      "wrong or missing API key (--vllm-api-key / ICLSFT_VLLM_API_KEY)") from e
                if e.code < 500:  # our request is wrong: retrying will not help
                    raise ServerError(f"vLLM server at {self.url}{path} answered {e.code}: {detail}") from e
                last = f"{e.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, http.client.HTTPException) as e:
                # HTTPException: a reply cut off mid-body (IncompleteRead) or a garbled status line
                last = str(getattr(e, "reason", e))
            except json.JSONDecodeError as e:
                last = f"a reply that is not valid JSON ({e})"
        hint = " (a slow or busy server: raise --vllm-timeout)" if "timed out" in last else ""
        raise ServerError(f"vLLM server at {self.url} failed {path} after {attempts} attempt(s): {last}{hint}")

    def _json(self, method: str, path: str, body: dict | None = None, *, retry: bool = True) -> dict:
        reply = self._request(method, path, body, retry=retry)
        if not isinstance(reply, dict):
            raise ServerError(f"{self.url}{path} did not answer with JSON (is it a vLLM server?): {str(reply)[:200]!r}")
        return reply

    def _base_model(self) -> str:
        data = self._json("GET", "/v1/models", retry=False).get("data", [])
        bases = [m["id"] for m in data if not m.get("parent")]
        if not bases:
            raise ServerError(f"vLLM server at {self.url} lists no base model in /v1/models")
        return bases[0]

    def check_model(self, path: str | Path, fingerprint: str) -> None:
        """Refuse a server whose base model is not the run's model (its `root`, when a local directory,
        must have the same content fingerprint). A server that does not say where its model is, or
        loaded it from a directory this machine cannot read, cannot be checked and is accepted."""
        root = self.base_root()
        if root and Path(root).is_dir():
            if Path(root).resolve() != Path(path).resolve() and model_fingerprint(Path(root)) != fingerprint:
                raise ValueError(f"vLLM server at {self.url} serves {root}, not the run's model {path}")

    def base_root(self) -> str | None:
        """Where the server loaded its base model from (`root` in /v1/models), if it says."""
        return next((m.get("root") for m in self.served_models() if m["id"] == self.base_model), None)

    def served_models(self) -> list[dict]:
        return self._json("GET", "/v1/models").get("data", [])

    # -- adapters ---------------------------------------------------------------------------
    def _model_for(self, adapter: str | None) -> str:
        if adapter is None:
            return self.base_model
        name = adapter_name(adapter)
        if name in self._loaded:
            return name
        if name not in {m["id"] for m in self.served_models()}:
            try:
                self._request("POST", "/v1/load_lora_adapter",
                              {"lora_name": name, "lora_path": str(Path(adapter).resolve())})
            except ServerError as e:
                if "already" not in str(e):
                    raise ServerError(f"{e} (the server must allow runtime adapter loading: start it with "
                                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or iclsft-eval serve "
                                      "--allow-adapter-loading)") from e
        self._loaded.add(name)
        return name

    def release(self, adapter: str | None) -> None:
        if adapter is None:
            return
        name = adapter_name(adapter)
        if name in self._loaded:
            self._loaded.discard(name)
            try:
                self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, retry=False)
            except ServerError:
                pass  # the server may not allow unloading; the adapter then stays, which is harmless

    # -- scoring ----------------------------------------------------------------------------
    def _read_chunk(self, model: str, prompts: list[list[int]], token_ids: list[int]) -> list[dict[int, float]]:
        body = {"model": model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                "logprob_token_ids": token_ids, "return_tokens_as_token_ids": True}
        reply = self._json("POST", "/v1/completions", body)
        choices = sorted(reply.get("choices", []), key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise ServerError(f"vLLM server at {self.url} returned {len(choices)} results for {len(prompts)} prompts")
        values = []
        for choice in choices:
            top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
            values.append({int(k.removeprefix("token_id:")): float(v) for k, v in top.items()})
        return values

    def score(
        self,
        prefix: Sequence[int],
        queries: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        adapter: str | None = None,
    ) -> np.ndarray:
        return self.score_served(self._model_for(adapter), prefix, queries, labels)

    def score_served(self, model: str, prefix: Sequence[int], queries: Sequence[Sequence[int]],
                     labels: Sequence[Sequence[int]]) -> np.ndarray:
        """`score` against a model the server already serves under `model` (base or adapter name)."""
        plan = plan_reads(prefix, queries, labels)
        if not plan.prompts:
            return np.zeros((0, len(labels)))
        # reads that ask for the same token ids travel together (all of them, for one-token labels)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, ids in enumerate(plan.token_ids):
            groups.setdefault(tuple(sorted(ids)), []).append(i)
        values: list[dict[int, float]] = [{}] * len(plan.prompts)
        calls = [(members, lambda members, ids=list(ids): self._read_chunk(model, [plan.prompts[i] for i in members],
                                                                           ids))
                 for ids, members in groups.items()]
        for i, value in self._in_chunks(calls, len(plan.prompts), "scoring"):
            values[i] = value
        return plan.assemble(values, len(queries), len(labels))

    def _in_chunks(self, calls: list[tuple[list[int], Callable[[list[int]], list]]], total: int,
                   desc: str) -> list[tuple[int, object]]:
        """(index, result) for every index of every call's members: the first index alone first (its
        prefix enters the server's cache), then the rest in chunks of `chunk`, `concurrency` in flight."""
        first_members, first_call = calls[0]
        first = first_members[0]
        done = [(first, first_call([first])[0])]
        jobs = []
        for members, call in calls:
            members = [i for i in members if i != first]
            for start in range(0, len(members), self.chunk):
                jobs.append((members[start : start + self.chunk], call))
        from tqdm.auto import tqdm

        bar = tqdm(total=total, disable=not (self.progress and total >= 2000), unit="q", desc=desc, leave=False)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [(members, pool.submit(call, members)) for members, call in jobs]
            try:
                for members, future in futures:
                    done += zip(members, future.result())
                    bar.update(len(members))
            finally:
                for _, future in futures:
                    future.cancel()
                bar.close()
        return done

    # -- generation -------------------------------------------------------------------------
    def generate(self, prefix: Sequence[int], queries: Sequence[Sequence[int]], *, stop_ids: Sequence[int],
                 max_new_tokens: int, adapter: str | None = None) -> list[list[int]]:
        check_generate_args(self.name, queries, max_new_tokens)
        if not queries:
            return []
        model = self._model_for(adapter)
        prompts = [list(prefix) + list(q) for q in queries]
        stop = sorted({int(t) for t in stop_ids})
        out: list[list[int]] = [[] for _ in prompts]
        call = (list(range(len(prompts))),
                lambda members: self._generate_chunk(model, [prompts[i] for i in members], stop, max_new_tokens))
        for i, tokens in self._in_chunks([call], len(prompts), "generating"):
            out[i] = tokens
        return out

    def _generate_chunk(self, model: str, prompts: list[list[int]], stop: list[int], max_new_tokens: int
                        ) -> list[list[int]]:
        body = {"model": model, "prompt": prompts, "max_tokens": max_new_tokens, "temperature": 0.0,
                "repetition_penalty": 1.0, "stop_token_ids": stop, "ignore_eos": True, "return_token_ids": True}
        reply = self._json("POST", "/v1/completions", body)
        choices = sorted(reply.get("choices", []), key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise ServerError(f"vLLM server at {self.url} returned {len(choices)} results for {len(prompts)} prompts")
        out = []
        for choice in choices:
            tokens = choice.get("token_ids")
            if tokens is None:
                raise ServerError(f"vLLM server at {self.url} returned no token_ids (return_token_ids needs "
                                  "vLLM >= 0.10.2)")
            cut = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))  # vLLM keeps the stop token
            out.append([int(t) for t in tokens[:cut]])
        return out

    def close(self) -> None:
        for name in list(self._loaded):
            self._loaded.discard(name)
