"""Throughput benchmark: our engines against the usual alternatives, on the same model and work.

One call of `run_bench` scores, in one process, ICL prompts at several K on grid queries and
random LoRA adapters zero-shot, with each method in `BenchSpec.methods`:

- `naive`: one full HF forward per (query, label) (engine/reference.py), on a small sample,
  extrapolated. Its log-probs are the reference for every other method's max |Δ|.
- `hf`: our packed token-tree engine (engine/hf.py) on every chosen query, prefix included.
- `hf-mask`: the same engine as it was before its fast path: one SDPA call per layer with a dense
  boolean mask over prefix + batch, LoRA branches unmerged.
- `vllm`: our vLLM engine (token-id prompts, prefix caching, `logprob_token_ids`), on a sample.
- `vllm-plain`: vLLM used the plain way: string prompts, default engine settings, one
  `logprob_token_ids` read per label token, on a sample (ICL only: adapters need LoRA enabled).
- `lm-eval`: lm-evaluation-harness's vLLM loglikelihood path: `prompt_logprobs` on
  prompt + label token ids, one request per (query, label), no prefix-cache reads (ICL only).

Figures per method and workload: queries/s, prompt tokens/s (the tokens of the prompts answered:
prefix + query), computed tokens per query, speed ratios, and achieved GFLOP/s = model FLOPs of
the forward passes the method ran (`forward_flops`) / wall time, against the fp32 and bf16
matmul peaks measured in the same run. The FLOP limit of a workload is the peak divided by the
FLOPs per query of the least work that answers it (the token tree's unique query tokens; the
prefix, computed once, is left out).

Modules, by job: `spec` (what is benchmarked: BenchSpec and the method names), `flops` (FLOP counting
and the measured matmul peak), `methods` (how each method scores and is timed), `run` (the run:
model, workloads, timings), `table` (the Markdown table and the written results).
"""

from iclsft.bench.flops import forward_flops, matmul_peak, naive_flops, tree_flops
from iclsft.bench.run import random_adapter, run_bench
from iclsft.bench.spec import METHODS, VLLM_METHODS, BenchSpec
from iclsft.bench.table import markdown, write_results

__all__ = ["METHODS", "VLLM_METHODS", "BenchSpec", "forward_flops", "markdown", "matmul_peak", "naive_flops",
           "random_adapter", "run_bench", "tree_flops", "write_results"]
