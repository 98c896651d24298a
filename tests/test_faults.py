"""Reliability under faults (docs/reliability.md): a tiny sweep (ICL and LoRA, two K, two checkpoints,
RSA, report) is killed with SIGKILL at every named point of iclsft.faults, one point after another,
each run resuming what the previous one left; after a clean last run its tables equal those of an
uninterrupted run. After every kill, everything that claims to be finished verifies against its
checksums and nothing finished earlier was touched. The same for the implicit-pattern suite through
its commands (`implicit --method icl`, `implicit --method lora`, `circuits`). Also: damaged artifacts
of both studies are recomputed on resume, a second sweep on the same directory is refused while the
first holds it (and runs once the first is killed), a Ray worker killed mid-training is retried, and
out-of-memory errors name the setting to lower.

The runs that get killed are forked from one preloaded process (multiprocessing's forkserver), so
each costs about a second instead of the 9 s of importing torch, transformers and peft.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from iclsft.artifacts import file_matches
from iclsft.cli import main
from iclsft.faults import parse
from iclsft.sft.adapters import MARKER, checkpoint_problem, is_finished
from iclsft.sweep import SweepConfig, model_dir, run_sweep

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ["seconds", "train_seconds", "trained_now", "finished"]
PRELOAD = ["iclsft.cli", "iclsft.sweep", "iclsft.arms", "iclsft.arms.linear2d", "iclsft.arms.implicit",
           "iclsft.sft.train", "iclsft.rsa", "iclsft.rsa.activations", "iclsft.implicit.circuits",
           "iclsft.circuits.attribution", "iclsft.report", "iclsft.engine.hf", "peft", "torch", "pandas", "pyarrow",
           "matplotlib.pyplot", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.tokenization_auto", "test_faults"]


def sweep_config(model: Path, out: Path) -> dict:
    """Every step of a sweep at its smallest: 2 ICL conditions, 2 LoRA trainings of 4 steps with 2
    checkpoints each (4 conditions), RSA of all 6, the report."""
    return {"out": str(out), "models": [str(model)], "tasks": [{"name": "linear2d", "angles": [30]}],
            "methods": ["icl", "lora"], "shots": [1, 2], "seeds": [0], "checkpoints": [0.5, 1.0], "grid_step": 20,
            "engine": "hf", "sft": {"lora": {"epochs": 1, "min_steps": 4, "batch_size": 2}},
            "executor": {"name": "local"}, "rsa": True, "report": True}


# -- running a sweep in a forked process ---------------------------------------------------------
def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    """Runs in a process forked from the preloaded forkserver: the CLI, output to `log`."""
    for key in [k for k in os.environ if k.startswith("ICLSFT_FAULT")]:
        del os.environ[key]
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)  # as the in-process baseline (one_thread): the same numbers to the last bit
    if argv[0].endswith(".py"):
        import runpy

        runpy.run_path(argv[0], run_name="__main__")
        return
    main(argv, prog_name="iclsft-eval")


class Launcher:
    def __init__(self, home: Path, logs: Path):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.home, self.logs = home, logs
        self.count = 0

    def start(self, argv: list[str], **env: str):
        self.count += 1
        log = self.logs / f"run-{self.count}.log"
        proc = self.ctx.Process(target=_child, args=(argv, {"ICLSFT_HOME": str(self.home), **env}, str(log)))
        proc.start()
        proc.log = log
        return proc

    def run(self, argv: list[str], timeout: float = 300, **env: str) -> tuple[int, str]:
        proc = self.start(argv, **env)
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            pytest.fail(f"{argv} did not finish within {timeout} s:\n{proc.log.read_text()[-3000:]}")
        return proc.exitcode, proc.log.read_text()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("iclsft-home")


@pytest.fixture(scope="module")
def launcher(home, tmp_path_factory) -> Launcher:
    return Launcher(home, tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory, home, one_thread) -> Path:
    """The uninterrupted sweep, in this process; returns its run directory."""
    out = tmp_path_factory.mktemp("baseline")
    old = os.environ.get("ICLSFT_HOME")
    os.environ["ICLSFT_HOME"] = str(home)
    try:
        run_sweep(SweepConfig(**sweep_config(tiny_model_dir, out)), progress=False)
    finally:
        os.environ.pop("ICLSFT_HOME") if old is None else os.environ.__setitem__("ICLSFT_HOME", old)
    return model_dir(out, str(tiny_model_dir))


def write_config(path: Path, model: Path, out: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**sweep_config(model, out), **changes}))
    return path


# -- what a run directory holds ------------------------------------------------------------------
def ok_records(run: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(run.glob("conditions/*/record.json")):
        record = json.loads(f.read_text())
        if record.get("status") == "ok":
            out[f.parent.name] = record
    return out


def ok_rsa(run: Path) -> list[str]:
    return sorted(f.parent.name for f in run.glob("conditions/*/rsa.json")
                  if json.loads(f.read_text()).get("status") == "ok")


def finished_adapters(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("adapters/*") if not p.name.startswith(".") and is_finished(p))


def ok_circuits(run: Path) -> list[str]:
    """The circuit states (`<task>-<state>.npz`) that circuits.json lists with a matching size and sha256."""
    try:
        index = json.loads((run / "circuits" / "circuits.json").read_text())
    except FileNotFoundError:
        return []
    return sorted(name for name, info in index.items() if file_matches(run / "circuits" / name, info))


def finished_files(run: Path) -> dict[str, int]:
    """mtime of every file that something claims is finished: condition records and their files, RSA
    records and arrays, adapter checkpoints, circuit scores. None of them may change once written."""
    files: list[Path] = []
    for name, record in ok_records(run).items():
        cdir = run / "conditions" / name
        files += [cdir / "record.json", *(cdir / f for f in record["files"])]
    for name in ok_rsa(run):
        files += [run / "conditions" / name / "rsa.json", run / "conditions" / name / "rsa.npz"]
    for name in finished_adapters(run):
        files += [p for p in (run / "adapters" / name).rglob("*") if p.is_file()]
    files += [run / "circuits" / name for name in ok_circuits(run)]
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in files}


def assert_everything_finished_verifies(run: Path) -> None:
    """No partial file is ever taken as finished: whatever says ok matches its checksums."""
    for name, record in ok_records(run).items():
        for f, info in record["files"].items():
            assert file_matches(run / "conditions" / name / f, info), f"{name}/{f} is finished but does not verify"
    from iclsft.rsa.run import load_rsa

    for name in ok_rsa(run):
        load_rsa(run / "conditions" / name)  # raises on a checksum mismatch
    for name in finished_adapters(run):
        assert checkpoint_problem(run / "adapters" / name) is None
    index = run / "circuits" / "circuits.json"
    if index.is_file():  # every circuit state it lists verifies (circuits.json is written after each .npz)
        assert sorted(json.loads(index.read_text())) == ok_circuits(run)


def temp_files(run: Path) -> list[str]:
    """What killed writers leave: `.NAME.*.tmp` files (atomic writes) and `.tmp-*` directories."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*")
                  if p.name.endswith(".tmp") or p.name.startswith(".tmp-"))


def tables(run: Path) -> pd.DataFrame:
    table = pd.read_parquet(run / "metrics.parquet")
    return table.drop(columns=[c for c in TIMING if c in table]).reset_index(drop=True)


def assert_same_results(run: Path, baseline: Path, rsa: bool = True, report: bool = True) -> None:
    pd.testing.assert_frame_equal(tables(run), tables(baseline), check_exact=False, rtol=1e-9, atol=1e-12)
    assert sorted(ok_records(run)) == sorted(ok_records(baseline))
    for name in ok_records(baseline):
        a = pd.read_parquet(run / "conditions" / name / "scores.parquet")
        b = pd.read_parquet(baseline / "conditions" / name / "scores.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12)
    from iclsft.rsa.run import load_rsa

    assert ok_rsa(run) == (ok_rsa(baseline) if rsa else [])
    assert ok_rsa(baseline) == sorted(ok_records(baseline))
    for name in ok_rsa(run):
        a, b = load_rsa(run / "conditions" / name), load_rsa(baseline / "conditions" / name)
        assert sorted(a) == sorted(b)
        for key in b:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6, err_msg=f"{name} {key}")
    assert (run / "report" / "index.html").is_file() == report


# -- the kill chain ------------------------------------------------------------------------------
# (point, finished ICL + SFT conditions, finished adapters, conditions with RSA, what the kill leaves)
# in the order a sweep reaches them; each run resumes what the run before it left.
CHAIN = [
    ("write:spec.json", 0, 0, 0, "spec.json only as a temporary file: the run does not exist yet"),
    ("train-step:2", 0, 0, 0, "LoRA K=1, the graph's first work (trainings first), killed after 2 of 4 optimizer "
                              "steps: no checkpoint"),
    ("adapter-save:2", 0, 1, 0, "its first checkpoint finished, the second one saved with its marker under a "
                                "temporary name, not renamed"),
    ("score", 0, 2, 0, "both K=1 checkpoints finished; ICL K=1 scored in memory, nothing written"),
    ("write:scores.parquet", 0, 4, 0, "K=2 trained too; ICL K=1's scores in a temporary file, not renamed"),
    ("condition-record", 0, 4, 0, "ICL K=1's files in place, its record not written: not finished"),
    ("rsa", 1, 4, 0, "ICL K=1 finished; its rsa.npz written (right after its scoring), its rsa.json not"),
    ("write:rsa.npz:2", 2, 4, 1, "ICL K=1's RSA done; ICL K=2 finished, its arrays half-written"),
    ("metrics", 2, 4, 2, "both ICL conditions and their RSA finished; the ICL arm's metrics table not written"),
    ("score:2", 3, 4, 3, "the first LoRA condition and its RSA finished; the second scored in memory, not written"),
    ("write:record.json:5", 5, 4, 5, "two more LoRA conditions and their RSA finished, the last one's record "
                                     "half-written (run records are 1 and 2)"),
    ("write:metrics.json:2", 6, 4, 6, "every condition and its RSA finished; the metrics table written at the end "
                                      "of the SFT arm, then again at the end of the run: its checksum file not"),
    ("report", 6, 4, 6, "all RSA done; the report's figures drawn, index.html not written"),
]


def observe(run: Path, point: str, code: int, log: str, before: dict, temp_root: Path, **extra) -> dict:
    """What one killed step left: exit code, log tail, finished files before and after, counts of what
    finished, leftover temporary files, and whether everything finished still verifies."""
    observed = {"point": point, "exitcode": code, "log": log[-3000:], "before": before,
                "after": finished_files(run) if run.exists() else {}, "run_exists": run.exists(),
                "conditions": len(ok_records(run)) if run.exists() else 0,
                "adapters": len(finished_adapters(run)) if run.exists() else 0,
                "temp": temp_files(temp_root), **extra}
    if run.exists():
        try:
            assert_everything_finished_verifies(run)
            observed["verifies"] = True
        except AssertionError as e:
            observed["verifies"] = str(e)
    return observed


@pytest.fixture(scope="module")
def chain(launcher, baseline, tiny_model_dir, tmp_path_factory) -> dict:
    """Run the chain; return the run directory and, per step, what was observed."""
    root = tmp_path_factory.mktemp("killed")
    config = write_config(root / "sweep.yaml", tiny_model_dir, root / "out")
    run = model_dir(root / "out", str(tiny_model_dir))
    argv = ["sweep", str(config), "--quiet"]
    steps = []
    for point, *_ in CHAIN:
        before = finished_files(run) if run.exists() else {}
        started = time.time()
        code, log = launcher.run(argv, ICLSFT_FAULT_AT=point)
        seconds = time.time() - started
        steps.append(observe(run, point, code, log, before, root / "out", seconds=seconds,
                             rsa=len(ok_rsa(run)) if run.exists() else 0))
    before = finished_files(run)
    started = time.time()
    code, log = launcher.run(argv)
    return {"run": run, "steps": steps, "final": (code, log), "before_final": before,
            "final_seconds": time.time() - started}


def check_kill(expected: tuple, seen: dict, counts: tuple[str, ...] = ("conditions", "adapters", "rsa")) -> None:
    """What every kill must leave: death by SIGKILL at the point, the finished counts the chain expects,
    everything finished verifying, nothing finished before touched, a half-written file only as a temporary."""
    point, *want, what = expected
    assert seen["exitcode"] == -signal.SIGKILL, f"{point}: exit code {seen['exitcode']}\n{seen['log']}"
    name, hit = parse(point)
    assert f"SIGKILL at {name} (hit {hit})" in seen["log"], seen["log"]
    # what the kill left, as the chain expects (a wrong count means the point is not where it says)
    assert tuple(seen[c] for c in counts) == tuple(want), (what, seen)
    if seen["run_exists"]:
        assert seen["verifies"] is True, seen["verifies"]
    # nothing that was finished before this run was rewritten, not even touched
    assert {k: v for k, v in seen["after"].items() if k in seen["before"]} == seen["before"]
    if point.startswith("write:"):  # the half-written file is a temporary that nothing reads
        name = name.split(":")[1]
        assert any(Path(t).name.startswith(f".{name}.") for t in seen["temp"]), seen["temp"]


@pytest.mark.parametrize("step", range(len(CHAIN)), ids=[f"{i}-{c[0]}" for i, c in enumerate(CHAIN)])
def test_sigkill_at_point(chain, step):
    check_kill(CHAIN[step], chain["steps"][step])


def check_rerun(chain: dict, assert_same, baseline) -> None:
    """The final rerun of a kill chain: it succeeds, its results equal the uninterrupted run's, nothing
    finished before it was rewritten, and the metrics table verifies against metrics.json (the kill at
    write:metrics.json left it stale)."""
    from iclsft.evaluate.runs import read_metrics

    code, log = chain["final"]
    assert code == 0, log[-3000:]
    run = chain["run"]
    assert_same(run, baseline)
    after = finished_files(run)
    assert {k: v for k, v in after.items() if k in chain["before_final"]} == chain["before_final"]
    assert "Traceback" not in log
    assert read_metrics(run) is not None


def test_rerun_after_every_kill_gives_the_uninterrupted_results(chain, baseline):
    check_rerun(chain, assert_same_results, baseline)


# -- the implicit-pattern suite ------------------------------------------------------------------
# Its three commands at their smallest: the ICL arm (2 tasks x K = 0, 1 x 2 variants: 8 conditions), the
# LoRA arm (one model per task, 2 optimizer steps each, both variants scored: 4 conditions), then the
# circuit pass (base, ICL K=1 and LoRA per task: 6 states of 2 pairs).
def implicit_commands(model: Path, run: Path) -> list[list[str]]:
    common = ["--tasks", "boolean,relation", "--seed", "0", "--train-size", "8", "--eval-size", "4",
              "--model", str(model), "--engine", "hf", "--out", str(run), "--quiet"]
    return [["implicit", "--method", "icl", "--shots", "0,1", *common],
            ["implicit", "--method", "lora", "--epochs", "1", "--batch-size", "4", "--executor", "local", *common],
            ["circuits", str(run), "--pairs", "2", "--shots", "1", "--quiet"]]


def run_commands(launcher: Launcher, commands: list[list[str]], **env: str) -> tuple[int, str]:
    """The commands in order, as a user runs them, up to the first that fails: (its exit code, the logs)."""
    code, logs = 0, ""
    for argv in commands:
        code, log = launcher.run(argv, **env)
        logs += log
        if code != 0:
            break
    return code, logs


def circuit_tables(run: Path) -> tuple[pd.DataFrame, dict]:
    """The shift table and every state's scores (arrays by name)."""
    from iclsft.circuits import ComponentScores

    index = json.loads((run / "circuits" / "circuits.json").read_text())
    scores = {name: ComponentScores.load(run / "circuits" / name, info) for name, info in index.items()}
    return pd.DataFrame(json.loads((run / "circuits" / "shift.json").read_text())), scores


def assert_same_implicit_results(run: Path, baseline: Path, rtol: float = 1e-9) -> None:
    pd.testing.assert_frame_equal(tables(run), tables(baseline), check_exact=False, rtol=rtol, atol=1e-12)
    assert sorted(ok_records(run)) == sorted(ok_records(baseline)) and len(ok_records(baseline)) == 12
    for name in ok_records(baseline):
        a = pd.read_parquet(run / "conditions" / name / "scores.parquet")
        b = pd.read_parquet(baseline / "conditions" / name / "scores.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=rtol, atol=1e-12)
    assert finished_adapters(run) == finished_adapters(baseline) and len(finished_adapters(baseline)) == 2
    (shift, scores), (want_shift, want_scores) = circuit_tables(run), circuit_tables(baseline)
    pd.testing.assert_frame_equal(shift, want_shift, check_exact=False, rtol=1e-6, atol=1e-9)
    assert sorted(scores) == sorted(want_scores) and len(want_scores) == 6
    for name, want in want_scores.items():
        np.testing.assert_allclose(scores[name].heads, want.heads, rtol=1e-6, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(scores[name].mlps, want.mlps, rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.fixture(scope="module")
def implicit_baseline(launcher, tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted suite, its commands run like the killed ones; returns its run directory."""
    run = tmp_path_factory.mktemp("implicit-baseline") / "run"
    code, log = run_commands(launcher, implicit_commands(tiny_model_dir, run))
    assert code == 0, log[-3000:]
    return run


# (point, finished conditions, finished adapters, circuit states that verify, what the kill leaves), in the
# order the three commands reach them; each step runs them again from the first, resuming what is left.
IMPLICIT_CHAIN = [
    ("write:spec.json", 0, 0, 0, "the ICL arm's spec.json only as a temporary file"),
    ("score", 0, 0, 0, "the first ICL condition scored in memory, nothing written"),
    ("write:scores.parquet:2", 1, 0, 0, "one ICL condition finished, the second one's scores in a temporary file"),
    ("condition-record", 1, 0, 0, "the second ICL condition's files in place, its record not written"),
    ("metrics", 8, 0, 0, "every ICL condition finished; the metrics table not written"),
    ("write:metrics.json", 8, 0, 0, "metrics.parquet written, its checksum file not (every command rewrites both)"),
    ("train-step:2", 8, 0, 0, "the first LoRA model killed after its last optimizer step: no checkpoint"),
    ("write:iclsft-adapter.json", 8, 0, 0, "the first checkpoint's marker half-written in its temporary directory"),
    ("adapter-save", 8, 0, 0, "the first checkpoint complete under a temporary name, not renamed"),
    ("score", 8, 2, 0, "both models trained (trainings first, one work at a time); the first LoRA condition "
                       "scored in memory, nothing written"),
    ("condition-record:2", 9, 2, 0, "one LoRA condition finished, the second one's files without a record"),
    ("score:2", 10, 2, 0, "the first model's conditions finished; the second model's first condition scored, not "
                          "written"),
    ("write:boolean-icl-K1.npz", 12, 2, 1, "the base state's scores listed, the ICL state's half-written"),
    ("circuits", 12, 2, 1, "the ICL state's scores written, circuits.json not updated: not finished"),
    ("write:circuits.json:2", 12, 2, 2, "the ICL state listed, the LoRA state's entry half-written"),
    ("write:shift.json", 12, 2, 6, "every state listed; the shift table half-written"),
]


@pytest.fixture(scope="module")
def implicit_chain(launcher, implicit_baseline, tiny_model_dir, tmp_path_factory) -> dict:
    """Run the implicit chain; return the run directory and, per step, what was observed."""
    run = tmp_path_factory.mktemp("implicit-killed") / "run"
    commands = implicit_commands(tiny_model_dir, run)
    steps = []
    for point, *_ in IMPLICIT_CHAIN:
        before = finished_files(run) if run.exists() else {}
        code, log = run_commands(launcher, commands, ICLSFT_FAULT_AT=point)
        steps.append(observe(run, point, code, log, before, run.parent,
                             circuits=len(ok_circuits(run)) if run.exists() else 0))
    before = finished_files(run)
    return {"run": run, "steps": steps, "final": run_commands(launcher, commands), "before_final": before}


@pytest.mark.parametrize("step", range(len(IMPLICIT_CHAIN)), ids=[f"{i}-{c[0]}" for i, c in enumerate(IMPLICIT_CHAIN)])
def test_implicit_sigkill_at_point(implicit_chain, step):
    check_kill(IMPLICIT_CHAIN[step], implicit_chain["steps"][step], counts=("conditions", "adapters", "circuits"))


def test_implicit_rerun_after_every_kill_gives_the_uninterrupted_results(implicit_chain, implicit_baseline):
    check_rerun(implicit_chain, assert_same_implicit_results, implicit_baseline)


@pytest.fixture
def implicit_copy(implicit_baseline, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(implicit_baseline, run)
    return run


def _implicit_cond(run: Path, task: str, variant: str, method: str, shots: int = 0) -> Path:
    for name, record in ok_records(run).items():
        if (record["task"], record["variant"], record["method"]) == (task, variant, method) and \
                (method != "icl" or record["shots"] == shots):
            return run / "conditions" / name
    raise AssertionError((task, variant, method, shots))


def test_damaged_implicit_artifacts_are_recomputed_on_resume(implicit_copy, implicit_baseline, launcher,
                                                             tiny_model_dir):
    """A truncated ICL scores.parquet, a LoRA adapter with zeroed weights (one of its conditions to score
    again) and a circuit state with a flipped byte: the rerun of the three commands sets the adapter aside
    and trains it again, recomputes exactly those, and ends with the uninterrupted results."""
    run = implicit_copy
    before = finished_files(run)
    icl = _implicit_cond(run, "boolean", "holds", "icl", 1)
    (icl / "scores.parquet").write_bytes((icl / "scores.parquet").read_bytes()[:-100])
    lora = _implicit_cond(run, "relation", "broken", "lora")
    adapter = run / "adapters" / json.loads((lora / "record.json").read_text())["checkpoint_dir"]
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    (lora / "scores.parquet").unlink()  # so that the damaged adapter is needed again
    state = run / "circuits" / "relation-icl-K1.npz"
    data = bytearray(state.read_bytes())
    data[-30] ^= 0x40
    state.write_bytes(bytes(data))
    recomputed = {icl.name, lora.name, adapter.name, state.name}
    untouched = {k: v for k, v in before.items() if not recomputed & set(Path(k).parts)}

    code, log = run_commands(launcher, implicit_commands(tiny_model_dir, run))
    assert code == 0, log[-3000:]
    assert f"warning: checkpoint {adapter} is damaged (adapter_model.safetensors" in log and "set aside" in log, log
    assert len(list(run.glob("adapters/.damaged-*"))) == 1  # kept aside for inspection, never read
    # float32 log-probs: the ICL condition recomputed alone computes its K=1 prompt from scratch, where the
    # uninterrupted run extended the cached K=0 prefix (hf engine); they differ in the last bits (2e-7 seen)
    assert_same_implicit_results(run, implicit_baseline, rtol=1e-6)
    assert {k: v for k, v in finished_files(run).items() if k in untouched} == untouched
    assert finished_files(run)[f"circuits/{state.name}"] != before[f"circuits/{state.name}"]  # recomputed


def test_damaged_implicit_adapter_is_a_clear_circuits_error(implicit_copy, launcher):
    """A fine-tuned state whose checkpoint no longer matches its marker is refused in one line naming it."""
    run = implicit_copy
    lora = _implicit_cond(run, "boolean", "holds", "lora")
    adapter = run / "adapters" / json.loads((lora / "record.json").read_text())["checkpoint_dir"]
    (adapter / "adapter_config.json").write_text("{}")
    (run / "circuits" / "boolean-lora.npz").unlink()  # so that the state is computed again
    code, log = launcher.run(["circuits", str(run), "--pairs", "2", "--shots", "1", "--quiet"])
    assert code == 1 and "Traceback" not in log, log
    (line,) = [x for x in log.splitlines() if x.startswith("Error:")]
    assert f"checkpoint {adapter} is damaged (adapter_config.json missing or not matching" in line, line
    assert line.endswith("then rerun the sft arm"), line


def test_killed_model_preparation_leaves_no_prepared_model(launcher, tiny_model_dir, tmp_path):
    """`models prepare` killed after converting, before its marker: nothing counts as prepared, and the
    next prepare converts again into place."""
    script = tmp_path / "prepare.py"
    script.write_text(PREPARE_SCRIPT)
    home = tmp_path / "home"
    env = {"ICLSFT_HOME": str(home), "TINY": str(tiny_model_dir)}
    code, log = launcher.run([str(script)], ICLSFT_FAULT_AT="model-prepare", **env)
    assert code == -signal.SIGKILL, log
    models = home / "models"
    assert not (models / "smollm2-135m").exists()
    assert [p.name.startswith(".tmp-smollm2-135m-") for p in models.iterdir()] == [True]  # only the temporary
    code, log = launcher.run([str(script)], **env)
    assert code == 0, log
    assert (models / "smollm2-135m" / "iclsft-model.json").is_file()
    assert (models / "smollm2-135m" / "model.safetensors").read_bytes() == \
        (tiny_model_dir / "model.safetensors").read_bytes()


PREPARE_SCRIPT = """
import os, shutil
from pathlib import Path
from iclsft import models
models._gguf_file = lambda name: Path(os.environ["TINY"]) / "model.safetensors"   # stands in for the GGUF
models._convert_gguf = lambda gguf, out: shutil.copytree(os.environ["TINY"], out)
models.prepare_model("smollm2-135m")
"""


# -- damaged artifacts -----------------------------------------------------------------------------
@pytest.fixture
def copied(baseline, tmp_path) -> Path:
    """A copy of the finished baseline sweep (run directory under OUT/<model>)."""
    out = tmp_path / "out"
    shutil.copytree(baseline.parent, out)
    return out / baseline.name


def resume(tiny_model_dir, run: Path, home: Path, caplog, **changes) -> list[str]:
    """Resume the sweep in this process; its log messages (the `iclsft` logger, INFO and up)."""
    config = SweepConfig(**{**sweep_config(tiny_model_dir, run.parent), **changes})
    old = os.environ.get("ICLSFT_HOME")
    os.environ["ICLSFT_HOME"] = str(home)
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="iclsft"):
            run_sweep(config, progress=False)
    finally:
        os.environ.pop("ICLSFT_HOME") if old is None else os.environ.__setitem__("ICLSFT_HOME", old)
    return [r.getMessage() for r in caplog.records]


def _cond(run: Path, method: str, shots: int, checkpoint: float | None = None) -> Path:
    for name, record in ok_records(run).items():
        if record["method"] == method and record["shots"] == shots and record.get("checkpoint") == checkpoint:
            return run / "conditions" / name
    raise AssertionError((method, shots, checkpoint))


def test_damaged_artifacts_are_recomputed_on_resume(copied, baseline, tiny_model_dir, home, caplog):
    """A truncated scores.parquet, a flipped byte in field.npy (same size), a damaged LoRA adapter, a
    truncated rsa.npz and an altered metrics.parquet: the resumed sweep recomputes each of them and
    ends with the uninterrupted results; nothing else is recomputed."""
    run = copied
    before = finished_files(run)
    icl1 = _cond(run, "icl", 1)
    (icl1 / "scores.parquet").write_bytes((icl1 / "scores.parquet").read_bytes()[:-100])
    icl2 = _cond(run, "icl", 2)
    field = bytearray((icl2 / "field.npy").read_bytes())
    field[-3] ^= 0x40
    (icl2 / "field.npy").write_bytes(bytes(field))
    lora = _cond(run, "lora", 2, 1.0)
    adapter = run / "adapters" / json.loads((lora / "record.json").read_text())["checkpoint_dir"]
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    (lora / "scores.parquet").unlink()  # so that the damaged adapter is needed again
    rsa_cond = _cond(run, "lora", 1, 0.5)
    (rsa_cond / "rsa.npz").write_bytes((rsa_cond / "rsa.npz").read_bytes()[:1000])
    table = pd.read_parquet(run / "metrics.parquet")
    table.loc[0, "accuracy"] = 0.999
    table.to_parquet(run / "metrics.parquet", index=False)
    damaged = {icl1.name, icl2.name, lora.name}
    untouched = {k: v for k, v in before.items() if k.split("/")[1] not in damaged | {rsa_cond.name, adapter.name}}

    (run / "report" / "index.html").unlink()
    messages = resume(tiny_model_dir, run, home, caplog, report=False)
    assert any("is damaged (adapter_model.safetensors" in m and "set aside" in m for m in messages), messages
    assert any("icl: 2 conditions, 0 already finished, 2 to run" in m for m in messages), messages
    assert any("sft-lora: 4 conditions, 3 already finished, 1 to run" in m for m in messages), messages
    # RSA again for the 3 conditions scored again, and for the one whose arrays were damaged
    assert sum(m.startswith("RSA ") for m in messages) == 4, messages
    assert_same_results(run, baseline, report=False)
    assert len(list(run.glob("adapters/.damaged-*"))) == 1  # kept aside for inspection, never read
    assert {k: v for k, v in finished_files(run).items() if k in untouched} == untouched


def test_report_never_reads_a_damaged_file(copied):
    """The report's reader takes metrics.parquet only when it matches metrics.json (else recomputes it
    from verified scores), and refuses a condition whose field no longer matches its record."""
    from iclsft.evaluate.rundata import load_run

    table = pd.read_parquet(copied / "metrics.parquet")
    want = table["accuracy"].tolist()
    table.loc[0, "accuracy"] = 0.999  # a plausible value, same size on disk
    table.to_parquet(copied / "metrics.parquet", index=False)
    assert load_run(copied).metrics["accuracy"].tolist() == want
    field = sorted(copied.glob("conditions/*/field.npy"))[0]
    data = bytearray(field.read_bytes())
    data[-1] ^= 0x01
    field.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{field.name} does not match the checksum in its record"):
        load_run(copied)


def test_damaged_adapter_of_a_finished_condition_is_a_clear_rsa_error(copied, home, monkeypatch):
    run = copied
    lora = _cond(run, "lora", 1, 1.0)
    adapter = run / "adapters" / json.loads((lora / "record.json").read_text())["checkpoint_dir"]
    (adapter / "adapter_config.json").write_text("{}")
    (lora / "rsa.json").unlink()
    monkeypatch.setenv("ICLSFT_HOME", str(home))
    result = CliRunner().invoke(main, ["rsa", str(run), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "RSA failed for 1 of 1 conditions" in result.output and "Traceback" not in result.output
    error = json.loads((lora / "rsa.json").read_text())["error"]
    assert f"checkpoint {adapter} is damaged (adapter_config.json" in error and "rerun the sft arm" in error


# -- concurrency -----------------------------------------------------------------------------------
def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_second_sweep_is_refused_while_the_first_runs_and_runs_once_it_is_killed(
        launcher, baseline, tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "sweep.yaml", tiny_model_dir, tmp_path / "out", rsa=False, report=False)
    argv = ["sweep", str(config), "--quiet"]
    first = launcher.start(argv, ICLSFT_FAULT_AT="train-step:2", ICLSFT_FAULT_SIGNAL="STOP")
    try:
        deadline = time.time() + 120
        while _state(first.pid) != "T":  # stopped mid-training, holding its locks
            assert first.is_alive() and time.time() < deadline, first.log.read_text()[-3000:]
            time.sleep(0.1)
        run = model_dir(tmp_path / "out", str(tiny_model_dir))
        snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        code, log = launcher.run(argv)
        assert code == 1, log
        lines = [line for line in log.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1 and f"in use by another iclsft-eval process (pid {first.pid} on " in lines[0], log
        assert "give this sweep another out=" in lines[0]
        code, log = launcher.run(["icl", "--model", str(tiny_model_dir), "--angle", "30", "--shots", "1,2",
                                  "--grid-step", "20", "--engine", "hf", "--out", str(run), "--quiet"])
        assert code == 1 and f"(pid {first.pid} on " in log, log
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot  # nothing written
    finally:
        os.kill(first.pid, signal.SIGKILL)  # a holder that dies leaves no stale lock
        first.join()
    assert first.exitcode == -signal.SIGKILL
    code, log = launcher.run(argv)
    assert code == 0, log[-3000:]
    assert_same_results(model_dir(tmp_path / "out", str(tiny_model_dir)), baseline, rsa=False, report=False)


# -- worker faults ---------------------------------------------------------------------------------
def test_ray_worker_killed_mid_training_is_retried(baseline, tiny_model_dir, tmp_path, monkeypatch):
    """The Ray worker training K=1 kills itself (SIGKILL) at its second optimizer step; Ray starts the
    task again in a new worker (max_retries), which passes the point, and the run equals the baseline."""
    ray = pytest.importorskip("ray")
    from iclsft.arms import make_sft_spec
    from iclsft.graph.driver import run_spec
    from iclsft.spec import ExecutorSpec, sft_spec

    if ray.is_initialized():
        ray.shutdown()
    once = tmp_path / "fired"
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ICLSFT_FAULT_AT", "train-step:2")
    monkeypatch.setenv("ICLSFT_FAULT_ONCE", str(once))
    spec, ref = make_sft_spec(model=str(tiny_model_dir), angles=(30.0,), shots=(1,), grid_step=20,
                              checkpoints=(0.5, 1.0), sft=sft_spec("lora", epochs=1, min_steps=4, batch_size=2),
                              executor=ExecutorSpec(name="ray", max_retries=1, cpus_per_task=1))
    table = run_spec(spec, tmp_path / "run", ref, progress=False)
    assert (once / "train-step").is_file(), "no worker was killed"
    assert not ray.is_initialized()
    records = ok_records(tmp_path / "run")
    assert len(records) == 2 and all(r["train_steps"] in (2, 4) for r in records.values())
    want = tables(baseline)
    want = want[(want["method"] == "lora") & (want["shots"] == 1)].reset_index(drop=True)
    got = table.drop(columns=[c for c in TIMING if c in table]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-9, atol=1e-12)


OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.19 GiB total capacity)"


def test_out_of_memory_while_scoring_names_the_token_budget(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from iclsft.arms import scorer

    class Exhausted:  # an engine that holds the run's model and runs out of memory scoring
        def check_model(self, path, fingerprint):
            pass

        def score(self, *args, **kwargs):
            raise torch.OutOfMemoryError(OOM)

        def release(self, adapter):
            pass

        def close(self):
            pass

    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(scorer, "open_engine", lambda *a, **k: Exhausted())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["icl", "--model", str(tiny_model_dir), "--angle", "30", "--shots", "1",
                                       "--grid-step", "20", "--engine", "hf", "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "1 of 1 icl conditions failed (first: MemoryError: out of memory scoring linear2d-a30-icl-K1" in line
    assert "OutOfMemoryError: CUDA out of memory" in line and "lower --token-budget" in line
    (record,) = [json.loads(p.read_text()) for p in out.glob("conditions/*/record.json")]
    assert record["status"] == "error" and "lower --token-budget" in record["error"]


def test_out_of_memory_while_training_names_the_batch_size(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from iclsft.sft import train

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(train, "label_nll", exhausted)
    result = CliRunner().invoke(main, ["sft", "--model", str(tiny_model_dir), "--angle", "30", "--shots", "1",
                                       "--grid-step", "20", "--engine", "hf", "--executor", "local",
                                       "--min-steps", "2", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "first: MemoryError: out of memory training lora on 2 examples" in line
    assert "lower the SFT batch size (sft --batch-size; sweep: sft.<method>.batch_size)" in line


def test_out_of_memory_in_rsa_names_its_batch_size(copied, home, monkeypatch):
    import torch

    from iclsft.rsa import activations

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError(OOM)

    for f in copied.glob("conditions/*/rsa.json"):
        f.unlink()
    monkeypatch.setenv("ICLSFT_HOME", str(home))
    monkeypatch.setattr(activations, "activations", exhausted)
    result = CliRunner().invoke(main, ["rsa", str(copied), "--quiet"])
    assert result.exit_code == 1 and "RSA failed for 6 of 6 conditions" in result.output
    errors = {json.loads(f.read_text())["error"] for f in copied.glob("conditions/*/rsa.json")}
    assert len(errors) == 6 and all("out of memory reading activations" in e and "--batch-size N" in e
                                    for e in errors)


def test_fault_point_parsing():
    assert parse("adapter-save") == ("adapter-save", 1)
    assert parse("train-step:3") == ("train-step", 3)
    assert parse("write:scores.parquet") == ("write:scores.parquet", 1)
    assert parse("write:record.json:4") == ("write:record.json", 4)
    assert MARKER == "iclsft-adapter.json"
