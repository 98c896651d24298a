"""Sweeps on the tiny random Llama (real SmolLM2 tokenizer): configs and overrides, a sweep over
every axis that a rerun leaves untouched, and a sweep killed with SIGKILL mid-way whose rerun gives
the tables of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from logcapture import capture

from iclsft.spec import sft_spec
from iclsft.sweep import SweepConfig, apply_override, load_config, model_dir, plan, run_sweep

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
TIMING = ["seconds", "train_seconds", "trained_now", "finished"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))


def every_axis(model: Path, out: Path, **changes) -> dict:
    """Every task variant, every method, two orders, two checkpoints, RSA and the report."""
    config = {
        "out": str(out), "models": [str(model)],
        "tasks": [{"name": "linear2d", "angles": [30]}, {"name": "xor", "angles": [0]},
                  {"name": "semantic", "angles": [90]}],
        "methods": ["icl", "lora", "full", "full-frozen-unembed"], "shots": [1, 2], "seeds": [0],
        "orders": ["random", "12"], "checkpoints": [0.5, 1.0], "grid_step": 20, "engine": "hf",
        "sft": {m: {"epochs": 1, "min_steps": 2, "batch_size": 2} for m in ("lora", "full", "full-frozen-unembed")},
        "executor": {"name": "local"}, "rsa": True, "report": True,
    }
    config.update(changes)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def final_tables(out: Path, model: Path) -> pd.DataFrame:
    table = pd.read_parquet(model_dir(out, str(model)) / "metrics.parquet")
    return table.drop(columns=[c for c in TIMING if c in table.columns]).reset_index(drop=True)


# -- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name, tiny_model_dir, tmp_path):
    config = load_config(ROOT / "configs" / name, [f"models=[{tiny_model_dir}]", f"out={tmp_path}"])
    rows = plan(config)["rows"]
    implicit = [r for r in rows if r["arm"].startswith("implicit-")]
    rows = [r for r in rows if not r["arm"].startswith("implicit-")]
    assert {r["arm"] for r in rows} == {"icl" if m == "icl" else f"sft-{m}" for m in config.methods}
    if config.implicit is not None:  # per task, seed and variant: each K (ICL) or one model (SFT)
        imp = config.implicit
        original = {"implicit-full-original"} if "original" in imp.recipes else set()  # one model per seed
        assert {r["arm"] for r in implicit} == {f"implicit-{m}" for m in imp.methods} | original
        for r in implicit:
            per = len(imp.tasks) * len(config.seeds) * 2
            assert r["conditions"] == r["todo"] == per * (len(imp.shots) if r["arm"] == "implicit-icl" else 1)
            models = len(config.seeds) if r["arm"] in original else per // 2
            assert r["trainings"] == (0 if r["arm"] == "implicit-icl" else models)
            assert r["queries"] == r["todo"] * imp.eval_size
    else:
        assert not implicit
    for r in rows:
        method = "icl" if r["arm"] == "icl" else r["arm"].removeprefix("sft-")
        angles = sum(len(t.angles) for t in config.tasks if method in (t.methods or config.methods))
        orders = config.orders if method == "icl" else (config.sft_orders or config.orders)
        per_method = angles * len(config.shots) * len(config.seeds) * len(orders)
        checkpoints = 1 if method == "icl" else len(config.checkpoints)
        assert r["conditions"] == r["todo"] == per_method * checkpoints
        if method == "icl":
            assert r["trainings"] == 0
            continue
        # an even batch never splits an exemplar pair: every order probe shares the others' training
        assert sft_spec(method, **config.sft.get(method, {})).batch_size % 2 == 0
        assert r["trainings"] == per_method // len(orders)


def test_task_methods_and_sft_orders_choose_what_each_arm_runs(tiny_model_dir, tmp_path):
    from iclsft.sweep.plan import arm_specs

    config = SweepConfig(out=str(tmp_path), models=[str(tiny_model_dir)], methods=["icl", "lora", "full"],
                         tasks=[{"name": "linear2d", "angles": [0, 90], "methods": ["icl"]},
                                {"name": "linear2d", "angles": [45]}, {"name": "xor", "angles": [0],
                                                                       "methods": ["lora"]}],
                         shots=[1, 2], seeds=[0], orders=["random", "12"], sft_orders=["random"])
    arms = {spec.arm: spec for spec, _ in arm_specs(config, str(tiny_model_dir))}
    assert list(arms) == ["icl", "sft-lora", "sft-full"]  # the sweep's method order, not the tasks'
    cells = {arm: sorted({(c.task.name, c.task.angle, c.order) for c in spec.conditions()})
             for arm, spec in arms.items()}
    assert cells["icl"] == [("linear2d", a, o) for a in (0.0, 45.0, 90.0) for o in ("12", "random")]
    assert cells["sft-lora"] == [("linear2d", 45.0, "random"), ("xor", 0.0, "random")]
    assert cells["sft-full"] == [("linear2d", 45.0, "random")]
    counts = {r["arm"]: r["conditions"] for r in plan(config)["rows"]}
    assert counts == {"icl": 3 * 2 * 2, "sft-lora": 2 * 2, "sft-full": 1 * 2}


def test_paper_config_is_the_papers_design():
    config = load_config(ROOT / "configs" / "paper-linear2d.yaml")
    assert config.tasks[0].angles == (0, 15, 30, 45, 60, 75, 90, 135)
    assert max(config.shots) == 200 and set(config.methods) == {"icl", "lora", "full", "full-frozen-unembed"}
    assert set(config.orders) == {"random", "12", "1221", "12121221"} and len(config.seeds) >= 3
    assert config.rsa and config.report


def test_overrides_reach_nested_keys():
    data = {"out": "x", "tasks": [{"angles": [0]}], "sft": {}}
    apply_override(data, "tasks.0.angles=[15, 30]")
    apply_override(data, "sft.lora.epochs=3")
    apply_override(data, "shots=[1,2]")
    config = SweepConfig(**data)
    assert config.tasks[0].angles == (15.0, 30.0) and config.sft == {"lora": {"epochs": 3}}
    assert config.shots == (1, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("shot=[1]", r"unknown key 'shot'; allowed here: out, models, tasks"),
        ("tasks.0.angle=[1]", r"unknown key 'tasks.0.angle'; allowed here: name, angles"),
        ("sft.lora.epoch=3", r"sft.lora: epoch: Extra inputs.*allowed keys: method, lr, epochs"),
        ("sft.qlora.epochs=3", r"sft.qlora: unknown SFT method"),
        ("methods=[icl,qlora]",
         r"methods: method 'qlora' is not allowed; allowed: icl, lora, full, full-frozen-unembed"),
        ("shots=many", r"shots: .*got 'many'"),
        ("tasks.3.angles=[1]", r"'3' is not an index of a list of 1"),
        ("tasks.0.methods=[full]", r"tasks.0.methods: 'full' is not one of the sweep's methods \(icl, lora\)"),
        ("tasks=[{angles: [0, 45]}, {angles: [45], methods: [lora]}]",
         r"tasks.0 and tasks.1 both run lora on linear2d at angle 45; give each \(task, angle, method\) once"),
        ("sft_orders=[sideways]", r"sft_orders: .*order pattern .sideways. is not allowed"),
        ("noequals", r"must look like key=value"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, override, message):
    path = write_config(tmp_path / "c.yaml", {"out": str(tmp_path / "o"), "tasks": [{"angles": [0]}]})
    with pytest.raises(ValueError, match=message):
        load_config(path, [override])


def test_malformed_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("shots: [1, 2\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_impossible_grid_is_refused_before_anything_runs(tmp_path, tiny_model_dir):
    config = load_config(write_config(tmp_path / "c.yaml", every_axis(tiny_model_dir, tmp_path / "out")),
                         ["shots=[1,5001]"])
    with pytest.raises(ValueError, match="shot count 5001"):
        run_sweep(config)
    assert not (tmp_path / "out" / "sweep.json").exists()


# -- running ------------------------------------------------------------------------------------
def test_sweep_over_every_axis_then_a_rerun_computes_nothing(tmp_path, tiny_model_dir):
    config = SweepConfig(**every_axis(tiny_model_dir, tmp_path / "out"))
    tables = run_sweep(config, progress=False)
    table = tables[str(tiny_model_dir)]
    run = model_dir(config.out, str(tiny_model_dir))
    # 3 tasks x 2 orders x 2 K: ICL 12 conditions; each SFT method 12 trainings x 2 checkpoints
    assert len(table) == 12 + 3 * 24
    assert set(table.method) == {"icl", "lora", "full", "full-frozen-unembed"}
    assert set(table.task) == {"linear2d", "xor", "semantic"} and set(table.order) == {"random", "12"}
    assert table[["accuracy", "auc"]].notna().all().all()
    assert (run / "report" / "index.html").is_file()
    assert len(list(run.glob("conditions/*/rsa.npz"))) == len(table)
    assert {p.name for p in run.glob("adapters/*/")} and not plan(config)["rows"][0]["todo"]

    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*")
              if p.is_file() and "report" not in p.parts and p.name != ".lock"}  # the lock names its holder
    stamps = {p: t for p, t in stamps.items() if p.name not in ("record.json", "metrics.parquet", "metrics.json")
              or "conditions" in p.parts}
    messages: list[str] = []
    with capture(messages):
        run_sweep(config, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "a finished artifact was rewritten"
    arms = [m for m in messages if " already finished, " in m]  # each arm's first line
    assert len(arms) == 4 and all(", 0 to run" in m for m in arms), arms


def test_sigkill_mid_sweep_then_rerun_gives_the_uninterrupted_tables(tmp_path, tiny_model_dir):
    base = every_axis(tiny_model_dir, tmp_path / "killed", methods=["icl", "lora"],
                      tasks=[{"name": "linear2d", "angles": [30, 120]}], orders=["random"], shots=[1, 2, 3],
                      checkpoints=[1.0], rsa=False, report=False)
    path = write_config(tmp_path / "killed.yaml", base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "iclsft.cli", "sweep", str(path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    conditions = model_dir(base["out"], str(tiny_model_dir)) / "conditions"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        finished = [p for p in conditions.glob("*/record.json") if json.loads(p.read_text())["status"] == "ok"]
        if len(finished) >= 7:  # the 6 ICL conditions and one SFT one: kill during the SFT arm
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed; " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(list(conditions.glob("*/record.json")))
    assert 7 <= before < 12
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    clean = load_config(write_config(tmp_path / "clean.yaml", {**base, "out": str(tmp_path / "clean")}))
    run_sweep(clean, progress=False)
    killed = final_tables(Path(base["out"]), tiny_model_dir)
    pd.testing.assert_frame_equal(killed, final_tables(tmp_path / "clean", tiny_model_dir), check_exact=False,
                                  rtol=1e-9, atol=1e-12)
