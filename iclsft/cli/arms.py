"""Commands that compute: `icl`, `sft`, `implicit` (one arm each), `run` (one arm of any registered study from
a spec file) and `sweep` (a whole experiment)."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from iclsft.cli.app import (
    _escapes,
    _labels,
    _number_list,
    echo_table,
    main,
    setup_logging,
    shown,
    user_errors,
)
from iclsft.cli.engine_options import engine_options, engine_spec
from iclsft.errors import first_error
from iclsft.implicit.results import results_table
from iclsft.names import (
    BOS_CHOICES,
    CHECKPOINTS_KEEP,
    DEFAULT_MODEL,
    DEVICES,
    DTYPES,
    EXECUTORS,
    IMPLICIT_METHODS,
    PRECISIONS,
    RECIPES,
    SFT_METHODS,
)
from iclsft.runspec import make_icl_spec, make_implicit_spec, make_sft_spec
from iclsft.spec import ExecutorSpec, TemplateSpec, sft_spec
from iclsft.study import get as get_study
from iclsft.study import of_run, studies
from iclsft.tasks import registry

WORD_LISTS = sorted({w for t in registry.names("linear2d") for w in registry.get(t, "linear2d").word_lists})

EXEMPLAR_TEMPLATE = TemplateSpec().exemplar
QUERY_TEMPLATE = TemplateSpec().query


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
        click.option("--words", type=click.Choice(WORD_LISTS), default=None,
                     help="semantic: the adjectives, ordered by sentiment intensity (default, the study's) "
                          "or by size; part of the spec."),
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Known model name (smollm2-135m: SmolLM2-135M-Instruct from a Q4_1 GGUF; gemma3-270m: "
                          "Gemma 3 270M base from a Q4_K_M GGUF, under the Gemma Terms of Use; `models list`), "
                          "local HF model directory, or hub id."),
        click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
                     help="Scoring precision (bf16 is slow on CPUs without native bf16)."),
        click.option("--labels", default="Baz,Rud", callback=_labels, show_default=True,
                     help="Two labels: words (a leading space is added) or a JSON list of exact strings."),
        click.option("--swap-labels", is_flag=True, help="Give the first label to the negative side of the boundary."),
        click.option("--order-pattern", default="random", show_default=True,
                     help="Exemplar order: 'random' or a label pattern over {1,2} such as 12, 1221, 12121221; "
                          "comma-separated for several."),
        click.option("--grid-step", default=1, show_default=True,
                     help="Query every N-th value of n1 and n2 (1 = full grid)."),
        click.option("--header", default="", callback=_escapes,
                     help="Instruction text before the exemplars (part of the template; \\n is a newline)."),
        click.option("--exemplar-template", default=EXEMPLAR_TEMPLATE, callback=_escapes,
                     help=f"One exemplar: {{x1}} {{x2}} and {{label}}; \\n, \\t and \\\\ are a newline, a tab and a "
                          f"backslash.  [default: '{shown(EXEMPLAR_TEMPLATE)}']"),
        click.option("--query-template", default=QUERY_TEMPLATE, callback=_escapes,
                     help=f"One query: {{x1}} {{x2}}, escapes as above.  [default: '{shown(QUERY_TEMPLATE)}']"),
        click.option("--bos", type=click.Choice(BOS_CHOICES), default="auto", show_default=True,
                     help="Prepend the BOS token: as the tokenizer does by default, always, or never."),
        click.option("--chat", is_flag=True, help="Wrap header, exemplars and query as the user's turn of the "
                     "model's chat template (instruct models; docs/tokenization.md)."),
        click.option("--quiet", is_flag=True, help="No progress output."),
    ]
    fn = engine_options()(fn)
    for option in reversed(options):
        fn = option(fn)
    return fn


def _common(o: dict) -> dict:
    """Keyword arguments of make_*_spec from the shared options."""
    return dict(
        model=o["model"], task=o["task"], angles=o["angle"], shots=o["shots"], seeds=o["seed"], labels=o["labels"],
        words=o["words"],
        swap_labels=o["swap_labels"], grid_step=o["grid_step"], orders=tuple(o["order_pattern"].split(",")),
        dtype=o["dtype"],
        template=TemplateSpec(header=o["header"], exemplar=o["exemplar_template"], query=o["query_template"],
                              bos=o["bos"], chat=o["chat"]),
        engine=engine_spec(o),
    )


def retention_options(fn):
    """What the fine-tuning commands keep of their full fine-tunes (iclsft.sft.retention)."""
    fn = click.option("--retrain-deleted", is_flag=True,
                      help="Train a checkpoint deleted by --checkpoints-keep again when work needs it (and compute "
                           "again what was scored with it); without it such work is refused by name.")(fn)
    return click.option("--checkpoints-keep", type=click.Choice(CHECKPOINTS_KEEP), default="all", show_default=True,
                        help="Full fine-tunes: keep every checkpoint, each training's last (final) or none, each "
                             "deleted once everything that reads it is written (LoRA adapters are always kept; "
                             "the run records what was deleted, with checksums).")(fn)


def run_spec(spec, out: Path, ref, *, progress: bool):
    """`iclsft.graph.driver.run_spec`, imported when a command runs (it brings torch and Ray, which
    `iclsft-eval --help` need not load)."""
    from iclsft.graph.driver import run_spec as run

    return run(spec, out, ref, progress=progress)


def _finish(table, out: Path) -> None:
    echo_table(table, of_run(out))
    click.echo(f"\nresults in {out} (metrics.parquet, conditions/*/scores.parquet)", err=True)


@main.command()
@run_options
@user_errors
def icl(**o):
    """Score every grid query with ICL prompts of K exemplars per class."""
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
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="bf16-mixed: fp32 weights, bf16 autocast forward/backward (part of the condition ids).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Full fine-tunes: shard each training over this many Ray Train workers (FSDP2).")
@click.option("--checkpoints", default="1", callback=_number_list(float, "checkpoints"), show_default=True,
              help="Fractions of training to save and score, e.g. 0.25,0.5,1.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="ray", show_default=True,
              help="Train on Ray (default; a local cluster unless --ray-address) or in this process.")
@click.option("--ray-address", default=None, help="Join an existing Ray cluster (e.g. auto or host:6379).")
@click.option("--cpus-per-task", default=1, show_default=True, help="CPUs (torch threads) per training.")
@click.option("--max-retries", default=2, show_default=True, help="Retries of a failed training.")
@retention_options
@user_errors
def sft(**o):
    """Train one model per shot count on the ICL exemplars, then score every grid query zero-shot."""
    setup_logging(o["quiet"])
    hyper = {k: o[k] for k in ("lr", "epochs", "min_steps", "batch_size", "warmup_ratio", "weight_decay",
                               "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout") if o[k] is not None}
    if o["target_modules"]:
        hyper["target_modules"] = tuple(m.strip() for m in o["target_modules"].split(",") if m.strip())
    hyper.update(precision=o["precision"], gradient_checkpointing=o["gradient_checkpointing"], workers=o["workers"])
    executor = ExecutorSpec(name=o["executor"], ray_address=o["ray_address"], cpus_per_task=o["cpus_per_task"],
                            max_retries=o["max_retries"])
    spec, ref = make_sft_spec(**_common(o), sft=sft_spec(o["method"], **hyper), checkpoints=o["checkpoints"],
                              executor=executor, checkpoints_keep=o["checkpoints_keep"],
                              retrain_deleted=o["retrain_deleted"])
    _finish(run_spec(spec, o["out"], ref, progress=not o["quiet"]), o["out"])


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (resumed if it exists).")
@click.option("--tasks", default="expression,relation,boolean,code", show_default=True,
              help="Comma-separated tasks of the suite (SPEC §8).")
@click.option("--method", type=click.Choice(IMPLICIT_METHODS), default="icl", show_default=True,
              help="icl: K demos in the prompt; lora/full: fine-tuned on --train-size items, scored zero-shot.")
@click.option("--shots", default="0,1,2,4,8,16,32", callback=_number_list(int, "shots"), show_default=True,
              help="ICL: numbers of demos K, comma-separated.")
@click.option("--seed", default="0", callback=_number_list(int, "seed"), show_default=True)
@click.option("--train-size", default=1000, show_default=True, help="SFT training items (also kept out of the "
              "evaluation set, so it identifies ICL conditions too).")
@click.option("--eval-size", default=200, show_default=True, help="Evaluation items per task and variant.")
@click.option("--faithful", is_flag=True, help="Reproduce the original generators' quirks (docs/implicit.md).")
@click.option("--recipe", type=click.Choice(RECIPES), default="ours", show_default=True,
              help="Fine-tuning recipe. original (with --method full): the study's, one model per seed on the "
                   "mixed items of every task, loss on every token, lr 1e-5, batch 16 (docs/implicit.md).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--lr", type=float, default=None, help="SFT learning rate (default: per method).")
@click.option("--epochs", type=int, default=None, help="SFT passes over the training items (default 1).")
@click.option("--batch-size", type=int, default=None)
@click.option("--executor", type=click.Choice(EXECUTORS), default="ray", show_default=True)
@click.option("--quiet", is_flag=True)
@engine_options(("hf", "vllm"))
@retention_options
@user_errors
def implicit(**o):
    """The implicit-pattern suite: ICL per K or a fine-tuned model, on both variants of each task."""
    setup_logging(o["quiet"])
    hyper = {k: o[k] for k in ("lr", "epochs", "batch_size") if o[k] is not None}
    spec, ref = make_implicit_spec(
        model=o["model"], method=o["method"], sft=hyper if o["method"] != "icl" else None,
        tasks=tuple(t.strip() for t in o["tasks"].split(",") if t.strip()), shots=o["shots"], seeds=o["seed"],
        train_size=o["train_size"], eval_size=o["eval_size"], faithful=o["faithful"], dtype=o["dtype"],
        recipe=o["recipe"],
        engine=engine_spec(o),
        executor=ExecutorSpec(name=o["executor"]),
        **({"checkpoints_keep": o["checkpoints_keep"], "retrain_deleted": o["retrain_deleted"]}
           if o["method"] != "icl" else {}))
    table = run_spec(spec, o["out"], ref, progress=not o["quiet"])
    click.echo(results_table(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"\nresults in {o['out']} (metrics.parquet, conditions/*/scores.parquet)", err=True)


@main.command("run")
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (resumed if it exists).")
@click.option("--quiet", is_flag=True)
@user_errors
def run_file(spec_file: Path, out: Path, quiet: bool):
    """One arm of any registered study from a spec file (YAML or JSON): `study` (linear2d, implicit, or a
    study of your own, docs/framework.md) and the fields its spec builder takes."""
    setup_logging(quiet)
    study, fields = read_spec_file(spec_file)
    from pydantic import ValidationError

    try:
        spec, ref = study.build_spec(**fields)
    except TypeError as e:  # a field the builder does not take
        if "unexpected keyword argument" not in str(e):
            raise
        raise click.ClickException(f"{spec_file}: {str(e).split('() ')[-1]} of the {study.name} study") from e
    except ValidationError as e:  # named as the file's field, not as an option
        _, field, value, message = first_error(e)
        raise click.ClickException(f"{spec_file}: field {field} = {value!r}: {message}") from e
    _finish(run_spec(spec, out, ref, progress=not quiet), out)


def read_spec_file(path: Path):
    """(the study it names, its other fields) of a spec file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not YAML or JSON: {e}") from e
    if not isinstance(data, dict) or "study" not in data:
        names = ", ".join(s.name for s in studies())
        raise ValueError(f"{path} must be a mapping with a `study` field (one of {names})")
    fields = dict(data)
    return get_study(str(fields.pop("study"))), fields


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True,
              help="Print the plan: per arm what is left; per resource count (--gpus) the work per stage, engine "
                   "starts, model loads, disk use and the wall time, with the rates used.")
@click.option("--simulate", is_flag=True,
              help="Run the sweep's scheduler on timed stand-ins of its works and print, per resource count "
                   "(--gpus), the makespan and how busy each role's workers were.")
@click.option("--gpus", default=None,
              help="GPU counts to plan or simulate for, comma-separated (e.g. 1,8,64; 0: CPUs only). Default: this "
                   "machine's, or the Ray cluster's at executor.ray_address.")
@click.option("--cpus", type=click.IntRange(min=1), default=None,
              help="CPUs for --gpus 0 (default: this machine's); with GPUs, 8 per GPU.")
@click.option("--estimate-for", type=click.Choice(DEVICES), default=None,
              help="Same as --gpus 0 (cpu) or --gpus 1 (gpu).")
@click.option("--ray-address", default=None,
              help="Join this Ray cluster (same as executor.ray_address=ADDR): the work graph's scorers and "
                   "trainers run on its nodes, the run directory stays with this process.")
@click.option("--quiet", is_flag=True, help="Only the final tables.")
@user_errors
def sweep(config, overrides, dry_run, simulate, gpus, cpus, estimate_for, ray_address, quiet):
    """Run (or resume) a whole experiment from a YAML config; `key=value` overrides it
    (e.g. `shots=[1,2] tasks.0.angles=[0,90] sft.lora.epochs=3`)."""
    from iclsft.sweep import load_config, run_sweep
    from iclsft.sweep.plan import cluster, format_plan, format_simulations, parse_gpus

    counts = parse_gpus(gpus) if gpus is not None else None
    cfg = load_config(config, [*overrides, *([f"executor.ray_address={ray_address}"] if ray_address else [])])
    if dry_run or simulate:
        if counts is None:
            counts = [{"cpu": 0.0, "gpu": 1.0}[estimate_for]] if estimate_for else [cluster(cfg)[1]]
        if cpus is None and 0 in counts:
            cpus = cluster(cfg)[0]
        if dry_run:
            click.echo(format_plan(cfg, gpus=counts, cpus=cpus))
        if simulate:
            click.echo(format_simulations(cfg, counts, cpus))
        return
    setup_logging(quiet)
    for model, table in run_sweep(cfg, progress=not quiet).items():
        click.echo(f"\n{model}")
        echo_table(table, get_study("linear2d"))  # each model's 2D run
    click.echo(f"\nresults in {cfg.out}", err=True)
