"""`iclsft-eval`: a thin click layer. It parses options, builds a spec and calls the library."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from iclsft import __version__
from iclsft.models import DEFAULT_MODEL
from iclsft.names import ENGINE_CHOICES, SFT_METHODS
from iclsft.tasks import registry

USER_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, ImportError, OSError, MemoryError)


def user_errors(fn):
    """Turn bad input (and failed conditions) into one clear line and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from iclsft.engine.vllm_server import ServerError
        from iclsft.errors import ConditionsFailed, RunLockedError

        try:
            return fn(*args, **kwargs)
        except ValidationError as e:  # a subclass of ValueError: give it the option name and value
            raise click.ClickException(_validation_message(e)) from e
        except (*USER_ERRORS, ConditionsFailed, ServerError, RunLockedError) as e:
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


class _EchoHandler(logging.Handler):
    """Progress on stderr: INFO lines as they are, warnings with a "warning:" prefix."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        click.echo(f"warning: {message}" if record.levelno >= logging.WARNING else message, err=True)


def setup_logging(quiet: bool) -> None:
    """Where the library's `logging` goes: the `iclsft` logger to stderr (warnings only with --quiet)."""
    logger = logging.getLogger("iclsft")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _EchoHandler)] + [_EchoHandler()]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


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
        click.option("--task", type=click.Choice(registry.names("linear2d")), default="linear2d",
                     show_default=True, help="xor: XOR of the boundaries at angle and angle+90; semantic: "
                                             "n1, n2 written as adjectives (SPEC §2)."),
        click.option("--words", type=click.Choice(["sentiment", "size"]), default=None,
                     help="semantic: the adjectives, ordered by sentiment intensity (default, the study's) "
                          "or by size; part of the spec."),
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Known model name, local HF model directory, or hub id."),
        click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto",
                     show_default=True,
                     help="auto: vllm on a GPU when vLLM is installed, else hf (the faster one on CPUs)."),
        click.option("--vllm-url", default=None, help="vllm-server engine: address of a running vLLM server."),
        click.option("--vllm-api-key", default=None, envvar="ICLSFT_VLLM_API_KEY",
                     help="vllm-server engine: API key (or $ICLSFT_VLLM_API_KEY); never stored."),
        click.option("--vllm-timeout", default=300.0, show_default=True,
                     help="vllm-server engine: seconds to wait for one request."),
        click.option("--vllm-retries", default=3, show_default=True,
                     help="vllm-server engine: retries of a failed request (with backoff) before the "
                          "condition is recorded as failed."),
        click.option("--vllm-concurrency", default=4, show_default=True,
                     help="vllm-server engine: requests in flight at once."),
        click.option("--max-loras", default=1, show_default=True, help="vllm: adapters per batch."),
        click.option("--max-lora-rank", type=int, default=None,
                     help="vllm: largest adapter rank (default: the run's)."),
        click.option("--block-size", type=int, default=None,
                     help="vllm: KV cache block size (prefix-cache granularity)."),
        click.option("--gpu-memory-utilization", type=float, default=None, help="vllm on GPUs: memory fraction."),
        click.option("--kv-cache-gib", type=float, default=None,
                     help="vllm on CPUs: KV cache size in GiB (default 4)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                     help="Scoring precision (bf16 is slow on CPUs without native bf16)."),
        click.option("--labels", default="Baz,Rud", callback=_labels, show_default=True,
                     help="Two labels: words (a leading space is added) or a JSON list of exact strings."),
        click.option("--swap-labels", is_flag=True, help="Give the first label to the negative side of the boundary."),
        click.option("--order-pattern", default="random", show_default=True,
                     help="Exemplar order: 'random' or a label pattern over {1,2} such as 12, 1221, 12121221; "
                          "comma-separated for several."),
        click.option("--grid-step", default=1, show_default=True,
                     help="Query every N-th value of n1 and n2 (1 = full grid)."),
        click.option("--header", default="", help="Instruction text before the exemplars (part of the template)."),
        click.option("--exemplar-template", default="{x1} {x2} ->{label}\n", show_default=True),
        click.option("--query-template", default="{x1} {x2} ->", show_default=True),
        click.option("--bos", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
                     help="Prepend the BOS token: as the tokenizer does by default, always, or never."),
        click.option("--chat", is_flag=True, help="Wrap header, exemplars and query as the user's turn of the "
                     "model's chat template (instruct models; docs/tokenization.md)."),
        click.option("--token-budget", type=int, default=None,
                     help="hf engine: tokens per packed forward pass (default: 1024 on CPUs, from free memory on "
                          "CUDA; docs/large_models.md)."),
        click.option("--device-map", default=None,
                     help="hf engine: spread the model over GPUs ('auto', 'balanced', 'sequential') or put it on "
                          "one device ('cuda:1'); default: one device (docs/large_models.md)."),
        click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."),
        click.option("--quiet", is_flag=True, help="No progress output."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _common(o: dict) -> dict:
    """Keyword arguments of make_*_spec from the shared options."""
    from iclsft.engine.base import resolve_engine
    from iclsft.spec import EngineSpec, TemplateSpec

    return dict(
        model=o["model"], task=o["task"], angles=o["angle"], shots=o["shots"], seeds=o["seed"], labels=o["labels"],
        words=o["words"],
        swap_labels=o["swap_labels"], grid_step=o["grid_step"], orders=tuple(o["order_pattern"].split(",")),
        dtype=o["dtype"],
        template=TemplateSpec(header=o["header"], exemplar=o["exemplar_template"], query=o["query_template"],
                              bos=o["bos"], chat=o["chat"]),
        engine=EngineSpec(name=resolve_engine(o["engine"]), token_budget=o["token_budget"], threads=o["threads"],
                          device_map=o["device_map"],
                          url=o["vllm_url"], api_key=o["vllm_api_key"], timeout=o["vllm_timeout"],
                          retries=o["vllm_retries"], concurrency=o["vllm_concurrency"], max_loras=o["max_loras"],
                          max_lora_rank=o["max_lora_rank"], block_size=o["block_size"],
                          gpu_memory_utilization=o["gpu_memory_utilization"], kv_cache_gib=o["kv_cache_gib"]),
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
    from iclsft.arms import make_icl_spec, run_spec

    setup_logging(o["quiet"])
    spec, ref = make_icl_spec(**_common(o))
    _finish(run_spec(spec, o["out"], ref, progress=not o["quiet"]), o["out"])


@main.command()
@run_options
@click.option("--method", type=click.Choice(SFT_METHODS), default="lora",
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
@click.option("--precision", type=click.Choice(["fp32", "bf16-mixed"]), default="fp32", show_default=True,
              help="bf16-mixed: fp32 weights, bf16 autocast forward/backward (part of the condition ids).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Full fine-tunes: shard each training over this many Ray Train workers (FSDP2).")
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
    from iclsft.arms import make_sft_spec, run_spec
    from iclsft.spec import ExecutorSpec, sft_spec

    setup_logging(o["quiet"])
    hyper = {k: o[k] for k in ("lr", "epochs", "min_steps", "batch_size", "warmup_ratio", "weight_decay",
                               "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout") if o[k] is not None}
    if o["target_modules"]:
        hyper["target_modules"] = tuple(m.strip() for m in o["target_modules"].split(",") if m.strip())
    hyper.update(precision=o["precision"], gradient_checkpointing=o["gradient_checkpointing"], workers=o["workers"])
    executor = ExecutorSpec(name=o["executor"], ray_address=o["ray_address"], cpus_per_task=o["cpus_per_task"],
                            max_retries=o["max_retries"])
    spec, ref = make_sft_spec(**_common(o), sft=sft_spec(o["method"], **hyper), checkpoints=o["checkpoints"],
                              executor=executor)
    _finish(run_spec(spec, o["out"], ref, progress=not o["quiet"]), o["out"])


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--metric", "metrics_", multiple=True,
              help="Metric columns to compare (repeatable; default: accuracy, holdout_accuracy, auc, cal_accuracy, "
                   "confidence for the 2D study, accuracy, shortcut_rate, gold_prob for the implicit suite).")
@user_errors
def compare(run_dir, metrics_):
    """ICL vs SFT metrics side by side per shot count (any run directory of either study)."""
    from iclsft.evaluate.runs import compare_table, recompute_metrics

    table = recompute_metrics(run_dir)
    if table.empty:
        raise click.ClickException(f"{run_dir} has no finished conditions")
    click.echo(compare_table(table, list(metrics_) or None).to_string(float_format=lambda v: f"{v:.3f}"))


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
    """Recompute metrics of a run of either study from its stored scores (no model needed)."""
    from iclsft.evaluate.runs import format_table, recompute_metrics

    table = recompute_metrics(run_dir)
    if table.empty:
        raise click.ClickException(f"{run_dir} has no finished conditions")
    click.echo(format_table(table, list(table.columns) if all_columns else None))


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the expanded grid, what is left to run and a time estimate.")
@click.option("--estimate-for", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Device the --dry-run estimate is for (default: this machine's).")
@click.option("--quiet", is_flag=True, help="Only the final tables.")
@user_errors
def sweep(config, overrides, dry_run, estimate_for, quiet):
    """Run (or resume) a whole experiment from a YAML config; `key=value` overrides it
    (e.g. `shots=[1,2] tasks.0.angles=[0,90] sft.lora.epochs=3`)."""
    from iclsft.sweep import format_plan, load_config, run_sweep

    cfg = load_config(config, overrides)
    if dry_run:
        if estimate_for is None:
            import torch

            estimate_for = "gpu" if torch.cuda.is_available() else "cpu"
        click.echo(format_plan(cfg, estimate_for))
        return
    from iclsft.evaluate.runs import format_table

    setup_logging(quiet)
    for model, table in run_sweep(cfg, progress=not quiet).items():
        click.echo(f"\n{model}")
        click.echo(format_table(table))
    click.echo(f"\nresults in {cfg.out}", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Queries per forward pass (default: from a token budget).")
@click.option("--subset", type=click.Choice(["exemplars", "grid"]), default="exemplars", show_default=True,
              help="Points of the 400x400 matrix: the condition's exemplars plus test inputs (as in the study), "
              "or the fixed label-balanced grid subset.")
@click.option("--quiet", is_flag=True)
@user_errors
def rsa(run_dir, dtype, batch_size, subset, quiet):
    """Layer-wise RSA (SPEC §7) for every finished condition of a run that has none yet."""
    from iclsft.rsa import compute_rsa

    setup_logging(quiet)
    done = compute_rsa(run_dir, dtype=dtype, subset=subset, batch_size=batch_size, progress=not quiet)
    click.echo(f"RSA computed for {len(done)} condition(s) in {run_dir}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for index.html and its figures (default RUN/report).")
@user_errors
def report(run_dir, out):
    """HTML report of a run: figures and statistics across seeds (no model needed). Given a sweep's out
    folder (OUT/<model>/ run directories), each model's report and a cross-model page in OUT/report."""
    from iclsft.report import build_report

    click.echo(build_report(run_dir, out))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "json_", is_flag=True, help="Print the JSON instead of the table.")
@user_errors
def claims(run_dir, json_):
    """The studies' headline claims checked on a run: test, verdict, effect, interval and n per claim.
    Writes RUN/claims.json and RUN/claims.txt (no model needed; docs/claims.md)."""
    from iclsft.claims import format_table, run_claims, write_claims
    from iclsft.claims.core import to_json

    results = run_claims(run_dir)
    write_claims(run_dir, results)
    click.echo(to_json(results) if json_ else format_table(results))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="ICLSFT_VLLM_API_KEY",
              help="Require this key (or $ICLSFT_VLLM_API_KEY); passed to vLLM in its environment.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
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
    import shlex

    from iclsft.engine.vllm_options import VLLMOptions
    from iclsft.serve import serve as serve_run
    from iclsft.serve import serve_command

    options = VLLMOptions(max_loras=max_loras)
    if dry_run:
        cmd, adapters = serve_command(run_dir, host=host, port=port, dtype=dtype,
                                      allow_adapter_loading=allow_adapter_loading, max_lora_rank=max_lora_rank,
                                      options=options, extra=vllm_args)
        for a in adapters:
            click.echo(f"{a.name}\t{a.path}")
        click.echo(shlex.join(cmd))
        return
    code = serve_run(run_dir, host=host, port=port, api_key=api_key, allow_adapter_loading=allow_adapter_loading,
                     dtype=dtype, extra=vllm_args, echo=functools.partial(click.echo, err=True),
                     max_lora_rank=max_lora_rank, options=options)
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
    from iclsft.serve import query_points

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


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (resumed if it exists).")
@click.option("--tasks", default="expression,relation,boolean,code", show_default=True,
              help="Comma-separated tasks of the suite (SPEC §8).")
@click.option("--method", type=click.Choice(["icl", "lora", "full"]), default="icl", show_default=True,
              help="icl: K demos in the prompt; lora/full: fine-tuned on --train-size items, scored zero-shot.")
@click.option("--shots", default="0,1,2,4,8,16,32", callback=_number_list(int, "shots"), show_default=True,
              help="ICL: numbers of demos K, comma-separated.")
@click.option("--seed", default="0", callback=_number_list(int, "seed"), show_default=True)
@click.option("--train-size", default=1000, show_default=True, help="SFT training items (also kept out of the "
              "evaluation set, so it identifies ICL conditions too).")
@click.option("--eval-size", default=200, show_default=True, help="Evaluation items per task and variant.")
@click.option("--faithful", is_flag=True, help="Reproduce the original generators' quirks (docs/implicit.md).")
@click.option("--recipe", type=click.Choice(["ours", "original"]), default="ours", show_default=True,
              help="Fine-tuning recipe. original (with --method full): the study's, one model per seed on the "
                   "mixed items of every task, loss on every token, lr 1e-5, batch 16 (docs/implicit.md).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--engine", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--lr", type=float, default=None, help="SFT learning rate (default: per method).")
@click.option("--epochs", type=int, default=None, help="SFT passes over the training items (default 1).")
@click.option("--batch-size", type=int, default=None)
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True)
@click.option("--token-budget", type=int, default=None,
              help="Tokens per packed forward pass (default: 1024 on CPUs, from free memory on CUDA).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--quiet", is_flag=True)
@user_errors
def implicit(**o):
    """The implicit-pattern suite: ICL per K or a fine-tuned model, on both variants of each task."""
    from iclsft.arms import make_implicit_spec, run_spec
    from iclsft.engine.base import resolve_engine
    from iclsft.implicit.results import results_table
    from iclsft.spec import EngineSpec, ExecutorSpec

    setup_logging(o["quiet"])
    hyper = {k: o[k] for k in ("lr", "epochs", "batch_size") if o[k] is not None}
    spec, ref = make_implicit_spec(
        model=o["model"], method=o["method"], sft=hyper if o["method"] != "icl" else None,
        tasks=tuple(t.strip() for t in o["tasks"].split(",") if t.strip()), shots=o["shots"], seeds=o["seed"],
        train_size=o["train_size"], eval_size=o["eval_size"], faithful=o["faithful"], dtype=o["dtype"],
        recipe=o["recipe"],
        engine=EngineSpec(name=resolve_engine(o["engine"]), token_budget=o["token_budget"], threads=o["threads"]),
        executor=ExecutorSpec(name=o["executor"]))
    table = run_spec(spec, o["out"], ref, progress=not o["quiet"])
    click.echo(results_table(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"\nresults in {o['out']} (metrics.parquet, conditions/*/scores.parquet)", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--pairs", default=32, show_default=True, help="(holds, broken) question pairs per task.")
@click.option("--shots", default=8, show_default=True, help="Demos in the ICL state's prompt.")
@click.option("--quiet", is_flag=True)
@user_errors
def circuits(run_dir, pairs, shots, quiet):
    """Circuit shift of an implicit-pattern run: attribution patching for the base model, ICL and each
    fine-tuned model, and each one's shift from the base (docs/implicit.md)."""
    from iclsft.implicit.circuits import compute_circuits

    setup_logging(quiet)
    table = compute_circuits(run_dir, pairs=pairs, shots=shots)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


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
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--token-budget", default=1024, show_default=True, help="hf engine: tokens per packed forward.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder to write throughput.json and throughput.md into.")
@user_errors
def bench(model, shots, queries, adapters, naive_sample, with_vllm, vllm_sample, dtype, token_budget, threads, out):
    """Scoring throughput of the hf engine against a naive per-query loop (and vLLM with --vllm);
    prints queries/s, speed ratios and GFLOP/s against this machine's measured matmul peak."""
    from iclsft.bench import VLLM_METHODS, BenchSpec, markdown, run_bench, write_results

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
