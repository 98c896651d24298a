"""The `vllm` engine: an in-process `vllm.LLM`, prefix caching on, adapters as LoRARequests.

Each read is a token-id prompt (`prefix + query [+ label head]`) asking for one token with
`logprob_token_ids` = the label tokens: vLLM returns their exact full-vocabulary log-probs (raw
mode, before any sampling processor). All reads of one call are submitted together after one
warm-up read that puts the prefix's blocks into the prefix cache; every later read recomputes only
the tail past the last full cache block: 16 tokens on GPU; on CPU we ask for 32 (vLLM's CPU
default is 128, its CPU attention takes multiples of 32; 32 is 2.8–3.5× faster on the ICL grid,
same log-probs: docs/findings.md).

Adapters are named and numbered by their content hash (`reads.adapter_name`), never by path, so
two adapters never share prefix-cache entries (vLLM keys the cache by adapter name).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iclsft.engine.reads import adapter_name, adapter_rank, plan_reads, vllm_lora_rank

CPU_KV_CACHE_GIB = 4  # vLLM's CPU default is half the machine's memory
CPU_BLOCK_SIZE = 32  # the smallest cache block vLLM's CPU attention accepts (its default: 128)


class VLLMEngine:
    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        lora_rank: int | None = None,
        max_loras: int = 1,
        block_size: int | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        progress: bool = True,
        seed: int = 0,
    ):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("the vllm engine needs vLLM: pip install 'iclsft-eval[cpu]' on CPUs "
                              "or 'iclsft-eval[gpu]' on NVIDIA GPUs") from e
        import torch

        kwargs: dict = {"model": str(model_path), "dtype": dtype, "enable_prefix_caching": True, "seed": seed}
        if lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=max_loras,
                          max_cpu_loras=max(max_loras, 4))
        if block_size is not None:
            kwargs["block_size"] = block_size
        if torch.cuda.is_available():
            if gpu_memory_utilization is not None:
                kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
            kwargs.setdefault("block_size", CPU_BLOCK_SIZE)
        self.llm = LLM(**kwargs)
        self.max_lora_rank = kwargs.get("max_lora_rank")
        self.progress = progress
        self._lora_ids: dict[str, int] = {}
        self.last_stats: dict = {}  # of the last score call: reads, prompt tokens, tokens read from the cache

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

    def score(
        self,
        prefix: Sequence[int],
        queries: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        adapter: str | None = None,
    ) -> np.ndarray:
        from vllm import SamplingParams, TokensPrompt

        plan = plan_reads(prefix, queries, labels)
        if not plan.prompts:
            return np.zeros((0, len(labels)))
        lora = self._lora_request(adapter)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in plan.prompts]
        params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprob_token_ids=ids)
                  for ids in plan.token_ids]
        # one read alone first: its prefix blocks enter the cache before the others are scheduled
        outputs = self.llm.generate(prompts[:1], params[:1], lora_request=lora, use_tqdm=False)
        if len(prompts) > 1:
            outputs += self.llm.generate(prompts[1:], params[1:], lora_request=lora,
                                         use_tqdm=self.progress and len(prompts) >= 2000)
        self.last_stats = {"reads": len(outputs), "prompt_tokens": sum(len(p) for p in plan.prompts),
                           "cached_tokens": sum(getattr(o, "num_cached_tokens", 0) or 0 for o in outputs)}
        values = []
        for i, out in enumerate(outputs):
            if not out.outputs or not out.outputs[0].logprobs:
                raise RuntimeError(f"vLLM returned no log-probs for read {i}")
            values.append({t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()})
        return plan.assemble(values, len(queries), len(labels))

    def release(self, adapter: str | None) -> None:
        """Nothing to do: vLLM keeps adapters in an LRU cache (max_cpu_loras) and evicts them itself."""

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()
