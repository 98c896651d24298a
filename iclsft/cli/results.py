"""Commands that read a finished run (no model needed, except `rsa` and `circuits`): `metrics`,
`compare`, `report`, `claims`, `rsa`, `circuits`, and `migrate` (a run of an earlier version rewritten).
The report, claims, RSA and circuits modules import torch or matplotlib: each command imports its own,
so `iclsft-eval --help` needs neither."""

from __future__ import annotations

from pathlib import Path

import click

from iclsft.cli.app import echo_table, main, setup_logging, user_errors
from iclsft.evaluate.runs import recompute_metrics, study_of
from iclsft.migrate import migrate as migrate_run
from iclsft.names import DTYPES, RSA_SUBSETS
from iclsft.store import RunDir


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--metric", "metrics_", multiple=True,
              help="Metric columns to compare (repeatable; default: accuracy, holdout_accuracy, auc, cal_accuracy, "
                   "confidence for the 2D study, accuracy, shortcut_rate, gold_prob for the implicit suite).")
@user_errors
def compare(run_dir, metrics_):
    """ICL vs SFT metrics side by side per shot count (any run directory of either study)."""
    setup_logging(True)  # warnings (e.g. conditions scored under different library versions) on stderr
    study = study_of(RunDir(run_dir))
    if study.compare is None:
        raise click.ClickException(f"the {study.name} study has no comparison table; `iclsft-eval metrics {run_dir}` "
                                   "prints its metrics")
    table = recompute_metrics(run_dir)
    if table.empty:
        raise click.ClickException(f"{run_dir} has no finished conditions")
    click.echo(study.compare(table, list(metrics_) or None).to_string(float_format=lambda v: f"{v:.3f}"))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--all-columns", is_flag=True, help="Print every metric column.")
@user_errors
def metrics(run_dir, all_columns):
    """Recompute metrics of a run of either study from its stored scores (no model needed)."""
    setup_logging(True)
    table = recompute_metrics(run_dir)
    if table.empty:
        raise click.ClickException(f"{run_dir} has no finished conditions")
    echo_table(table, study_of(RunDir(run_dir)), list(table.columns) if all_columns else None)


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
    from iclsft.claims import format_table, run_claims, to_json, write_claims

    results = run_claims(run_dir)
    write_claims(run_dir, results)
    click.echo(to_json(results) if json_ else format_table(results))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Queries per forward pass (default: from a token budget).")
@click.option("--subset", type=click.Choice(RSA_SUBSETS), default="exemplars", show_default=True,
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
@click.argument("run_dir", type=click.Path(path_type=Path))
@user_errors
def migrate(run_dir):
    """Rewrite a run directory (or each one of a sweep's out folder) made by an earlier version, so that this
    version resumes it: condition ids and stored specs at this version; scores and checkpoints untouched."""
    setup_logging(True)
    for done in migrate_run(run_dir):
        if done["from"] == [done["to"]]:
            click.echo(f"{done['run']}: at version {done['to']} already, nothing to do")
        else:
            click.echo(f"{done['run']}: {', '.join(done['from'])} -> {done['to']}, "
                       f"{done['renamed']} condition directories renamed")
