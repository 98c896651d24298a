"""`iclsft-eval`: a thin click layer. It parses options, builds a spec and calls the library."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from iclsft import __version__
from iclsft.models import DEFAULT_MODEL

USER_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, ImportError, OSError)


def user_errors(fn):
    """Turn bad input (and failed conditions) into one clear line and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from iclsft.icl import ConditionsFailed

        try:
            return fn(*args, **kwargs)
        except ValidationError as e:  # a subclass of ValueError: give it the option name and value
            raise click.ClickException(_validation_message(e)) from e
        except (*USER_ERRORS, ConditionsFailed) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def _number_list(kind: type, name: str):
    def parse(ctx, param, value: str):
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError as e:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__}s") from e

    return parse


def _labels(ctx, param, value: str) -> tuple[str, str]:
    """`Baz,Rud` means the words with a leading space (SPEC §2); a JSON list gives exact strings."""
    if value.lstrip().startswith("["):
        try:
            labels = json.loads(value)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{value!r} is not a JSON list of two strings") from e
    else:
        labels = [" " + v.strip() for v in value.split(",")]
    if len(labels) != 2 or not all(isinstance(v, str) and v.strip() for v in labels):
        raise click.BadParameter(f"{value!r} must name exactly two labels, e.g. Baz,Rud or '[\" Baz\", \" Rud\"]'")
    return tuple(labels)


@click.group()
@click.version_option(__version__, prog_name="iclsft-eval")
def main() -> None:
    """Compare in-context learning and supervised fine-tuning, shot by shot."""


@main.command()
@click.option("--angle", default="45", callback=_number_list(float, "angle"), show_default=True,
              help="Boundary angle(s) in degrees, in [0, 180); comma-separated for several.")
@click.option("--shots", default="1,2,5,10", callback=_number_list(int, "shots"), show_default=True,
              help="Shot counts K (exemplars per class), comma-separated.")
@click.option("--seed", default="0", callback=_number_list(int, "seed"), show_default=True,
              help="Exemplar-stream seed(s), comma-separated.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (resumed if it exists).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Known model name, local HF model directory, or hub id.")
@click.option("--engine", type=click.Choice(["hf"]), default="hf", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--labels", default="Baz,Rud", callback=_labels, show_default=True,
              help="Two labels: words (a leading space is added) or a JSON list of exact strings.")
@click.option("--swap-labels", is_flag=True, help="Give the first label to the negative side of the boundary.")
@click.option("--order-pattern", default="random", show_default=True,
              help="Exemplar order: 'random' or a label pattern over {1,2} such as 12, 1221, 12121221.")
@click.option("--grid-step", default=1, show_default=True, help="Query every N-th value of n1 and n2 (1 = full grid).")
@click.option("--header", default="", help="Instruction text before the exemplars (part of the template).")
@click.option("--exemplar-template", default="{x1} {x2} ->{label}\n", show_default=True)
@click.option("--query-template", default="{x1} {x2} ->", show_default=True)
@click.option("--bos", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Prepend the BOS token: as the tokenizer does by default, always, or never.")
@click.option("--token-budget", default=1024, show_default=True, help="Tokens per packed forward pass.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@user_errors
def icl(angle, shots, seed, out, model, engine, dtype, labels, swap_labels, order_pattern, grid_step, header,
        exemplar_template, query_template, bos, token_budget, threads, quiet):
    """Score every grid query with ICL prompts of K exemplars per class."""
    from iclsft.evaluate.runs import format_table
    from iclsft.icl import make_icl_spec, run_icl
    from iclsft.spec import EngineSpec, TemplateSpec

    template = TemplateSpec(header=header, exemplar=exemplar_template, query=query_template, bos=bos)
    spec, ref = make_icl_spec(
        model=model, angles=angle, shots=shots, seeds=seed, labels=labels, swap_labels=swap_labels,
        grid_step=grid_step, order=order_pattern, dtype=dtype, template=template,
        engine=EngineSpec(name=engine, token_budget=token_budget, threads=threads),
    )
    log = None if quiet else functools.partial(click.echo, err=True)
    table = run_icl(spec, out, ref, log=log, progress=not quiet)
    click.echo(format_table(table))
    click.echo(f"\nresults in {out} (metrics.parquet, conditions/*/scores.parquet)", err=True)


def _validation_message(error) -> str:
    """One line: which setting, what value, what is allowed (pydantic's own text)."""
    first = error.errors()[0]
    message = first.get("msg", str(error)).removeprefix("Value error, ")
    field = ".".join(str(part) for part in first.get("loc", ()) if not isinstance(part, int))
    if first.get("type") == "value_error" or not field:
        return message  # our own validators already name the value and the allowed range
    option = "--" + field.split(".")[-1].replace("_", "-")
    return f"{option} {first.get('input')!r} is not allowed: {message}"


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--all-columns", is_flag=True, help="Print every metric column.")
@user_errors
def metrics(run_dir, all_columns):
    """Recompute metrics of a run from its stored scores (no model needed)."""
    from iclsft.evaluate.runs import format_table, recompute_metrics

    table = recompute_metrics(run_dir)
    if table.empty:
        raise click.ClickException(f"{run_dir} has no finished conditions")
    click.echo(format_table(table, list(table.columns) if all_columns else None))


@main.group()
def models() -> None:
    """Prepare and list models."""


@models.command("prepare")
@click.argument("name", default=DEFAULT_MODEL)
@click.option("--force", is_flag=True, help="Convert again even if a prepared copy exists.")
@user_errors
def models_prepare(name, force):
    """Convert a known model (default smollm2-135m) into the cache under $ICLSFT_HOME."""
    from iclsft.models import prepare_model

    click.echo(prepare_model(name, force=force))


@models.command("list")
def models_list():
    """Known models and whether they are prepared."""
    from iclsft.models import list_models

    for row in list_models():
        click.echo(f"{row['name']:<16} {row['state']:<13} {row['path']}\n{'':<16} {row['description']}")


if __name__ == "__main__":
    sys.exit(main())
