"""The task registry: every task of both studies is registered in one place, and a new task is one
module plus its tests. Here a task that exists only in this file (`ring`: inside or outside a circle
around the grid's centre) runs through spec validation, the exemplar stream, the ICL and SFT arms,
metrics, compare and the report, with no other file of the package touched."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from iclsft.arms import make_icl_spec, make_sft_spec
from iclsft.evaluate.runs import compare_linear2d
from iclsft.graph.driver import run_spec
from iclsft.spec import ExecutorSpec, TaskSpec, sft_spec
from iclsft.tasks import linear2d, registry

RADIUS = 30.0


def ring_truth(n1: np.ndarray, n2: np.ndarray, angle: float) -> np.ndarray:
    """First label inside the circle of radius 30 around (49.5, 49.5); the angle plays no part."""
    return np.where((n1 - 49.5) ** 2 + (n2 - 49.5) ** 2 < RADIUS**2, 0, 1).astype(np.int8)


@pytest.fixture()
def ring():
    task = registry.register(registry.GridTask(name="ring", truth=ring_truth, boundary_angle=False))
    yield task
    registry.unregister("ring")


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))


def test_built_in_tasks_are_registered_with_their_study_and_evaluation():
    assert registry.names("linear2d") == ("linear2d", "xor", "semantic")
    assert registry.names("implicit") == ("expression", "relation", "boolean", "code")
    assert {registry.get(n).evaluation for n in registry.names("linear2d")} == {"labels"}
    assert registry.get("code").evaluation == "generate"  # open answers: greedy generation
    assert registry.get("boolean").evaluation == "labels"
    assert registry.get("semantic").default_words == "sentiment"
    assert registry.get("xor").boundary_angle is False and registry.get("linear2d").boundary_angle is True


def test_unknown_tasks_and_clashing_names_are_refused_in_one_line(ring):
    with pytest.raises(ValueError, match=r"unknown linear2d task 'circle'; allowed: linear2d, xor, semantic, ring"):
        registry.get("circle", "linear2d")
    with pytest.raises(ValueError, match="unknown implicit task 'ring'"):
        registry.get("ring", "implicit")
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.GridTask(name="ring", truth=ring_truth, boundary_angle=False))
    with pytest.raises(ValueError, match="applies to tasks that write words"):
        TaskSpec(name="ring", angle=0, words="size")


def test_a_registered_task_gets_its_labels_and_a_balanced_stream(ring):
    task = TaskSpec(name="ring", angle=0)
    n1, n2 = linear2d.lattice(1)
    inside = (n1 - 49.5) ** 2 + (n2 - 49.5) ** 2 < 900  # independent of the task's own function
    assert (linear2d.task_truth(task, n1, n2) == np.where(inside, 0, 1)).all()
    swapped = TaskSpec(name="ring", angle=0, swap_labels=True)
    assert (linear2d.task_truth(swapped, n1, n2) == np.where(inside, 1, 0)).all()
    stream = linear2d.exemplar_stream(task, seed=3)
    assert len(stream) == 2 * min(inside.sum(), (~inside).sum())
    first = stream[stream.pair < 5]
    assert (first.truth.value_counts() == 5).all()  # one exemplar of each class per pair
    got = ((first.n1 - 49.5) ** 2 + (first.n2 - 49.5) ** 2 < 900).map({True: 0, False: 1})
    assert (got.to_numpy() == first.truth.to_numpy()).all()


def test_icl_and_sft_arms_run_a_task_registered_only_here(ring, home, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    common = dict(model=str(tiny_model_dir), task="ring", angles=(0,), shots=(1, 2), grid_step=10)
    spec, ref = make_icl_spec(**common)
    icl = run_spec(spec, out, ref, progress=False)
    spec, ref = make_sft_spec(**common, sft=sft_spec("lora", epochs=1, min_steps=2),
                              executor=ExecutorSpec(name="local"))
    table = run_spec(spec, out, ref, progress=False)
    assert len(icl) == 2 and len(table) == 4 and set(table.method) == {"icl", "lora"}
    assert set(table.task) == {"ring"}
    assert table.angle_error.isna().all()  # no boundary angle: angle metrics are NaN, not a number
    scores = pd.read_parquet(next(out.glob("conditions/ring-a0-icl-K2-*/scores.parquet")))
    inside = (scores.n1 - 49.5) ** 2 + (scores.n2 - 49.5) ** 2 < 900
    assert (scores.truth.to_numpy() == np.where(inside, 0, 1)).all()
    acc = (np.where(scores.lp_0 >= scores.lp_1, 0, 1) == scores.truth.to_numpy()).mean()  # ties: first label
    row = table[(table.method == "icl") & (table.shots == 2)].iloc[0]
    assert row.accuracy == pytest.approx(acc)  # accuracy from the stored scores by hand
    wide = compare_linear2d(table, ["accuracy"])
    assert list(wide.columns.get_level_values(1)) == ["icl", "lora"]
