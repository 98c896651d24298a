"""Running a sweep: every arm of every model, the 2D study's RSA and the implicit suite's circuit states
as one work graph (`iclsft.graph`). On Ray (the default executor) trainings are tasks and scorings go to
scorer actors that each hold one engine, the arms overlapping; with `executor: {name: local}` (or sharded
training) the same works run one at a time in this process. `OUT/graph.json` records the resources,
per-role busy time and utilisation, and engine starts. Then the circuit-shift tables and the reports. An
interrupted sweep recomputes nothing that finished. `OUT/sweep.json` holds the expanded config."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from iclsft.artifacts import atomic_write_json
from iclsft.errors import ConditionsFailed
from iclsft.graph.driver import runs_on_graph
from iclsft.graph.run import run_graph
from iclsft.implicit.circuits import compute_circuits
from iclsft.prompts import prompt_builders
from iclsft.report import build_report
from iclsft.report.models import build_models_report
from iclsft.store import RunDir
from iclsft.sweep.config import SweepConfig
from iclsft.sweep.plan import implicit_dir, model_dir, planned_arms

logger = logging.getLogger(__name__)


def run_sweep(config: SweepConfig, *, progress: bool = True) -> dict:
    """Run or resume everything; return {model: metrics table}. Failed conditions are recorded in
    their run and summarised at the end (rerun to retry them); other conditions go on."""
    planned = planned_arms(config)  # every input checked first; the arms in the order the simulator takes them
    _check_labels(config, planned)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    # One sweep per output directory (an flock on OUT/.lock, gone when its holder exits or is killed); each
    # run directory below has its own lock too, so an `icl` or `sft` command cannot write into it meanwhile.
    sweep_lock = RunDir(out)
    sweep_lock.acquire_lock(instead="give this sweep another out=")
    try:
        return _run_planned(config, planned, out, progress)
    finally:
        sweep_lock.release_lock()


def _check_labels(config: SweepConfig, planned: dict) -> None:
    """Labels each model's tokenizer can tell apart in its 2D arms, before the sweep writes anything (the
    runs check again, later)."""
    from transformers import AutoTokenizer

    for model, arms in planned.items():
        two_d = [(spec, ref) for path, spec, ref in arms if Path(path) == model_dir(config.out, model)]
        if two_d:
            tokenizer = AutoTokenizer.from_pretrained(two_d[0][1].path)
            for spec, _ in two_d:
                prompt_builders(tokenizer, spec.template, spec.tasks)


def _run_planned(config: SweepConfig, planned: dict, out: Path, progress: bool) -> dict:
    atomic_write_json(out / "sweep.json", json.loads(config.model_dump_json()))
    failures: list[str] = []
    started = time.time()
    ran = _run_graph(config, [arm for arms in planned.values() for arm in arms], out, failures, progress)
    tables = {}
    paths = {model: {Path(p) for p, _, _ in arms} for model, arms in planned.items()}
    for model in config.models:
        path = model_dir(out, model)
        if path in paths[model]:
            tables[model] = ran.get(path)
            _finish_2d(config, path, started)
        if implicit_dir(out, model) in paths[model]:
            _finish_implicit(config, model, implicit_dir(out, model), failures, started)
    if config.report and len(tables) > 1:
        logger.info("== models compared: %s", build_models_report(out, model_reports=False))  # reports built above
    if failures:
        raise ConditionsFailed("; ".join(failures))
    return tables


def _run_graph(config: SweepConfig, arms: list, out: Path, failures: list, progress: bool) -> dict:
    """Every arm of every model (run directory, spec, model ref), their RSA and circuit states as one work
    graph, on Ray or in this process (`iclsft.graph.driver.runs_on_graph`); returns each run directory's
    metrics table."""
    imp = config.implicit
    ray = runs_on_graph(config.executor, [spec for _, spec, _ in arms])
    tables, failed = run_graph(arms, config.executor, config.resources, out / "graph.json", local=not ray,
                               progress=progress, rsa=(config.dtype, config.rsa_subset) if config.rsa else None,
                               circuits=(imp.circuit_pairs, imp.circuit_shots) if imp is not None and imp.circuits
                               else None)
    failures.extend(failed)
    return tables


def _finish_2d(config: SweepConfig, path: Path, started: float) -> None:
    """The report of one model's 2D run (its RSA was computed in the work graph)."""
    if config.report:
        logger.info("== %s · report: %s · %s", path.name, build_report(path), _elapsed(started))


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
