"""Commands that serve a run's adapters behind vLLM and query them: `serve`, `query`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from iclsft.cli.app import main, setup_logging, user_errors
from iclsft.engine_spec import VLLMOptions
from iclsft.names import VLLM_DTYPES
from iclsft.serve import query_points, serve_command
from iclsft.serve import serve as serve_run


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="ICLSFT_VLLM_API_KEY",
              help="Require this key (or $ICLSFT_VLLM_API_KEY); passed to vLLM in its environment.")
@click.option("--dtype", type=click.Choice(VLLM_DTYPES), default=None,
              help="Serving precision (default: the run's).")
@click.option("--allow-adapter-loading", is_flag=True,
              help="Let clients load adapters at run time (needed by --engine vllm-server; off by default).")
@click.option("--max-lora-rank", type=click.IntRange(1, 512), default=None,
              help="Largest rank of adapters loaded at run time (default: the run's largest, at least 8).")
@click.option("--max-loras", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Adapters per batch (each loaded at its first request; --max-cpu-loras, default "
                   "max(4, this), stay in memory). Other vLLM options, e.g. --max-model-len (default: the "
                   "run's longest prompt, at least 2048) or --tensor-parallel-size, pass on to vLLM.")
@click.option("--dry-run", is_flag=True, help="Print the vLLM command and the adapters, start nothing.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def serve(run_dir, host, port, api_key, dtype, allow_adapter_loading, max_lora_rank, max_loras, dry_run, vllm_args):
    """Serve a run's base model and its finished adapters with vLLM (extra args go to `vllm serve`)."""
    options = VLLMOptions(max_loras=max_loras)
    if dry_run:
        cmd, adapters = serve_command(run_dir, host=host, port=port, dtype=dtype,
                                      allow_adapter_loading=allow_adapter_loading, max_lora_rank=max_lora_rank,
                                      options=options, extra=vllm_args)
        for a in adapters:
            click.echo(f"{a.name}\t{a.path}")
        click.echo(shlex.join(cmd))
        return
    setup_logging(False)
    code = serve_run(run_dir, host=host, port=port, api_key=api_key, allow_adapter_loading=allow_adapter_loading,
                     dtype=dtype, extra=vllm_args, max_lora_rank=max_lora_rank, options=options)
    sys.exit(code)


@main.command()
@click.argument("point", nargs=-1, type=int, required=True)
@click.option("--url", required=True, help="Address of the server (iclsft-eval serve prints it).")
@click.option("--api-key", default=None, envvar="ICLSFT_VLLM_API_KEY")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run whose template and labels build the prompt (default: the built-in template).")
@click.option("--adapter", default=None, help="Served adapter name (default: the base model).")
@click.option("--icl", "icl_run", type=click.Path(path_type=Path), default=None,
              help="Prefix the query with this run's ICL prompt (needs --shots).")
@click.option("--shots", type=int, default=None, help="With --icl: exemplars per class.")
@click.option("--angle", type=float, default=None, help="With --icl: the run's angle (if it has several).")
@click.option("--seed", default=0, show_default=True, help="With --icl: the exemplar-stream seed.")
@user_errors
def query(point, url, api_key, run_dir, adapter, icl_run, shots, angle, seed):
    """Both label probabilities for input points: `query --url URL --adapter NAME 12 45 [60 10 ...]`."""
    if len(point) % 2:
        raise click.BadParameter(f"{len(point)} numbers given: points are pairs n1 n2", param_hint="POINT")
    points = list(zip(point[0::2], point[1::2]))
    rows = query_points(url, points, run_dir=run_dir, adapter=adapter, icl_run=icl_run, shots=shots, angle=angle,
                        seed=seed, api_key=api_key)
    labels = [k for k in rows[0] if k not in ("n1", "n2")]
    click.echo("n1  n2  " + "  ".join(f"p({label.strip()})" for label in labels))
    for row in rows:
        click.echo(f"{row['n1']:<3} {row['n2']:<3} " + "  ".join(f"{row[label]:.4f}".rjust(len(label) + 3)
                                                           for label in labels))
