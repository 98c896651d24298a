"""The prefix part of tree attention alone, at the shipped models' shapes, kernel against kernel in one
process: torch's CPU flash kernel (the engine's default), the compiled GEMMs around an fp32 softmax
(`--prefix-kernel gemm`) and torch's compiled FlexAttention (a fused GEMM, online softmax, GEMM kernel;
timed without the log-sum-exp the engine needs to merge the prefix part with the tree part, which torch's
CPU FlexAttention does not return under compile). Per model, K and dtype: GFLOP/s (4 x rows x prefix keys x
head dim per KV head), each kernel's share of the matmul peak in its dtype measured in this process, and
its error against the same attention written out in float64 (outputs and log-sum-exps, on the first rows).

Shapes: the model's KV heads and head dim (its config), the query heads that share a KV head folded into
rows as the engine does (rows = token budget x heads per KV head), the prefix of K exemplars per class of
the benchmarks' grid workload (iclsft.bench.grid). Inputs are random (seeded), so scores are in the range
of real ones only roughly; the engine-level benchmark is prefix_kernels.py. Writes STEM.json and STEM.md.

    python benchmarks/prefix_attention.py                                 # both models, K = 10 and 200
    python benchmarks/prefix_attention.py --models smollm2-135m --shots 200 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("flash", "gemm", "flex")
CHECK_ROWS = 256  # rows compared with the float64 reference
MIN_SECONDS = 0.5  # timed seconds per kernel and round at least


def shape(name: str, shots: int, budget: int) -> dict:
    from transformers import AutoConfig

    from iclsft.bench.grid import grid_sample

    sample = grid_sample(name, 1)
    config = AutoConfig.from_pretrained(sample.ref.path)
    config = getattr(config, "text_config", config)
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"groups": groups, "rows": budget * (heads // groups), "prefix_tokens": len(sample.prefix(shots)),
            "head_dim": dim, "scale": getattr(config, "query_pre_attn_scalar", dim) ** -0.5}


def kernel_call(kernel: str, q, k, v, scale: float):
    """(outputs, log-sum-exps or None) of one kernel."""
    from iclsft.engine.tree_attention import prefix_attention

    if kernel != "flex":
        return prefix_attention(q, k, v, scale, kernel)
    return _flex()(q, k, v, scale=scale), None


_flex_compiled = None


def _flex():
    global _flex_compiled
    if _flex_compiled is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def flex_lse() -> str:
    """Whether this torch's compiled CPU FlexAttention returns the log-sum-exp: "yes", or its error's first line."""
    import torch
    from torch.nn.attention import flex_attention as fa

    q = torch.randn(1, 1, 128, 64)
    want = {"return_aux": fa.AuxRequest(lse=True)} if hasattr(fa, "AuxRequest") else {"return_lse": True}
    try:
        torch.compile(fa.flex_attention, dynamic=False)(q, q, q, **want)
    except Exception as e:  # noqa: BLE001 - the answer is the error
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return "yes"


def reference(q, k, v, scale: float):
    """Attention written out in float64: outputs and log-sum-exps."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp() @ v.double(), lse


def one_shape(name: str, shots: int, dtype: str, budget: int, rounds: int, peak: float) -> list[dict]:
    import torch

    s = shape(name, shots, budget)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s["groups"], n, s["head_dim"], generator=gen).to(getattr(torch, dtype))
               for n in (s["rows"], s["prefix_tokens"], s["prefix_tokens"]))
    flops = 4 * s["groups"] * s["rows"] * s["prefix_tokens"] * s["head_dim"]
    o_ref, lse_ref = reference(q[:, :, :CHECK_ROWS], k, v, s["scale"])
    best, errors, failed = {}, {}, {}
    for _ in range(rounds):
        for kernel in KERNELS:
            if kernel in failed:
                continue
            try:
                o, lse = kernel_call(kernel, q, k, v, s["scale"])  # warm-up (and compile)
                t = time.perf_counter()
                kernel_call(kernel, q, k, v, s["scale"])
                once = time.perf_counter() - t
                reps = max(1, int(MIN_SECONDS / once))  # short calls repeated: a round lasts MIN_SECONDS or more
                t = time.perf_counter()
                for _ in range(reps):
                    kernel_call(kernel, q, k, v, s["scale"])
                best[kernel] = min(best.get(kernel, float("inf")), once, (time.perf_counter() - t) / reps)
            except Exception as e:  # noqa: BLE001 - a kernel this torch cannot run is a row, not a crash
                failed[kernel] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
                continue
            errors[kernel] = (float((o[:, :, :CHECK_ROWS].double() - o_ref).abs().max()),
                              None if lse is None else float((lse[:, :, :CHECK_ROWS].double() - lse_ref).abs().max()))
    rows = []
    for kernel in KERNELS:
        row = {"model": name, "shots": shots, "dtype": dtype, "kernel": kernel, **{x: s[x] for x in s if x != "scale"},
               "peak_gflop_per_s": peak}
        if kernel in failed:
            row["failed"] = failed[kernel]
        else:
            gflops = flops / best[kernel] / 1e9
            row.update(ms=round(best[kernel] * 1e3, 2), gflop_per_s=round(gflops, 1),
                       of_peak=round(gflops / peak, 3), x_flash=round(best["flash"] / best[kernel], 2),
                       max_abs_err_out=errors[kernel][0], max_abs_err_lse=errors[kernel][1],
                       returns_lse=errors[kernel][1] is not None)
        rows.append(row)
    return rows


def markdown(rows: list[dict], cpu: str, threads: int, lse: str) -> str:
    out = [f"### The prefix attention alone, {time.strftime('%Y-%m-%d')} ({cpu}, {threads} threads)", "",
           "Best of the interleaved rounds per kernel, one process; of peak: the kernel's GFLOP/s over the 2048³ "
           f"matmul rate in its dtype measured in this process; errors against float64 on the first {CHECK_ROWS} rows "
           "(random inputs). flex is timed without the log-sum-exp the engine needs to merge the prefix part with "
           f"the tree part; asked for it, compiled FlexAttention on this CPU answers: {lse}",
           "", "| model | K (prefix keys) | rows x KV heads x head dim | dtype | kernel | ms | GFLOP/s | of peak | "
           "x flash | max abs err: out / lse |", "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        where = (f"| {r['model']} | {r['shots']} ({r['prefix_tokens']}) | {r['rows']} x {r['groups']} x "
                 f"{r['head_dim']} | {r['dtype']} | {r['kernel']} |")
        if "failed" in r:
            out.append(f"{where} failed: {r['failed']} | | | | |")
            continue
        lse = "–" if r["max_abs_err_lse"] is None else f"{r['max_abs_err_lse']:.1e}"
        out.append(f"{where} {r['ms']} | {r['gflop_per_s']} | {r['of_peak']:.2f} of {r['peak_gflop_per_s']} | "
                   f"{r['x_flash']:.2f} | {r['max_abs_err_out']:.1e} / {lse} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--shots", default="10,200")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="float32 alone where the CPU emulates bf16 (its bf16 kernels run at ~1 GFLOP/s)")
    parser.add_argument("--token-budget", type=int, default=1024, help="tree nodes per packed batch (the engine's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "prefix_attention")
    args = parser.parse_args()
    import torch

    from iclsft.bench.flops import matmul_peak
    from iclsft.bench.machine import cpu_description

    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        parser.error(f"--dtypes {args.dtypes!r}: give float32, bfloat16 or both, comma-separated")
    cpu = f"{cpu_description()}, torch {torch.__version__}"
    peaks = {d: round(matmul_peak(d), 1) for d in dtypes}
    rows = [r for m in args.models.split(",") for k in args.shots.split(",") for d in dtypes
            for r in one_shape(m, int(k), d, args.token_budget, args.rounds, peaks[d])]
    after = {d: round(matmul_peak(d), 1) for d in dtypes}  # the peak at the end too: the higher kept
    for r in rows:
        r["peak_gflop_per_s"] = max(peaks[r["dtype"]], after[r["dtype"]])
        if "gflop_per_s" in r:
            r["of_peak"] = round(r["gflop_per_s"] / r["peak_gflop_per_s"], 3)
    lse = flex_lse()
    args.out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "threads": torch.get_num_threads(),
                                                        "flex_returns_lse": lse, "rows": rows}, indent=1) + "\n")
    table = markdown(rows, cpu, torch.get_num_threads(), lse)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
