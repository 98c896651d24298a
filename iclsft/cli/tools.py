"""Tool commands: `bench` (scoring throughput) and `models` (prepare and list models)."""

from __future__ import annotations

from pathlib import Path

import click

from iclsft.cli.app import _number_list, main, setup_logging, user_errors
from iclsft.models import list_models, prepare_model
from iclsft.names import DEFAULT_MODEL, DTYPES


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--shots", default="10", callback=_number_list(int, "shots"), show_default=True,
              help="ICL shot counts K (per class), comma-separated.")
@click.option("--queries", default=500, show_default=True, help="Grid queries per workload (10000: the full grid).")
@click.option("--adapters", default=0, show_default=True, help="Random LoRA adapters to score zero-shot (needs peft).")
@click.option("--naive-sample", default=2, show_default=True,
              help="Queries timed for the naive loop and lm-eval-style scoring (extrapolated).")
@click.option("--vllm", "with_vllm", is_flag=True,
              help="Also our vllm engine, plain vLLM and lm-eval-style scoring (each vLLM start takes minutes).")
@click.option("--vllm-sample", default=16, show_default=True, help="Queries timed for vllm and plain vLLM.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--token-budget", default=1024, show_default=True, help="hf engine: tokens per packed forward.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder to write throughput.json and throughput.md into.")
@user_errors
def bench(model, shots, queries, adapters, naive_sample, with_vllm, vllm_sample, dtype, token_budget, threads, out):
    """Scoring throughput of the hf engine against a naive per-query loop (and vLLM with --vllm);
    prints queries/s, speed ratios and GFLOP/s against this machine's measured matmul peak."""
    from iclsft.bench import VLLM_METHODS, BenchSpec, markdown, run_bench, write_results  # torch

    spec = BenchSpec(model=model, shots=shots, queries=queries, adapters=adapters,
                     methods=("naive", "hf") + (VLLM_METHODS if with_vllm else ()), naive_sample=naive_sample,
                     vllm_sample=min(vllm_sample, queries), dtype=dtype, token_budget=token_budget, threads=threads)
    setup_logging(False)
    results = run_bench(spec)
    click.echo(markdown(results))
    if out is not None:
        for path in write_results(results, Path(out) / "throughput"):
            click.echo(f"wrote {path}", err=True)


@main.group()
def models() -> None:
    """Prepare and list models."""


@models.command("prepare")
@click.argument("name", default=DEFAULT_MODEL)
@click.option("--force", is_flag=True, help="Convert again even if a prepared copy exists.")
@user_errors
def models_prepare(name, force):
    """Convert a known model (default smollm2-135m; also gemma3-270m) into the cache under $ICLSFT_HOME."""
    click.echo(prepare_model(name, force=force))


@models.command("list")
def models_list():
    """Known models and whether they are prepared."""
    for row in list_models():
        click.echo(f"{row['name']:<16} {row['state']:<13} {row['path']}\n{'':<16} {row['description']}")
        if "licence" in row:
            click.echo(f"{'':<16} licence: {row['licence']}")
