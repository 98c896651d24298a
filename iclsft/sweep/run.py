"""Running a sweep. On Ray (the default executor) every arm of every model is one work graph
(`iclsft.graph`): trainings as tasks, scorings on scorer actors that each hold one engine, the arms
overlapping; `OUT/graph.json` records the resources, per-role busy time and utilisation, and engine
starts. With `executor: {name: local}` (or sharded training) the arms run one after another in this
process, each through the one arm runner. Then RSA, circuits and the reports. Either way each arm
resumes on its own: an interrupted sweep recomputes nothing that finished. `OUT/sweep.json` holds the
expanded config."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from iclsft.artifacts import atomic_write_json
from iclsft.errors import ConditionsFailed
from iclsft.graph.driver import run_spec, runs_on_graph
from iclsft.graph.run import rsa_done, run_graph
from iclsft.implicit.circuits import compute_circuits
from iclsft.prompts import prompt_builders
from iclsft.report import build_report
from iclsft.report.models import build_models_report
from iclsft.rsa import compute_rsa
from iclsft.sft.retention import retain
from iclsft.store import RunDir
from iclsft.sweep.config import SweepConfig
from iclsft.sweep.plan import arm_specs, implicit_dir, implicit_specs, model_dir

logger = logging.getLogger(__name__)


def run_sweep(config: SweepConfig, *, progress: bool = True) -> dict:
    """Run or resume everything; return {model: metrics table}. Failed conditions are recorded in
    their run and summarised at the end (rerun to retry them); other conditions go on."""
    planned = {model: arm_specs(config, model) for model in config.models}  # every input checked first
    _check_labels(planned)
    planned_implicit = {model: implicit_specs(config, model) for model in config.models}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    # One sweep per output directory (an flock on OUT/.lock, gone when its holder exits or is killed); each
    # run directory below has its own lock too, so an `icl` or `sft` command cannot write into it meanwhile.
    sweep_lock = RunDir(out)
    sweep_lock.acquire_lock(instead="give this sweep another out=")
    try:
        return _run_planned(config, planned, planned_implicit, out, progress)
    finally:
        sweep_lock.release_lock()


def _check_labels(planned: dict) -> None:
    """Labels each model's tokenizer can tell apart, before the sweep writes anything (the runs check
    again, later)."""
    from transformers import AutoTokenizer

    for arms in planned.values():
        if arms:
            tokenizer = AutoTokenizer.from_pretrained(arms[0][1].path)
            for spec, _ in arms:
                prompt_builders(tokenizer, spec.template, spec.tasks)


def _run_planned(config: SweepConfig, planned: dict, planned_implicit: dict, out: Path, progress: bool) -> dict:
    atomic_write_json(out / "sweep.json", json.loads(config.model_dump_json()))
    tables, failures = {}, []
    started = time.time()
    graph = uses_graph(config, planned, planned_implicit)
    ran = _run_graph(config, planned, planned_implicit, out, failures, progress) if graph else {}
    for model in config.models:
        if planned[model]:
            path, before = model_dir(out, model), len(failures)
            tables[model] = ran.get(path) if graph else _run_arms(model, path, planned[model], failures, started,
                                                                  progress)
            _finish_2d(config, path, failures, started, progress, rsa=not graph)  # the graph did its RSA
            if not graph and len(failures) == before:  # the graph deleted what it could as it went
                _retain(path, planned[model], (config.dtype, config.rsa_subset) if config.rsa else None)
        if planned_implicit[model]:
            path, before = implicit_dir(config.out, model), len(failures)
            if not graph:
                _run_arms(model, path, planned_implicit[model], failures, started, progress)
            _finish_implicit(config, model, path, failures, started)
            if not graph and len(failures) == before:
                _retain(path, planned_implicit[model])
    if config.report and sum(bool(arms) for arms in planned.values()) > 1:
        logger.info("== models compared: %s", build_models_report(out, model_reports=False))  # reports built above
    if failures:
        raise ConditionsFailed("; ".join(failures))
    return tables


def uses_graph(config: SweepConfig, planned: dict, planned_implicit: dict) -> bool:
    """`iclsft.graph.driver.runs_on_graph` for every arm of the sweep."""
    return runs_on_graph(config.executor, (spec for arms in (*planned.values(), *planned_implicit.values())
                                           for spec, _ in arms))


def _run_graph(config: SweepConfig, planned: dict, planned_implicit: dict, out: Path, failures: list,
               progress: bool) -> dict:
    """Every arm of every model as one work graph on Ray; returns each run directory's metrics table."""
    arms = [(model_dir(out, model), spec, ref) for model in config.models for spec, ref in planned[model]]
    arms += [(implicit_dir(out, model), spec, ref) for model in config.models for spec, ref in planned_implicit[model]]
    imp = config.implicit
    tables, failed = run_graph(arms, config.executor, config.resources, out / "graph.json",
                               rsa=(config.dtype, config.rsa_subset) if config.rsa else None,
                               circuits=(imp.circuit_pairs, imp.circuit_shots) if imp is not None and imp.circuits
                               else None)
    failures.extend(failed)
    return tables


def _run_arms(model: str, path: Path, arms: list, failures: list, started: float, progress: bool):
    """Each arm of one run directory in turn; returns the run's metrics table after the last."""
    run, table = RunDir(path), None
    for i, (spec, ref) in enumerate(arms, 1):
        conds = spec.conditions()
        done = sum(run.is_done(c) for c in conds)
        logger.info("== %s · %s (%d/%d arms): %d/%d conditions done, %d to run · %s", model, spec.arm, i, len(arms),
                    done, len(conds), len(conds) - done, _elapsed(started))
        try:
            table = run_spec(spec, path, ref, progress=progress, retain=False)  # RSA and circuits read them next
        except ConditionsFailed as e:
            failures.append(f"{model} {spec.arm}: {e}")
            logger.warning("%s", e)
    return table


def _retain(path: Path, arms: list, rsa: tuple[str, str] | None = None) -> None:
    """After the arms, RSA and circuits of one run directory in this process: delete the full checkpoints
    the SFT arms' `checkpoints_keep` deletes (iclsft.sft.retention)."""
    arms = [spec for spec, _ in arms if spec.training is not None]
    if not any(spec.checkpoints_keep != "all" for spec in arms):
        return
    run = RunDir(path)
    run.acquire_lock()
    try:
        for spec in arms:
            retain(run, spec, rsa_done(rsa))
    finally:
        run.release_lock()


def _finish_2d(config: SweepConfig, path: Path, failures: list, started: float, progress: bool,
               rsa: bool = True) -> None:
    """RSA (unless the work graph did it) and the report of one model's 2D run."""
    model = path.name
    if config.rsa and rsa:
        logger.info("== %s · RSA · %s", model, _elapsed(started))
        try:
            compute_rsa(path, dtype=config.dtype, subset=config.rsa_subset, progress=progress)
        except ConditionsFailed as e:
            failures.append(f"{model} rsa: {e}")
            logger.warning("%s", e)
    if config.report:
        logger.info("== %s · report: %s", model, build_report(path))


def _finish_implicit(config: SweepConfig, model: str, path: Path, failures: list, started: float) -> None:
    """Circuit shift and the report of one model's implicit run."""
    imp = config.implicit
    if imp.circuits:
        logger.info("== %s · implicit circuit shift · %s", model, _elapsed(started))
        try:
            compute_circuits(path, pairs=imp.circuit_pairs, shots=imp.circuit_shots)
        except ConditionsFailed as e:
            failures.append(f"{model} circuits: {e}")
            logger.warning("%s", e)
    if config.report:
        logger.info("== %s · implicit report: %s", model, build_report(path))


def _elapsed(started: float) -> str:
    s = time.time() - started
    return f"{int(s // 60)}m{int(s % 60):02d}s elapsed"
