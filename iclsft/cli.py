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


def run_options(fn):
    """Options shared by every arm: what is learned, how it is shown, and how it is scored."""
    options = [
        click.option("--angle", default="45", callback=_number_list(float, "angle"), show_default=True,
                     help="Boundary angle(s) in degrees, in [0, 180); comma-separated for several."),
        click.option("--shots", default="1,2,5,10", callback=_number_list(int, "shots"), show_default=True,
                     help="Shot counts K (exemplars per class), comma-separated."),
        click.option("--seed", default="0", callback=_number_list(int, "seed"), show_default=True,
                     help="Exemplar-stream seed(s), comma-separated."),
        click.option("--out", required=True, type=click.Path(path_type=Path),
                     help="Run directory (resumed if it exists; ICL and SFT arms may share one)."),
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Known model name, local HF model directory, or hub id."),
        click.option("--engine", type=click.Choice(["hf"]), default="hf", show_default=True),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                     help="Scoring precision (bf16 is slow on CPUs without native bf16)."),
        click.option("--labels", default="Baz,Rud", callback=_labels, show_default=True,
                     help="Two labels: words (a leading space is added) or a JSON list of exact strings."),
        click.option("--swap-labels", is_flag=True, help="Give the first label to the negative side of the boundary."),
        click.option("--order-pattern", default="random", show_default=True,
                     help="Exemplar order: 'random' or a label pattern over {1,2} such as 12, 1221, 12121221."),
        click.option("--grid-step", default=1, show_default=True,
                     help="Query every N-th value of n1 and n2 (1 = full grid)."),
        click.option("--header", default="", help="Instruction text before the exemplars (part of the template)."),
        click.option("--exemplar-template", default="{x1} {x2} ->{label}\n", show_default=True),
        click.option("--query-template", default="{x1} {x2} ->", show_default=True),
        click.option("--bos", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
                     help="Prepend the BOS token: as the tokenizer does by default, always, or never."),
        click.option("--token-budget", default=1024, show_default=True, help="Tokens per packed forward pass."),
        click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."),
        click.option("--quiet", is_flag=True, help="No progress output."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _common(o: dict) -> dict:
    """Keyword arguments of make_*_spec from the shared options."""
    from iclsft.spec import EngineSpec, TemplateSpec

    return dict(
        model=o["model"], angles=o["angle"], shots=o["shots"], seeds=o["seed"], labels=o["labels"],
        swap_labels=o["swap_labels"], grid_step=o["grid_step"], order=o["order_pattern"], dtype=o["dtype"],
        template=TemplateSpec(header=o["header"], exemplar=o["exemplar_template"], query=o["query_template"],
                              bos=o["bos"]),
        engine=EngineSpec(name=o["engine"], token_budget=o["token_budget"], threads=o["threads"]),
    )


def _finish(table, out: Path) -> None:
    from iclsft.evaluate.runs import format_table

    click.echo(format_table(table))
    click.echo(f"\nresults in {out} (metrics.parquet, conditions/*/scores.parquet)", err=True)


@main.command()
@run_options
@user_errors
def icl(**o):
    """Score every grid query with ICL prompts of K exemplars per class."""
    from iclsft.icl import make_icl_spec, run_icl

    spec, ref = make_icl_spec(**_common(o))
    log = None if o["quiet"] else functools.partial(click.echo, err=True)
    _finish(run_icl(spec, o["out"], ref, log=log, progress=not o["quiet"]), o["out"])


@main.command()
@run_options
@click.option("--method", type=click.Choice(["lora", "full", "full-frozen-unembed"]), default="lora",
              show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate (default: per method, see docs/sft.md).")
@click.option("--epochs", type=int, default=None, help="Passes over the 2K examples.")
@click.option("--min-steps", type=int, default=None, help="At least this many optimizer steps (small K).")
@click.option("--batch-size", type=int, default=None)
@click.option("--warmup-ratio", type=float, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--max-grad-norm", type=float, default=None)
@click.option("--lora-r", type=int, default=None, help="LoRA rank (lora only).")
@click.option("--lora-alpha", type=float, default=None)
@click.option("--lora-dropout", type=float, default=None)
@click.option("--target-modules", default=None, help="Comma-separated module names for LoRA.")
@click.option("--checkpoints", default="1", callback=_number_list(float, "checkpoints"), show_default=True,
              help="Fractions of training to save and score, e.g. 0.25,0.5,1.")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
              help="Train on Ray (default; a local cluster unless --ray-address) or in this process.")
@click.option("--ray-address", default=None, help="Join an existing Ray cluster (e.g. auto or host:6379).")
@click.option("--cpus-per-task", default=1, show_default=True, help="CPUs (torch threads) per training.")
@click.option("--max-retries", default=2, show_default=True, help="Retries of a failed training.")
@user_errors
def sft(**o):
    """Train one model per shot count on the ICL exemplars, then score every grid query zero-shot."""
    from iclsft.sft.runner import make_sft_spec, run_sft
    from iclsft.spec import ExecutorSpec, sft_spec

    hyper = {k: o[k] for k in ("lr", "epochs", "min_steps", "batch_size", "warmup_ratio", "weight_decay",
                               "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout") if o[k] is not None}
    if o["target_modules"]:
        hyper["target_modules"] = tuple(m.strip() for m in o["target_modules"].split(",") if m.strip())
    executor = ExecutorSpec(name=o["executor"], ray_address=o["ray_address"], cpus_per_task=o["cpus_per_task"],
                            max_retries=o["max_retries"])
    spec, ref = make_sft_spec(**_common(o), sft=sft_spec(o["method"], **hyper), checkpoints=o["checkpoints"],
                              executor=executor)
    log = None if o["quiet"] else functools.partial(click.echo, err=True)
    _finish(run_sft(spec, o["out"], ref, log=log, progress=not o["quiet"]), o["out"])


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--metric", "metrics_", multiple=True,
              default=("accuracy", "holdout_accuracy", "auc", "cal_accuracy", "confidence"), show_default=True,
              help="Metric columns to compare (repeatable).")
@user_errors
def compare(run_dir, metrics_):
    """ICL vs SFT metrics side by side per shot count."""
    from iclsft.evaluate.runs import compare_table, recompute_metrics

    table = recompute_metrics(run_dir)
    if table.empty:
        raise click.ClickException(f"{run_dir} has no finished conditions")
    click.echo(compare_table(table, list(metrics_)).to_string(float_format=lambda v: f"{v:.3f}"))


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
