"""Tests for the linear2d task (SPEC §2) and its matched exemplar stream (SPEC §3).

Expected values are worked out by hand from margin = -sin(θ)(n1 - 49.5) + cos(θ)(n2 - 49.5).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks.linear2d import (
    check_order,
    class_pools,
    exemplar_stream,
    exemplars,
    lattice,
    margin,
    max_shots,
    queries,
    task_truth,
    truth,
)

N1, N2 = lattice(1)


def points(table: pd.DataFrame) -> list[tuple[int, int]]:
    return list(zip(table["n1"].tolist(), table["n2"].tolist(), strict=True))


def sorted_pairs(table: pd.DataFrame) -> np.ndarray:
    """Per pair, its two points as point ids (100*n1 + n2), sorted: the pair as a set."""
    ids = (100 * table["n1"].to_numpy() + table["n2"].to_numpy()).reshape(-1, 2)
    return np.sort(ids, axis=1)


# -- truth -------------------------------------------------------------------------------------


def test_lattice_is_n1_major_full_grid():
    assert len(N1) == 10_000
    assert (N1[:3].tolist(), N2[:3].tolist()) == ([0, 0, 0], [0, 1, 2])
    assert (N1[100], N2[100]) == (1, 0)
    assert len(set(zip(N1.tolist(), N2.tolist(), strict=True))) == 10_000


def test_margin_by_hand():
    # θ = 0: normal (0, 1), margin = n2 - 49.5
    assert margin(np.array([7]), np.array([50]), 0.0)[0] == pytest.approx(0.5)
    assert margin(np.array([7]), np.array([49]), 0.0)[0] == pytest.approx(-0.5)
    # θ = 90: normal (-1, 0), margin = -(n1 - 49.5)
    assert margin(np.array([49]), np.array([0]), 90.0)[0] == pytest.approx(0.5)
    assert margin(np.array([50]), np.array([99]), 90.0)[0] == pytest.approx(-0.5)
    # θ = 45: margin = (n2 - n1) / sqrt(2)
    assert margin(np.array([10]), np.array([30]), 45.0)[0] == pytest.approx(20 / np.sqrt(2))
    # θ = 135: margin = -(n1 + n2 - 99) / sqrt(2)
    assert margin(np.array([0]), np.array([0]), 135.0)[0] == pytest.approx(99 / np.sqrt(2))


def test_truth_at_0_depends_on_n2_only():
    t = truth(N1, N2, 0.0)
    np.testing.assert_array_equal(t, np.where(N2 >= 50, 0, 1))
    assert truth(np.array([0, 99]), np.array([50, 50]), 0.0).tolist() == [0, 0]
    assert truth(np.array([0, 99]), np.array([49, 49]), 0.0).tolist() == [1, 1]


def test_truth_at_90_depends_on_n1_only():
    t = truth(N1, N2, 90.0)
    np.testing.assert_array_equal(t, np.where(N1 <= 49, 0, 1))
    assert truth(np.array([49, 49]), np.array([0, 99]), 90.0).tolist() == [0, 0]
    assert truth(np.array([50, 50]), np.array([0, 99]), 90.0).tolist() == [1, 1]


@pytest.mark.parametrize("angle", [45.0, 135.0])
def test_diagonal_angles_have_100_boundary_points(angle):
    t = truth(N1, N2, angle)
    on_line = (N1 == N2) if angle == 45.0 else (N1 + N2 == 99)
    np.testing.assert_array_equal(t == -1, on_line)
    assert (t == -1).sum() == 100
    assert (t == 0).sum() == 4950 and (t == 1).sum() == 4950
    if angle == 45.0:  # margin = (n2 - n1)/sqrt(2): above the diagonal is the first label
        np.testing.assert_array_equal(t[N2 > N1], 0)
        np.testing.assert_array_equal(t[N2 < N1], 1)
    else:  # margin = -(n1 + n2 - 99)/sqrt(2)
        np.testing.assert_array_equal(t[N1 + N2 < 99], 0)
        np.testing.assert_array_equal(t[N1 + N2 > 99], 1)


@pytest.mark.parametrize("angle", [0.0, 15.0, 30.0, 60.0, 75.0, 90.0])
def test_other_angles_have_no_ties_and_balanced_classes(angle):
    t = truth(N1, N2, angle)
    assert (t == -1).sum() == 0
    assert (t == 0).sum() == 5000 and (t == 1).sum() == 5000
    th = np.deg2rad(angle)  # the SPEC's margin, written out here (not the module's `margin`)
    m = -np.sin(th) * (N1 - 49.5) + np.cos(th) * (N2 - 49.5)
    np.testing.assert_array_equal(t, np.where(m > 0, 0, 1))


@pytest.mark.parametrize("angle", [0.0, 30.0, 45.0, 135.0])
def test_swap_labels_flips_classes_and_keeps_boundary(angle):
    t = truth(N1, N2, angle)
    s = truth(N1, N2, angle, swap_labels=True)
    np.testing.assert_array_equal(s[t == 0], 1)
    np.testing.assert_array_equal(s[t == 1], 0)
    np.testing.assert_array_equal(s == -1, t == -1)


def test_class_pools_and_max_shots():
    p0, p1 = class_pools(TaskSpec(angle=0))
    assert len(p0) == len(p1) == 5000
    assert (p0[:, 1] >= 50).all() and (p1[:, 1] <= 49).all()
    assert max_shots(TaskSpec(angle=0)) == 5000
    assert max_shots(TaskSpec(angle=45)) == 4950
    q0, q1 = class_pools(TaskSpec(angle=0, swap_labels=True))
    np.testing.assert_array_equal(q0, p1)
    np.testing.assert_array_equal(q1, p0)


# -- exemplar stream ---------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [30.0, 45.0])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_stream_class_balance_at_every_k(angle, seed):
    task = TaskSpec(angle=angle)
    stream = exemplar_stream(task, seed)
    n_pairs = max_shots(task)
    assert len(stream) == 2 * n_pairs
    np.testing.assert_array_equal(stream["pair"].to_numpy(), np.repeat(np.arange(n_pairs), 2))
    # each pair holds one exemplar of each class, so the first 2K rows hold exactly K of each
    per_pair = stream["truth"].to_numpy().reshape(-1, 2)
    np.testing.assert_array_equal(np.sort(per_pair, axis=1), np.tile([0, 1], (n_pairs, 1)))
    ones = np.cumsum(stream["truth"].to_numpy())
    k = np.arange(1, n_pairs + 1)
    np.testing.assert_array_equal(ones[2 * k - 1], k)
    for shots in (1, 2, 5, 40, n_pairs):
        ex = exemplars(task, seed, shots)
        assert len(ex) == 2 * shots
        assert (ex["truth"] == 0).sum() == shots and (ex["truth"] == 1).sum() == shots


@pytest.mark.parametrize("angle", [0.0, 45.0, 135.0, 75.0])
def test_stream_truth_is_the_geometry_and_no_point_repeats(angle):
    task = TaskSpec(angle=angle)
    stream = exemplar_stream(task, 3)
    pts = points(stream)
    assert len(set(pts)) == len(pts)
    t = truth(stream["n1"].to_numpy(), stream["n2"].to_numpy(), angle)
    np.testing.assert_array_equal(stream["truth"].to_numpy(), t)
    assert (t >= 0).all()  # no boundary point is ever sampled
    if angle in (45.0, 135.0):
        assert len(pts) == 9900  # every off-boundary point, none of the 100 on the line
        on_line = (stream.n1 == stream.n2) if angle == 45.0 else (stream.n1 + stream.n2 == 99)
        assert not on_line.any()


def test_stream_with_swapped_labels_uses_swapped_truth():
    task = TaskSpec(angle=0, swap_labels=True)
    stream = exemplar_stream(task, 0)
    # swapped: class 0 is now n2 <= 49
    np.testing.assert_array_equal(stream["truth"].to_numpy(), np.where(stream["n2"] <= 49, 0, 1))


@pytest.mark.parametrize("seed", [0, 5])
def test_prefix_property(seed):
    task = TaskSpec(angle=60)
    big = exemplars(task, seed, 50)
    for shots in (1, 3, 10, 49):
        small = exemplars(task, seed, shots)
        pd.testing.assert_frame_equal(small, big.iloc[: 2 * shots].reset_index(drop=True))


def test_stream_is_deterministic_per_seed():
    task = TaskSpec(angle=30)
    pd.testing.assert_frame_equal(exemplar_stream(task, 11), exemplar_stream(task, 11))
    a, b = exemplars(task, 11, 20), exemplars(task, 12, 20)
    assert points(a) != points(b)
    # not only the order: the points drawn differ
    assert set(points(a)) != set(points(b))


@pytest.mark.parametrize("pattern", ["12", "1221", "12121221", "21", "2112"])
@pytest.mark.parametrize("seed", [0, 4])
def test_order_probes_follow_the_pattern(pattern, seed):
    task = TaskSpec(angle=30)
    probe = exemplar_stream(task, seed, pattern)
    random = exemplar_stream(task, seed)
    labels = "".join(str(t + 1) for t in probe["truth"].tolist())  # 1 = first label = truth 0
    expected = (pattern * (len(labels) // len(pattern) + 1))[: len(labels)]
    assert labels == expected
    # same pairs of points as the random order: only the order within each pair changes
    assert len(probe) == len(random)
    np.testing.assert_array_equal(probe["pair"].to_numpy(), random["pair"].to_numpy())
    np.testing.assert_array_equal(sorted_pairs(probe), sorted_pairs(random))
    # the random order really is random within pairs (so the probe is a different prompt)
    assert "".join(str(t + 1) for t in random["truth"].tolist()) != labels
    ex = exemplars(task, seed, 4, pattern)
    assert "".join(str(t + 1) for t in ex["truth"].tolist()) == expected[:8]


@pytest.mark.parametrize("pattern", ["", "1", "121", "1122", "abc", "2211", "12 ", "Random"])
def test_invalid_order_patterns(pattern):
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        check_order(pattern)
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        exemplars(TaskSpec(angle=30), 0, 2, pattern)


def test_random_order_name_is_accepted():
    assert check_order("random") == "random"


@pytest.mark.parametrize(("angle", "limit"), [(45.0, 4950), (0.0, 5000), (135.0, 4950)])
def test_shot_count_range(angle, limit):
    task = TaskSpec(angle=angle)
    ex = exemplars(task, 0, limit)  # the whole pool is allowed
    assert len(ex) == 2 * limit
    with pytest.raises(ValueError, match=rf"1\.\.{limit}"):
        exemplars(task, 0, limit + 1)
    with pytest.raises(ValueError, match=rf"shot count 0 .*1\.\.{limit}"):
        exemplars(task, 0, 0)
    with pytest.raises(ValueError, match=r"shot count -1"):
        exemplars(task, 0, -1)


# -- queries and hold-out -----------------------------------------------------------------------


@pytest.mark.parametrize(("step", "size"), [(1, 10_000), (5, 400), (10, 100)])
def test_query_lattice_size(step, size):
    table = queries(TaskSpec(angle=30, grid_step=step))
    assert len(table) == size
    assert set(table["n1"]) == set(range(0, 100, step))
    assert set(table["n2"]) == set(range(0, 100, step))
    assert not table["is_exemplar"].any()
    np.testing.assert_array_equal(table["truth"].to_numpy(), truth(table.n1.to_numpy(), table.n2.to_numpy(), 30))


@pytest.mark.parametrize("step", [1, 5, 10])
@pytest.mark.parametrize("angle", [45.0, 30.0])
def test_is_exemplar_and_holdout(step, angle):
    task = TaskSpec(angle=angle, grid_step=step)
    ex = exemplars(task, 2, 300)
    table = queries(task, ex)
    used = set(points(ex))
    on_lattice = {(a, b) for a, b in used if a % step == 0 and b % step == 0}
    flagged = set(points(table[table["is_exemplar"]]))
    assert flagged == on_lattice
    if step == 1:
        assert len(flagged) == 600
    holdout = table[~table["is_exemplar"] & (table["truth"] >= 0)]
    assert not set(points(holdout)) & used
    n_boundary = 100 // step if angle == 45.0 else 0
    assert (table["truth"] == -1).sum() == n_boundary
    assert len(holdout) == len(table) - len(on_lattice) - n_boundary


def test_grid_step_does_not_change_exemplars():
    fine, coarse = TaskSpec(angle=30, grid_step=1), TaskSpec(angle=30, grid_step=5)
    a, b = exemplars(fine, 3, 100), exemplars(coarse, 3, 100)
    pd.testing.assert_frame_equal(a, b)
    # exemplars are drawn from the full grid, not only from the coarse lattice
    assert ((b["n1"] % 5 != 0) | (b["n2"] % 5 != 0)).any()


# -- TaskSpec validation ------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [-1, 180, 200, 180.0001])
def test_angle_out_of_range(angle):
    with pytest.raises(ValueError, match=r"\[0, 180\)") as info:
        TaskSpec(angle=angle)
    assert f"angle {float(angle)}" in str(info.value)


@pytest.mark.parametrize("angle", [0, 0.0, 179.5, 45])
def test_angle_in_range(angle):
    assert TaskSpec(angle=angle).angle == float(angle)


@pytest.mark.parametrize("step", [3, 0, -5, 7])
def test_bad_grid_step(step):
    with pytest.raises(ValueError, match=rf"grid_step {step}\b"):
        TaskSpec(angle=30, grid_step=step)


@pytest.mark.parametrize("labels", [(" Baz", " Baz"), ("", " Rud")])
def test_bad_labels(labels):
    with pytest.raises(ValueError, match="labels"):
        TaskSpec(angle=30, labels=labels)


# -- variants: xor and semantic (SPEC §2) ---------------------------------------------------------
@pytest.mark.parametrize("angle", [0.0, 30.0, 45.0, 90.0, 135.0])
def test_xor_is_the_product_of_the_two_margins(angle):
    """First label exactly where the margins at angle and angle+90 have the same sign."""
    n1, n2 = lattice(1)
    c = 49.5
    t1, t2 = np.deg2rad(angle), np.deg2rad(angle + 90)
    m1 = -np.sin(t1) * (n1 - c) + np.cos(t1) * (n2 - c)
    m2 = -np.sin(t2) * (n1 - c) + np.cos(t2) * (n2 - c)
    task = TaskSpec(name="xor", angle=angle)
    got = task_truth(task, n1, n2)
    off = (np.abs(m1) > 1e-9) & (np.abs(m2) > 1e-9)
    np.testing.assert_array_equal(got[off], np.where(m1[off] * m2[off] > 0, 0, 1))
    assert (got[~off] == -1).all()
    swapped = task_truth(TaskSpec(name="xor", angle=angle, swap_labels=True), n1, n2)
    np.testing.assert_array_equal(swapped[off], 1 - got[off])


def test_xor_quadrants_at_zero_degrees():
    task = TaskSpec(name="xor", angle=0.0)
    corners = {(0, 0): 1, (99, 0): 0, (0, 99): 0, (99, 99): 1}
    got = task_truth(task, np.array([p[0] for p in corners]), np.array([p[1] for p in corners]))
    assert got.tolist() == list(corners.values())
    t = queries(task)["truth"]
    assert (t == 0).sum() == (t == 1).sum() == 5000  # four 50x50 quadrants, no ties
    t45 = queries(TaskSpec(name="xor", angle=45.0))["truth"]
    assert (t45 == -1).sum() == 200  # both diagonals, which share no lattice point


def test_xor_exemplars_come_from_xor_classes():
    task = TaskSpec(name="xor", angle=30.0)
    ex = exemplars(task, 3, 50)
    np.testing.assert_array_equal(task_truth(task, ex.n1.values, ex.n2.values), ex.truth.values)
    assert (ex.truth == 0).sum() == (ex.truth == 1).sum() == 50


def test_semantic_shares_the_geometry_and_writes_words(smollm_tokenizer):
    """The default list is the study's: adjectives by sentiment intensity, negative -> positive."""
    from iclsft.prompts import builder_for
    from iclsft.tasks.linear2d import values
    from iclsft.tasks.semantic import adjectives

    words = adjectives()
    assert len(words) == len(set(words)) == 100 and all(w.isalpha() and w.islower() for w in words)
    assert words[0] == "horrific" and words[-1] == "glorious"
    # pairs whose order any reader agrees on, written down by hand (not read from the list)
    for lower, higher in [("horrific", "bad"), ("bad", "okay"), ("okay", "good"), ("good", "great"),
                          ("disgusting", "annoying"), ("annoying", "fine"), ("fine", "nice"), ("nice", "excellent"),
                          ("terrible", "boring"), ("adequate", "superb")]:
        assert words.index(lower) < words.index(higher), (lower, higher)
    sem, lin = TaskSpec(name="semantic", angle=60.0), TaskSpec(angle=60.0)
    assert sem.words == "sentiment" and lin.words is None
    pd.testing.assert_frame_equal(queries(sem), queries(lin))
    pd.testing.assert_frame_equal(exemplars(sem, 0, 5), exemplars(lin, 0, 5))
    assert values(lin) is None and values(sem) == words
    builder = builder_for(smollm_tokenizer, TemplateSpec(), sem)
    assert builder.text(builder.query(0, 99)) == "horrific glorious ->"
    assert builder.text(builder.exemplar(20, 4, 1)) == "poor vile -> Rud\n"


def test_sentiment_list_is_sorted_by_its_recorded_ratings():
    """The shipped file's second column (the VADER mean rating) never decreases down the list, and
    words of equal rating stand in alphabetical order: the order the file header states."""
    from importlib import resources

    text = resources.files("iclsft.tasks").joinpath("adjectives_sentiment.txt").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    keys = [(float(rating), word) for word, rating in rows]
    assert len(keys) == 100 and keys == sorted(keys)
    assert keys[0][0] < -3 and keys[-1][0] > 3  # the whole range, strongly negative to strongly positive


def test_size_words_reproduce_the_old_prompts(smollm_tokenizer):
    """words=size writes exactly the prompts the semantic task wrote before sentiment became the default
    (strings recorded from that version)."""
    from iclsft.prompts import builder_for
    from iclsft.tasks.linear2d import values
    from iclsft.tasks.semantic import adjectives

    size = TaskSpec(name="semantic", angle=60.0, words="size")
    assert values(size) == adjectives("size") and adjectives("size")[0] == "infinitesimal"
    assert adjectives("size")[-1] == "infinite"
    builder = builder_for(smollm_tokenizer, TemplateSpec(), size)
    assert builder.text(builder.query(0, 99)) == "infinitesimal infinite ->"
    assert builder.text(builder.exemplar(20, 4, 1)) == "small tiny -> Rud\n"


def _condition(**task):
    from iclsft.spec import Condition, ModelSpec

    return Condition(task=TaskSpec(**task), template=TemplateSpec(), model=ModelSpec(name="m", fingerprint="f"),
                     method="icl", shots=5, seed=0, order="random", dtype="float32")


def test_word_list_enters_the_condition_id():
    ids = {_condition(name="semantic", angle=30.0, words=w).id for w in ("sentiment", "size")}
    assert len(ids) == 2
    assert _condition(name="semantic", angle=30.0).id == _condition(name="semantic", angle=30.0, words="sentiment").id
    assert _condition(angle=30.0).model_dump(mode="json")["task"]["words"] is None


def test_a_semantic_run_from_before_word_lists_migrates_to_the_size_list(tmp_path):
    """A run directory of v1 frozen before `words` existed (its semantic arm written with the size list, the
    field left out): `migrate` reads it as the size list, not today's default, and the run's linear2d
    condition gets no words."""
    import json

    from iclsft.migrate import migrate
    from iclsft.spec import IclRunSpec, ModelSpec

    tasks = (TaskSpec(angle=30.0), TaskSpec(name="semantic", angle=30.0, words="size"))
    spec = IclRunSpec(tasks=tasks, model=ModelSpec(name="m", fingerprint="f"), shots=(1,))
    old = spec.model_dump(mode="json") | {"hash_version": "v1"}
    for t in old["tasks"]:
        t.pop("words")  # as the earlier version stored it
    old["template"].pop("chat")
    (tmp_path / "spec.json").write_text(json.dumps({"arms": {"icl": old}}))
    for i, cond in enumerate(spec.conditions()):
        stored = cond.model_dump(mode="json")
        stored["task"].pop("words")
        stored["template"].pop("chat")
        cdir = tmp_path / "conditions" / f"old-{i}"
        cdir.mkdir(parents=True)
        (cdir / "condition.json").write_text(json.dumps({"id": f"v1-{i:016x}", **stored}))
        (cdir / "record.json").write_text(json.dumps({"status": "ok", "condition": f"v1-{i:016x}"}))
    migrate(tmp_path)
    want = {c.dirname: c.id for c in spec.conditions()}
    found = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("conditions/*/condition.json")}
    assert {d: c["id"] for d, c in found.items()} == want
    assert sorted(str(c["task"]["words"]) for c in found.values()) == ["None", "size"]
    arm = json.loads((tmp_path / "spec.json").read_text())["arms"]["icl"]
    assert [t["words"] for t in arm["tasks"]] == [None, "size"] and arm["hash_version"] == "v3"


def test_bad_word_lists_are_named():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="words 'colour' is not allowed: choose one of sentiment, size"):
        TaskSpec(name="semantic", angle=45.0, words="colour")
    with pytest.raises(ValidationError,
                       match=r"words 'size' applies to tasks that write words \(semantic\), not 'linear2d'"):
        TaskSpec(angle=45.0, words="size")
    from iclsft.tasks.semantic import adjectives

    with pytest.raises(ValueError, match="word list 'colour' is not allowed"):
        adjectives("colour")


def test_sweep_task_key_and_cli_option_choose_the_list(tmp_path, tiny_model_dir, monkeypatch):
    from click.testing import CliRunner

    from iclsft.cli import main
    from iclsft.runspec import make_spec
    from iclsft.spec import IclRunSpec
    from iclsft.sweep import load_config

    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    config = tmp_path / "c.yaml"
    config.write_text(f"out: {tmp_path / 'o'}\ntasks: [{{name: semantic, angles: [45], words: size}}]\n")
    assert load_config(config).tasks[0].words == "size"
    with pytest.raises(ValueError, match="words"):
        load_config(config, ["tasks.0.words=colour"])
    spec, _ = make_spec(IclRunSpec, model=str(tiny_model_dir), task="semantic", words="size", shots=(1,))
    assert [t.words for t in spec.tasks] == ["size"]
    result = CliRunner().invoke(main, ["icl", "--help"])
    assert "--words [sentiment|size]" in result.output


def test_stored_semantic_task_without_words_is_the_size_list():
    """A run directory written before `words` existed stored semantic tasks without it: they used the
    size list, and readers of stored specs (serve, claims) must render those words, not the new default."""
    from iclsft.spec import TaskSpec, stored_task

    old = stored_task({"name": "semantic", "angle": 45.0})
    assert old.words == "size"
    assert stored_task({"name": "semantic", "angle": 45.0, "words": "sentiment"}).words == "sentiment"
    assert TaskSpec(name="semantic", angle=45.0).words == "sentiment"
    assert stored_task({"name": "linear2d", "angle": 30.0}) == TaskSpec(angle=30.0)
