"""How each benchmarked method scores and is timed (iclsft.bench.run runs them side by side).

Each returns its label log-probs (for the check against the naive loop), the wall time of the
scoring alone, the tokens it ran through the model and the model FLOPs of those forward passes.
Warm-ups (first kernels, adapter loading in vLLM) happen before the clock starts; prefix
computation is inside it: every method starts each workload without a cached prefix.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from iclsft.bench.flops import forward_flops, tree_flops
from iclsft.engine.hf import HFEngine
from iclsft.engine.packing import pack
from iclsft.engine.reads import plan_reads
from iclsft.engine.reference import naive_score
from iclsft.engine.vllm_engine import VLLMEngine
from iclsft.sft.checkpoints import load_checkpoint


def naive(model, prefix, queries, labels, adapter: str | None) -> tuple[np.ndarray, float]:
    """One full forward per (query, label) on `model`, with the (verified) checkpoint `adapter` attached
    for the call and taken out again afterwards."""
    with nullcontext(model) if adapter is None else load_checkpoint(model, adapter) as scored:
        t = time.perf_counter()
        scores = naive_score(scored, prefix, queries, labels)
        seconds = time.perf_counter() - t
    return scores, seconds


def hf(model, prefix, queries, labels, adapter: str | None, budget: int,
       **options) -> tuple[np.ndarray, float, int, float]:
    """Our packed engine (HFEngine `options`) on every query, prefix included (a fresh engine holds no prefix)."""
    engine = HFEngine(model, token_budget=budget, progress=False, **options)
    t = time.perf_counter()
    scores = engine.score(prefix, queries, labels, adapter=adapter)
    seconds = time.perf_counter() - t
    engine.release(adapter)
    config = model.config
    flops, nodes = tree_flops(config, pack(queries, labels, budget), len(prefix))
    chunks = -(-len(prefix) // budget)  # the prefix runs in chunks of `budget` tokens, one head row each
    flops += forward_flops(config, len(prefix), head_rows=chunks)
    return scores, seconds, nodes + len(prefix), flops


def warm_up_hf(model, labels) -> None:
    """First forward passes pay one-time costs (thread pools, allocator): not part of any method."""
    HFEngine(model, progress=False).score([], [[16, 17, 18]] * 4, labels)


class VLLMRunner:
    """One vLLM engine for the benchmark. kind "ours": our VLLMEngine (method vllm); kind "plain": a
    `vllm.LLM` with default settings (methods vllm-plain and lm-eval)."""

    def __init__(self, kind: str, model_path: str | Path, dtype: str, lora_rank: int | None, tokenizer,
                 kv_cache_bytes: int, block_size: int | None = None):
        import torch

        self.kind = kind
        self.tokenizer = tokenizer
        if kind == "ours":
            self.engine = VLLMEngine(model_path, dtype=dtype, lora_rank=lora_rank, block_size=block_size,
                                     kv_cache_gib=kv_cache_bytes / 2**30, progress=False)
            self.llm = self.engine.llm
        else:
            from vllm import LLM

            extra = {} if torch.cuda.is_available() else {"kv_cache_memory_bytes": kv_cache_bytes}
            self.llm = LLM(model=str(model_path), dtype=dtype, **extra)
        self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size

    def score(self, method: str, prefix, queries, labels, adapter, config) -> tuple[np.ndarray, float, float, float]:
        run = {"vllm": self._ours, "vllm-plain": self._plain, "lm-eval": self._lm_eval}[method]
        run(prefix, queries[:1], labels, adapter)  # warm-up: kernels, adapter load
        self.llm.reset_prefix_cache()
        t = time.perf_counter()
        scores, tokens, flops = run(prefix, queries, labels, adapter, config)
        return scores, time.perf_counter() - t, tokens, flops

    def _ours(self, prefix, queries, labels, adapter, config=None):
        scores = self.engine.score(prefix, queries, labels, adapter=adapter)
        stats = self.engine.last_stats
        reads, cached = stats["reads"], stats["cached_tokens"]
        new = stats["prompt_tokens"] - cached
        # only totals are known: counted as `reads` equal reads of the mean length (approximate)
        flops = reads * forward_flops(config, new / reads, cached / reads, head_rows=1) if config else 0.0
        return scores, new, flops

    def _plain(self, prefix, queries, labels, adapter, config=None):
        """String prompts (vLLM tokenizes them), one read per label token, `logprob_token_ids`."""
        from vllm import SamplingParams

        plan = plan_reads(prefix, queries, labels)
        texts = [self.tokenizer.decode(p) for p in plan.prompts]
        params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids) for ids in plan.token_ids]
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        values = [{t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()} for out in outputs]
        tokens, flops = _work(outputs, config, all_rows=False)
        return plan.assemble(values, len(queries), len(labels)), tokens, flops

    def _lm_eval(self, prefix, queries, labels, adapter, config=None):
        """lm-evaluation-harness's vLLM `loglikelihood`: prompt log-probs of context + continuation
        token ids, one request per (query, label), summed over the continuation's positions."""
        from vllm import SamplingParams, TokensPrompt

        requests = [(list(prefix) + list(q), list(label)) for q in queries for label in labels]
        prompts = [TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in requests]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        values = []
        for (ctx, cont), out in zip(requests, outputs):
            values.append(sum(out.prompt_logprobs[len(ctx) + i][tok].logprob for i, tok in enumerate(cont)))
        tokens, flops = _work(outputs, config, all_rows=True)
        return np.array(values).reshape(len(queries), len(labels)), tokens, flops

    def close(self) -> None:
        if self.kind == "ours":
            self.engine.close()
        else:
            core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        del self.llm
        import gc

        gc.collect()


def _work(outputs: Sequence, config, all_rows: bool) -> tuple[float, float]:
    """Tokens computed (prompt minus prefix-cache hits) and their FLOPs, per request; the head runs at
    the last position, or at every computed one for prompt log-probs."""
    tokens = flops = 0.0
    for out in outputs:
        cached = getattr(out, "num_cached_tokens", 0) or 0
        new = len(out.prompt_token_ids) - cached
        tokens += new
        if config is not None:
            flops += forward_flops(config, new, cached, head_rows=new if all_rows else 1)
    return tokens, flops
