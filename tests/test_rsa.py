"""RSA (SPEC §7) on the tiny random Llama with the real SmolLM2 tokenizer: the statistics against
dense references, hooked activations with prefix-KV reuse against a plain forward, the matrix of
exemplars plus test points against naive per-prompt forwards, the resumable per-condition step on
tiny ICL and SFT runs, and the report's exemplar/test and collapse-against-training figures."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch

from iclsft.arms import make_icl_spec, make_sft_spec
from iclsft.errors import ConditionsFailed
from iclsft.graph.driver import run_spec
from iclsft.prompts import PromptBuilder
from iclsft.rsa import RSA_JSON, RSA_NPZ, RSA_VERSION, compute_rsa, load_rsa, read_rsa_record, rsa_is_current
from iclsft.rsa.activations import activations
from iclsft.rsa.points import matrix_points
from iclsft.rsa.stats import (
    BINS,
    balanced_subset,
    bin_counts,
    block_means,
    collapse_index,
    cosine_histogram,
    layer_stats,
    unit_rows,
)
from iclsft.spec import ExecutorSpec, TaskSpec, TemplateSpec, sft_spec
from iclsft.store import RunDir
from iclsft.tasks import linear2d

N_LAYERS = 2  # the tiny Llama of conftest.py
TASK = TaskSpec(angle=45.0, grid_step=10)  # the task of the tiny runs
ARRAY_KEYS = {"layers", "bins", "hist_resid", "hist_mlp", "sub_resid", "sub_mlp", "sub_n1", "sub_n2", "sub_truth",
              "sub_is_exemplar", "collapse_resid", "collapse_mlp", "within_resid", "between_resid", "within_mlp",
              "between_mlp", "within_exemplar_resid", "within_test_resid", "exemplar_test_resid",
              "within_exemplar_mlp", "within_test_mlp", "exemplar_test_mlp"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _own_home(tmp_path_factory):
    """No test here may read or fill the real model cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICLSFT_HOME", str(tmp_path_factory.mktemp("iclsft-home")))
        yield


# -- statistics against dense references ------------------------------------------------------------


def dense_histogram(u: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(len(u), k=1)
    sims = np.clip(np.sum(u[i] * u[j], axis=1), -1.0, 1.0)
    return np.histogram(sims, bins=BINS)[0]


def dense_collapse(u: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    sims = u @ u.T
    off = np.flatnonzero(truth >= 0)
    same = truth[off][:, None] == truth[off][None, :]
    not_self = ~np.eye(len(off), dtype=bool)
    block = sims[np.ix_(off, off)]
    within, between = block[same & not_self].mean(), block[~same].mean()
    return within - between, within, between


def random_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    x[1] = x[0]  # cos exactly 1 (after clipping) ...
    x[2] = -x[0]  # ... and -1: the outer edges
    x[3] = 0.0
    x[3, 0] = 1.0
    x[4] = 0.0
    x[4, 1] = 2.0  # rows 3 and 4 are orthogonal: cos exactly 0, an inner edge
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("block_rows", [1, 7, 50, 157, None])
def test_blockwise_histogram_equals_dense_counts(block_rows):
    u = random_rows(157, 6, seed=1)  # 157 is prime: no block size but 1 and 157 divides it
    counts = cosine_histogram(torch.from_numpy(u), block_rows=block_rows)
    expected = dense_histogram(u)
    assert counts.dtype == np.int64 and counts.shape == (100,)
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == 157 * 156 // 2
    assert counts[-1] >= 1 and counts[0] >= 1  # the duplicated and the negated row


def test_both_counting_paths_agree_at_the_edges():
    """CPU tensors are counted by np.histogram, GPU tensors by torch.bucketize: the same bins."""
    values = torch.from_numpy(np.concatenate([BINS, BINS[1:] - 1e-12, np.random.default_rng(6).uniform(-1, 1, 999)]))
    inner = torch.from_numpy(BINS[1:-1])
    numpy_path = bin_counts(values, inner)
    torch_path = torch.bincount(torch.bucketize(values, inner, right=True), minlength=100)
    np.testing.assert_array_equal(numpy_path.numpy(), torch_path.numpy())
    assert numpy_path[0] == 1 + 1 + np.sum(values.numpy()[-999:] < BINS[1]) and numpy_path.sum() == len(values)


def test_histogram_of_identical_and_opposite_points():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    counts = cosine_histogram(u, block_rows=3)
    # pairs: (0,1) cos 1; (0,2), (1,2) cos -1; (0,3), (1,3), (2,3) cos 0 -> bin 50, which starts at BINS[50]
    assert counts[99] == 1 and counts[0] == 2 and counts[50] == 3 and counts.sum() == 6
    assert abs(BINS[50]) < 1e-15


def test_class_sum_collapse_equals_dense_pairwise_mean():
    rng = np.random.default_rng(2)
    u = random_rows(230, 12, seed=3)
    truth = rng.integers(0, 2, size=230)
    truth[rng.choice(230, 25, replace=False)] = -1  # boundary points are left out
    got = collapse_index(torch.from_numpy(u), truth)
    np.testing.assert_allclose(got, dense_collapse(u, truth), rtol=0, atol=1e-12)
    # the same in fp32 (as computed from activations): close to the fp64 truth
    got32 = collapse_index(torch.from_numpy(u).float(), truth)
    np.testing.assert_allclose(got32, dense_collapse(u, truth), rtol=0, atol=1e-5)


def test_collapse_near_zero_for_noise_and_large_for_clusters():
    rng = np.random.default_rng(4)
    truth = np.repeat([0, 1], 300)
    noise = torch.from_numpy(rng.normal(size=(600, 256)))
    collapse, within, between = collapse_index(unit_rows(noise), truth)
    assert abs(collapse) < 0.02 and abs(within) < 0.02 and abs(between) < 0.02
    means = rng.normal(size=(2, 256)) * 3.0
    clustered = torch.from_numpy(means[truth] + rng.normal(size=(600, 256)))
    collapse, within, between = collapse_index(unit_rows(clustered), truth)
    assert collapse > 0.5 and within > 0.8
    np.testing.assert_allclose(collapse, dense_collapse(unit_rows(clustered).numpy(), truth)[0], atol=1e-12)


def test_balanced_subset_is_fixed_balanced_and_sorted():
    task = TaskSpec(angle=30.0)
    truth = linear2d.queries(task).truth.to_numpy()
    subset = balanced_subset(truth)
    assert len(subset) == 400 and len(set(subset)) == 400
    np.testing.assert_array_equal(truth[subset], np.repeat([0, 1], 200))
    assert (np.diff(subset[:200]) > 0).all() and (np.diff(subset[200:]) > 0).all()
    np.testing.assert_array_equal(subset, balanced_subset(truth))  # a fixed seed: every condition gets it
    small = balanced_subset(linear2d.queries(TaskSpec(angle=45.0, grid_step=10)).truth.to_numpy())
    assert len(small) == 90  # 10 boundary points of 100; 45 per class


def brute_block_means(sims: np.ndarray, is_exemplar: np.ndarray) -> tuple[float, float, float]:
    """Mean over explicit pairs (i, j), i != j, of two exemplars, two test points, one of each."""
    pairs = {"ee": [], "tt": [], "et": []}
    for i in range(len(sims)):
        for j in range(len(sims)):
            if i == j:
                continue
            key = "ee" if is_exemplar[i] and is_exemplar[j] else "tt" if not (is_exemplar[i] or is_exemplar[j]) \
                else "et"
            pairs[key].append(float(sims[i, j]))
    return tuple(float(np.mean(v)) if v else float("nan") for v in pairs.values())


def test_block_means_equal_explicit_pairs():
    rng = np.random.default_rng(8)
    u = random_rows(23, 5, seed=9)
    sims = u @ u.T
    is_exemplar = rng.random(23) < 0.3
    got = block_means(torch.from_numpy(sims), is_exemplar)
    np.testing.assert_allclose(got, brute_block_means(sims, is_exemplar), rtol=0, atol=1e-12)
    # one exemplar: no exemplar pair (NaN), the other two still defined
    one = np.zeros(23, dtype=bool)
    one[4] = True
    got = block_means(torch.from_numpy(sims), one)
    assert np.isnan(got[0]) and np.isfinite(got[1:]).all()
    np.testing.assert_allclose(got[2], sims[4, np.arange(23) != 4].mean(), atol=1e-12)


def test_layer_stats_shapes_and_diagonal():
    rng = np.random.default_rng(5)
    acts = torch.from_numpy(rng.normal(size=(3, 56, 8))).float()  # 50 lattice rows, 6 more beyond it
    truth = np.repeat([0, 1, -1], [20, 20, 10])
    subset = np.concatenate([[50, 51, 52, 53, 54, 55], balanced_subset(truth, per_class=5)])  # 6 exemplars first
    is_exemplar = np.arange(16) < 6
    stats = layer_stats(acts, truth, subset, is_exemplar)
    assert stats["hist"].shape == (3, 100) and (stats["hist"].sum(1) == 50 * 49 // 2).all()  # the lattice only
    assert stats["sub"].shape == (3, 16, 16) and stats["sub"].dtype == np.float16
    np.testing.assert_allclose(np.diagonal(stats["sub"], axis1=1, axis2=2), 1.0, atol=1e-3)
    u = unit_rows(acts[1]).double().numpy()
    np.testing.assert_allclose(stats["sub"][1], (u @ u.T)[np.ix_(subset, subset)], atol=1e-3)
    np.testing.assert_allclose(stats["collapse"][1], dense_collapse(u[:50], truth)[0], atol=1e-5)
    want = brute_block_means((u @ u.T)[np.ix_(subset, subset)], is_exemplar)
    got = [stats[k][1] for k in ("within_exemplar", "within_test", "exemplar_test")]
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        layer_stats(acts[:, :45], truth, subset, is_exemplar)


# -- the matrix's points: exemplars plus test inputs ------------------------------------------------


def test_matrix_points_hold_the_exemplars_then_balanced_holdout_points():
    task = TaskSpec(angle=45.0, grid_step=10)
    ex = linear2d.exemplars(task, 3, 4)  # 8 exemplars from the full grid: most are off the step-10 lattice
    lattice = linear2d.queries(task, ex)
    m = matrix_points(lattice, ex)
    n_ex = 8
    assert m.is_exemplar.tolist() == [True] * n_ex + [False] * (len(m.n1) - n_ex)
    points = list(zip(m.n1.tolist(), m.n2.tolist()))
    assert set(points[:n_ex]) == set(zip(ex.n1, ex.n2))
    # exemplar rows: class 0 then class 1, each in grid order; their truth is the task's
    np.testing.assert_array_equal(m.truth[:n_ex], np.repeat([0, 1], 4))
    assert points[:4] == sorted(points[:4]) and points[4:n_ex] == sorted(points[4:n_ex])
    np.testing.assert_array_equal(m.truth, linear2d.task_truth(task, m.n1, m.n2))
    # test points: hold-out lattice points (off the boundary, no exemplar), balanced, sorted
    tests = points[n_ex:]
    on_lattice = {(a, b) for a, b in zip(lattice.n1, lattice.n2)}
    assert set(tests) <= on_lattice and not set(tests) & set(zip(ex.n1, ex.n2))
    # by hand: the 10 x 10 lattice has 45 points per class at 45°, less the exemplars that lie on it
    on_lattice_ex = ex[(ex.n1 % 10 == 0) & (ex.n2 % 10 == 0)]
    per_class = 45 - max(int((on_lattice_ex.truth == c).sum()) for c in (0, 1))
    assert per_class < (400 - n_ex) // 2
    np.testing.assert_array_equal(m.truth[n_ex:], np.repeat([0, 1], per_class))
    assert len(set(tests)) == len(tests) == 2 * per_class
    assert tests[:per_class] == sorted(tests[:per_class]) and tests[per_class:] == sorted(tests[per_class:])
    # where the activations come from: the exemplars beyond the lattice (read explicitly), tests on it
    assert list(zip(m.extra.n1, m.extra.n2)) == points[:n_ex]
    np.testing.assert_array_equal(m.source[:n_ex], len(lattice) + np.arange(n_ex))
    assert [(lattice.n1[i], lattice.n2[i]) for i in m.source[n_ex:]] == tests


def test_large_k_takes_a_fixed_label_balanced_sample_of_200_exemplars():
    task = TaskSpec(angle=30.0)
    ex = linear2d.exemplars(task, 0, 150)  # 300 exemplars
    m = matrix_points(linear2d.queries(task, ex), ex)
    assert len(m.n1) == 400 and m.is_exemplar.sum() == 200
    np.testing.assert_array_equal(m.truth, np.repeat([0, 1, 0, 1], 100))  # 100 per class of each kind
    picked = set(zip(m.n1[:200].tolist(), m.n2[:200].tolist()))
    assert len(picked) == 200 and picked <= set(zip(ex.n1, ex.n2))
    assert not picked >= set(zip(ex.n1[:20], ex.n2[:20]))  # a draw, not the first 100 of each class
    tests = set(zip(m.n1[200:].tolist(), m.n2[200:].tolist()))
    assert not tests & set(zip(ex.n1, ex.n2))  # not the sampled exemplars, nor the others
    again = matrix_points(linear2d.queries(task, ex), ex)
    np.testing.assert_array_equal(again.n1, m.n1)
    np.testing.assert_array_equal(again.n2, m.n2)  # seeded: every method at this K and seed gets it


def test_conditions_of_a_task_share_their_test_points():
    task = TaskSpec(angle=60.0)
    sets = {}
    for seed, k in ((0, 1), (1, 1), (2, 1)):
        ex = linear2d.exemplars(task, seed, k)
        m = matrix_points(linear2d.queries(task, ex), ex)
        assert len(m.n1) == 400
        sets[seed] = (set(zip(m.n1[2:].tolist(), m.n2[2:].tolist())), set(zip(ex.n1, ex.n2)))
    for a in sets:
        for b in sets:
            # the same draw: two conditions differ at most by the points their own exemplars displace
            assert len(sets[a][0] - sets[b][0]) <= len(sets[a][1]) + len(sets[b][1])
            assert not sets[a][0] & sets[a][1]


def test_grid_subset_is_the_fixed_balanced_subset_and_bad_subset_is_refused():
    task = TaskSpec(angle=30.0, grid_step=5)
    ex = linear2d.exemplars(task, 0, 2)
    lattice = linear2d.queries(task, ex)
    m = matrix_points(lattice, ex, "grid")
    sub = balanced_subset(lattice.truth.to_numpy())
    np.testing.assert_array_equal(m.source, sub)
    np.testing.assert_array_equal(m.is_exemplar, lattice.is_exemplar.to_numpy()[sub])
    assert m.extra.empty
    with pytest.raises(ValueError, match="'lattice'.*exemplars, grid"):
        matrix_points(lattice, ex, "lattice")


# -- hooked activations ---------------------------------------------------------------------------


def plain_forward(model, tokens: list[int], layers=None) -> tuple[np.ndarray, np.ndarray]:
    """Residual stream and MLP output per layer at the last token of one unbatched, uncached forward
    (`layers`: the decoder layers to hook, default model.model.layers)."""
    resid, mlp, handles = {}, {}, []
    for i, layer in enumerate(model.model.layers if layers is None else layers):
        handles.append(layer.register_forward_hook(
            lambda _m, _i, out, i=i: resid.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0, -1])))
        handles.append(layer.mlp.register_forward_hook(lambda _m, _i, out, i=i: mlp.__setitem__(i, out[0, -1])))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([tokens]))
    finally:
        for h in handles:
            h.remove()
    return (np.stack([resid[i].numpy() for i in range(len(resid))]),
            np.stack([mlp[i].numpy() for i in range(len(mlp))]))


@pytest.mark.parametrize("prefix_kind", ["icl", "bos", "empty"])
def test_hooked_activations_with_prefix_kv_match_plain_forward(tiny_model, smollm_tokenizer, prefix_kind):
    # SmolLM2's tokenizer adds no BOS by default, so a run's SFT prompts have an empty prefix
    bos = "never" if prefix_kind == "empty" else "always"
    builder = PromptBuilder(smollm_tokenizer, TemplateSpec(bos=bos), (" Baz", " Rud"))
    exemplars = linear2d.exemplars(TaskSpec(angle=45.0), 0, 5)
    prefix = builder.prefix(exemplars.n1, exemplars.n2, exemplars.truth) if prefix_kind == "icl" else builder.start()
    assert len(prefix) > 50 if prefix_kind == "icl" else len(prefix) == {"bos": 1, "empty": 0}[prefix_kind]
    points = [(0, 0), (5, 99), (99, 99), (37, 4), (10, 10), (3, 61), (88, 7)]  # 1- and 2-digit numbers: ragged
    queries = [builder.query(a, b) for a, b in points]
    assert len({len(q) for q in queries}) > 1
    resid, mlp = activations(tiny_model, prefix, queries, batch_size=3)  # 3 does not divide 7: a short batch
    assert resid.shape == mlp.shape == (N_LAYERS, len(points), tiny_model.config.hidden_size)
    for i, q in enumerate(queries):
        want_resid, want_mlp = plain_forward(tiny_model, prefix + q)
        np.testing.assert_allclose(resid[:, i].numpy(), want_resid, rtol=0, atol=1e-4)
        np.testing.assert_allclose(mlp[:, i].numpy(), want_mlp, rtol=0, atol=1e-4)
    # the large init makes a wrong position or mask visible far beyond the tolerance
    assert np.abs(resid[:, 0].numpy() - resid[:, 1].numpy()).max() > 1e-2
    assert all(not layer._forward_hooks and not layer.mlp._forward_hooks for layer in tiny_model.model.layers)


# -- the resumable step over a run directory --------------------------------------------------------


@pytest.fixture(scope="module")
def icl_run(tiny_model_dir, tmp_path_factory):
    """A tiny ICL run (angle 45, K = 1, 2, 100 queries) with RSA computed once; tests work on copies."""
    spec, ref = make_icl_spec(model=str(tiny_model_dir), angles=(45.0,), shots=(1, 2), grid_step=10)
    out = tmp_path_factory.mktemp("rsa-icl") / "run"
    run_spec(spec, out, ref, progress=False)
    t0 = time.time()
    computed = compute_rsa(out, progress=False)
    return out, computed, time.time() - t0


def copy_run(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def condition_dirs(run) -> dict[int, object]:
    return {rec["shots"]: cdir for cdir, _, rec in RunDir(run).finished()}


def mtimes(run) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(run.glob("conditions/*/rsa.*"))}


def expected_matrix(task: TaskSpec, seed: int, k: int) -> tuple[list[tuple[int, int]], int]:
    """By hand: the matrix's exemplar points (all 2K, class 0 first, each class in grid order) and its
    test points per class (the smaller class's hold-out lattice points, at most (400 - 2K) / 2)."""
    ex = linear2d.exemplars(task, seed, k)
    points = sorted(zip(ex.truth, ex.n1, ex.n2))
    lattice_n1, lattice_n2 = np.meshgrid(np.arange(0, 100, task.grid_step), np.arange(0, 100, task.grid_step))
    pts = set(zip(lattice_n1.ravel().tolist(), lattice_n2.ravel().tolist())) - set(zip(ex.n1, ex.n2))
    truth = {p: linear2d.task_truth(task, np.array([p[0]]), np.array([p[1]]))[0] for p in pts}
    per_class = min((400 - 2 * k) // 2, *(sum(t == c for t in truth.values()) for c in (0, 1)))
    return [(a, b) for _, a, b in points], per_class


def check_arrays(arrays: dict, n_points: int, n_exemplars: int, per_class: int) -> None:
    """Shapes, membership and order of the stored arrays, and the block means against explicit pairs
    of the stored matrix."""
    m = n_exemplars + 2 * per_class
    assert set(arrays) == ARRAY_KEYS
    np.testing.assert_array_equal(arrays["layers"], np.arange(N_LAYERS))
    np.testing.assert_array_equal(arrays["bins"], BINS)
    np.testing.assert_array_equal(arrays["sub_is_exemplar"], np.arange(m) < n_exemplars)
    expected = np.repeat([0, 1, 0, 1], [n_exemplars // 2] * 2 + [per_class] * 2)
    np.testing.assert_array_equal(arrays["sub_truth"], expected)
    for hook in ("resid", "mlp"):
        assert arrays[f"hist_{hook}"].shape == (N_LAYERS, 100)
        assert (arrays[f"hist_{hook}"].sum(axis=1) == n_points * (n_points - 1) // 2).all()
        assert arrays[f"sub_{hook}"].shape == (N_LAYERS, m, m)
        assert arrays[f"sub_{hook}"].dtype == np.float16
        np.testing.assert_allclose(np.diagonal(arrays[f"sub_{hook}"], axis1=1, axis2=2), 1.0, atol=1e-3)
        for stat in ("collapse", "within", "between", "within_exemplar", "within_test", "exemplar_test"):
            assert arrays[f"{stat}_{hook}"].shape == (N_LAYERS,)
            assert np.isfinite(arrays[f"{stat}_{hook}"]).all()
        np.testing.assert_allclose(arrays[f"collapse_{hook}"],
                                   arrays[f"within_{hook}"] - arrays[f"between_{hook}"], atol=1e-12)
        for layer in range(N_LAYERS):
            stored = arrays[f"sub_{hook}"][layer].astype(np.float64)
            want = brute_block_means(stored, arrays["sub_is_exemplar"])
            got = [arrays[f"{b}_{hook}"][layer] for b in ("within_exemplar", "within_test", "exemplar_test")]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)  # the stored matrix is float16
    for key in ("sub_n1", "sub_n2", "sub_truth", "sub_is_exemplar"):
        assert arrays[key].shape == (m,)


def check_matrix_points(arrays: dict, task: TaskSpec, seed: int, k: int) -> None:
    want_ex, per_class = expected_matrix(task, seed, k)
    points = list(zip(arrays["sub_n1"].tolist(), arrays["sub_n2"].tolist()))
    assert points[: 2 * k] == want_ex
    tests = points[2 * k :]
    assert len(tests) == 2 * per_class == len(set(tests))
    assert all(a % task.grid_step == 0 and b % task.grid_step == 0 for a, b in tests)  # lattice points
    assert not set(tests) & set(want_ex)  # hold-out
    np.testing.assert_array_equal(arrays["sub_truth"], linear2d.task_truth(task, arrays["sub_n1"], arrays["sub_n2"]))
    assert tests[:per_class] == sorted(tests[:per_class]) and tests[per_class:] == sorted(tests[per_class:])


def naive_matrix(model, prompts: list[list[int]], layers=None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine matrices (layers, M, M) of the residual stream and MLP output from one plain forward per
    full prompt (no cache, no batching, no hooks of the code under test)."""
    outs = [plain_forward(model, p, layers) for p in prompts]
    mats = []
    for which in (0, 1):
        acts = np.stack([o[which] for o in outs], axis=1).astype(np.float64)  # (layers, M, hidden)
        u = acts / np.linalg.norm(acts, axis=-1, keepdims=True)
        mats.append(np.einsum("lih,ljh->lij", u, u))
    return mats[0], mats[1]


def test_compute_rsa_writes_every_condition(icl_run, tiny_model, smollm_tokenizer):
    run, computed, seconds = icl_run
    dirs = condition_dirs(run)
    assert sorted(computed) == sorted(d.name for d in dirs.values())
    per_condition = ", ".join(f"K={k} {read_rsa_record(d)['seconds']:.2f} s" for k, d in sorted(dirs.items()))
    print(f"compute_rsa on 2 tiny ICL conditions (100 queries each): {seconds:.2f} s in all; {per_condition}")
    task = TaskSpec(angle=45.0, grid_step=10)
    points = linear2d.queries(task)
    truth = points.truth.to_numpy()
    builder = PromptBuilder(smollm_tokenizer, TemplateSpec(), task.labels)
    loaded = {}
    for k, cdir in dirs.items():
        info = read_rsa_record(cdir)
        assert info["status"] == "ok" and info["seconds"] >= 0 and info["dtype"] == "float32"
        assert info["rsa_subset"] == "exemplars" and info["rsa_version"] == RSA_VERSION == 2
        assert info["files"][RSA_NPZ]["bytes"] == (cdir / RSA_NPZ).stat().st_size
        loaded[k] = arrays = load_rsa(cdir)
        _, per_class = expected_matrix(task, 0, k)
        check_arrays(arrays, n_points=100, n_exemplars=2 * k, per_class=per_class)
        check_matrix_points(arrays, task, 0, k)
        assert info["subset"] == 2 * k + 2 * per_class and info["subset_exemplars"] == 2 * k
        # the lattice statistics are those of the ICL prompt at K, recomputed from the session's model
        ex = pd.read_parquet(cdir / "exemplars.parquet")
        assert len(ex) == 2 * k
        resid, mlp = activations(tiny_model, builder.prefix(ex.n1, ex.n2, ex.truth),
                                 builder.queries(points.n1, points.n2))
        for hook, acts in (("resid", resid), ("mlp", mlp)):
            np.testing.assert_allclose(arrays[f"collapse_{hook}"], layer_stats(acts, truth, [])["collapse"], atol=1e-5)
    # the test points are shared where no exemplar displaces one; the prompts (K) differ, and so do the representations
    tests = [set(zip(loaded[k]["sub_n1"][2 * k :].tolist(), loaded[k]["sub_n2"][2 * k :].tolist())) for k in (1, 2)]
    assert len(tests[0] ^ tests[1]) <= 6
    assert np.abs(loaded[1]["collapse_resid"] - loaded[2]["collapse_resid"]).max() > 1e-4


def test_matrix_rows_equal_a_plain_forward_of_each_prompt(icl_run, tiny_model, smollm_tokenizer):
    """Every row of the stored matrix, exemplar rows included, against cosines of activations taken
    from one plain HF forward of the exact prompt: the condition's K-shot prompt, then the point."""
    run, _, _ = icl_run
    cdir = condition_dirs(run)[2]
    arrays = load_rsa(cdir)
    ex = linear2d.exemplars(TaskSpec(angle=45.0, grid_step=10), 0, 2)
    off_lattice = [(a, b) for a, b in zip(ex.n1, ex.n2) if a % 10 or b % 10]
    assert off_lattice  # such exemplars can only come from reading them explicitly
    builder = PromptBuilder(smollm_tokenizer, TemplateSpec(), (" Baz", " Rud"))
    prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
    prompts = [prefix + builder.query(a, b) for a, b in zip(arrays["sub_n1"], arrays["sub_n2"])]
    want_resid, want_mlp = naive_matrix(tiny_model, prompts)
    np.testing.assert_allclose(arrays["sub_resid"].astype(np.float64), want_resid, rtol=0, atol=2e-3)
    np.testing.assert_allclose(arrays["sub_mlp"].astype(np.float64), want_mlp, rtol=0, atol=2e-3)
    # the block means are those of the naive matrix (off-diagonal pairs)
    for hook, want in (("resid", want_resid), ("mlp", want_mlp)):
        for layer in range(N_LAYERS):
            got = [arrays[f"{b}_{hook}"][layer] for b in ("within_exemplar", "within_test", "exemplar_test")]
            np.testing.assert_allclose(got, brute_block_means(want[layer], arrays["sub_is_exemplar"]), atol=1e-4)
    # a real difference: the exemplar block is not the test block
    assert abs(arrays["within_exemplar_resid"][-1] - arrays["within_test_resid"][-1]) > 1e-3


def test_rerun_computes_nothing(icl_run, tmp_path):
    run = copy_run(icl_run[0], tmp_path)
    before = mtimes(run)
    assert len(before) == 4
    assert compute_rsa(run, progress=False) == []
    assert mtimes(run) == before


def test_corrupted_or_half_written_rsa_is_recomputed(icl_run, tmp_path):
    run = copy_run(icl_run[0], tmp_path)
    dirs = condition_dirs(run)
    good = load_rsa(dirs[1])
    npz = dirs[1] / RSA_NPZ
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    npz.write_bytes(bytes(data))
    assert not rsa_is_current(dirs[1], read_rsa_record(dirs[1])["condition"])
    with pytest.raises(ValueError, match="checksum"):
        load_rsa(dirs[1])
    (dirs[2] / RSA_JSON).unlink()  # as if interrupted after rsa.npz and before rsa.json
    assert sorted(compute_rsa(run, progress=False)) == sorted([dirs[1].name, dirs[2].name])
    for key, value in load_rsa(dirs[1]).items():
        np.testing.assert_array_equal(value, good[key])
    assert compute_rsa(run, progress=False) == []


def test_older_version_and_other_subset_are_recomputed(icl_run, tmp_path):
    """rsa.npz files of RSA version 1 (grid points only) are not trusted: the version bump recomputes
    them; so is a file of the other matrix subset, and the grid subset is the fixed balanced one."""
    run = copy_run(icl_run[0], tmp_path)
    dirs = condition_dirs(run)
    info = read_rsa_record(dirs[1])
    old = {k: v for k, v in info.items() if k != "rsa_subset"}  # version 1 recorded no subset
    (dirs[1] / RSA_JSON).write_text(json.dumps({**old, "rsa_version": 1}))
    assert not rsa_is_current(dirs[1], info["condition"])
    assert compute_rsa(run, progress=False) == [dirs[1].name]
    assert read_rsa_record(dirs[1])["rsa_version"] == RSA_VERSION
    assert compute_rsa(run, progress=False) == []

    assert sorted(compute_rsa(run, subset="grid", progress=False)) == sorted(d.name for d in dirs.values())
    points = linear2d.queries(TASK)
    sub = balanced_subset(points.truth.to_numpy())
    for k, cdir in dirs.items():
        arrays = load_rsa(cdir)
        np.testing.assert_array_equal(arrays["sub_n1"], points.n1.to_numpy()[sub])
        np.testing.assert_array_equal(arrays["sub_n2"], points.n2.to_numpy()[sub])
        ex = set(zip(*(linear2d.exemplars(TASK, 0, k)[c] for c in ("n1", "n2"))))
        np.testing.assert_array_equal(arrays["sub_is_exemplar"],
                                      [(a, b) in ex for a, b in zip(arrays["sub_n1"], arrays["sub_n2"])])
        info = read_rsa_record(cdir)
        assert info["rsa_subset"] == "grid" and info["subset"] == 90
        assert rsa_is_current(cdir, info["condition"], subset="grid")
        assert not rsa_is_current(cdir, info["condition"])  # the default (exemplars) is another matrix
    with pytest.raises(ValueError, match="'all'.*exemplars, grid"):
        compute_rsa(run, subset="all", progress=False)


def test_other_dtype_is_not_trusted(icl_run, tmp_path):
    run = copy_run(icl_run[0], tmp_path)
    cdir = condition_dirs(run)[1]
    info = read_rsa_record(cdir)
    (cdir / RSA_JSON).write_text(json.dumps({**info, "dtype": "bfloat16"}))
    assert not rsa_is_current(cdir, info["condition"])
    assert compute_rsa(run, progress=False) == [cdir.name]


def test_failed_condition_is_recorded_and_others_go_on(icl_run, tmp_path):
    run = copy_run(icl_run[0], tmp_path)
    dirs = condition_dirs(run)
    for cdir in dirs.values():
        for name in (RSA_JSON, RSA_NPZ):
            (cdir / name).unlink()
    (dirs[1] / "exemplars.parquet").unlink()  # its prompt cannot be rebuilt
    with pytest.raises(ConditionsFailed, match=dirs[1].name):
        compute_rsa(run, progress=False)
    info = read_rsa_record(dirs[1])
    assert info["status"] == "error" and "exemplars.parquet" in info["error"]
    assert not (dirs[1] / RSA_NPZ).exists()
    with pytest.raises(ValueError, match="failed"):
        load_rsa(dirs[1])
    assert read_rsa_record(dirs[2])["status"] == "ok"
    check_arrays(load_rsa(dirs[2]), n_points=100, n_exemplars=4, per_class=expected_matrix(TASK, 0, 2)[1])


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        compute_rsa(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no RSA results"):
        load_rsa(tmp_path)


@pytest.fixture(scope="module")
def sft_run(icl_run, tiny_model_dir, tmp_path_factory):
    """The ICL run plus LoRA at K = 1 for seeds 0 and 1, checkpoints at 0.5 and 1 of training (the
    dynamics control), with RSA computed."""
    pytest.importorskip("peft")

    run = tmp_path_factory.mktemp("rsa-sft") / "run"
    shutil.copytree(icl_run[0], run)  # the SFT arm joins the ICL run's directory
    spec, ref = make_sft_spec(model=str(tiny_model_dir), angles=(45.0,), shots=(1,), seeds=(0, 1), grid_step=10,
                              sft=sft_spec("lora", epochs=1, min_steps=4, batch_size=2), checkpoints=(0.5, 1.0),
                              executor=ExecutorSpec(name="local"))
    run_spec(spec, run, ref, progress=False)
    before = mtimes(run)
    t0 = time.time()
    computed = compute_rsa(run, progress=False)
    print(f"compute_rsa on 4 tiny SFT conditions: {time.time() - t0:.2f} s")
    return run, computed, before


def sft_dirs(run) -> dict[tuple[int, float], object]:
    finished = RunDir(run).finished()
    return {(rec["seed"], cj["checkpoint"]): cdir for cdir, cj, rec in finished if rec["method"] == "lora"}


def test_sft_condition_uses_its_adapter(sft_run, tiny_model_dir, smollm_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, computed, before = sft_run
    dirs = sft_dirs(run)
    assert sorted(computed) == sorted(d.name for d in dirs.values()) and len(dirs) == 4
    assert {p: t for p, t in mtimes(run).items() if p in before} == before  # the ICL results stay
    cdir = dirs[(0, 1.0)]
    arrays = load_rsa(cdir)
    _, per_class = expected_matrix(TASK, 0, 1)
    check_arrays(arrays, n_points=100, n_exemplars=2, per_class=per_class)
    check_matrix_points(arrays, TASK, 0, 1)  # the same exemplars as ICL at this K and seed: its training data

    # zero-shot prompt (BOS/header + point) through the adapter: a plain forward per matrix point
    builder = PromptBuilder(smollm_tokenizer, TemplateSpec(), TASK.labels)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ckpt = run / "adapters" / RunDir(run).read_record(cdir)["checkpoint_dir"]
    tuned = PeftModel.from_pretrained(base, str(ckpt)).eval()
    prompts = [builder.start() + builder.query(a, b) for a, b in zip(arrays["sub_n1"], arrays["sub_n2"])]
    want_resid, want_mlp = naive_matrix(tuned, prompts, tuned.get_base_model().model.layers)
    np.testing.assert_allclose(arrays["sub_resid"].astype(np.float64), want_resid, rtol=0, atol=2e-3)
    np.testing.assert_allclose(arrays["sub_mlp"].astype(np.float64), want_mlp, rtol=0, atol=2e-3)
    untuned_resid, _ = naive_matrix(tuned.unload(), prompts)
    assert np.abs(untuned_resid - want_resid).max() > 1e-3  # the adapter moved the representations
    # lattice statistics through the adapter
    points = linear2d.queries(TASK)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
                                      str(ckpt)).eval()
    resid, _ = activations(tuned, builder.start(), builder.queries(points.n1, points.n2))
    stats = layer_stats(resid, points.truth.to_numpy(), [])
    np.testing.assert_allclose(arrays["collapse_resid"], stats["collapse"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["within_resid"], stats["within"], rtol=0, atol=1e-6)
    assert os.path.isfile(ckpt / "adapter_config.json")
    # the half-trained checkpoint is another model
    assert np.abs(load_rsa(dirs[(0, 0.5)])["sub_resid"].astype(np.float64) - want_resid).max() > 1e-3


def rsa_conditions(run) -> pd.DataFrame:
    """The report's view of a run's conditions with RSA (the columns the RSA figures read)."""
    rows = [{"condition": rec["condition"], "method": rec["method"], "shots": rec["shots"], "seed": rec["seed"],
             "checkpoint": cj.get("checkpoint"), "order": cj["order"], "dir": cdir}
            for cdir, cj, rec in RunDir(run).finished() if (cdir / RSA_JSON).is_file()]
    table = pd.DataFrame(rows)
    table["checkpoint"] = pd.to_numeric(table["checkpoint"]).astype(np.float64)
    return table


T_975 = {1: 12.706204736174707}  # Student t quantile 0.975 at 1 degree of freedom (tables)


def test_collapse_against_training_fraction(sft_run, tmp_path):
    from matplotlib import image as mpimg

    from iclsft.report import rsa_measures
    from iclsft.report.figures import FigureWriter

    run = sft_run[0]
    conds = rsa_conditions(run)
    problems = []
    table = rsa_measures.collapse_by_fraction(conds, problems)
    assert problems == [] and rsa_measures.dynamics_methods(conds) == ["lora"]
    # by hand: the tiny model has 2 layers, so the late half is layer 1
    dirs = sft_dirs(run)
    for ckpt in (0.5, 1.0):
        values = np.array([load_rsa(dirs[(seed, ckpt)])["collapse_resid"][1] for seed in (0, 1)])
        row = table[(table["method"] == "lora") & (table["checkpoint"] == ckpt)].iloc[0]
        half = T_975[1] * values.std(ddof=1) / np.sqrt(2)
        np.testing.assert_allclose([row["mean"], row["lo"], row["hi"]],
                                   [values.mean(), values.mean() - half, values.mean() + half], rtol=1e-9)
        assert row["n"] == 2 and row["shots"] == 1
    icl = table[table["method"] == "icl"]
    assert len(icl) == 1 and icl.iloc[0]["shots"] == 1 and icl.iloc[0]["n"] == 1  # ICL at the same K only
    assert np.isnan(icl.iloc[0]["checkpoint"]) and np.isnan(icl.iloc[0]["lo"])
    icl_dir = conds.loc[(conds["method"] == "icl") & (conds["shots"] == 1), "dir"].iloc[0]
    np.testing.assert_allclose(icl.iloc[0]["mean"], load_rsa(icl_dir)["collapse_resid"][1], rtol=1e-12)
    writer = FigureWriter(tmp_path)
    name, note = rsa_measures.draw_collapse_dynamics(writer, "dyn", "t", conds, problems)
    assert name == "fig-dyn.png" and note == "band: 95% t over seeds, n = 2; lines with one seed: no band"
    pixels = mpimg.imread(tmp_path / name)
    assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05
    # without checkpoints (only the final SFT models, or ICL alone): no figure
    final = conds[conds["checkpoint"].isna() | (conds["checkpoint"] == 1.0)]
    assert rsa_measures.dynamics_methods(final) == []
    assert rsa_measures.draw_collapse_dynamics(writer, "none", "t", final, problems) is None
    assert writer.written == ["fig-dyn.png"]


def test_exemplar_and_test_similarity_figure(sft_run, tmp_path):
    from iclsft.report import rsa_measures
    from iclsft.report.figures import FigureWriter

    run = sft_run[0]
    conds = rsa_conditions(run)
    at_k = conds[(conds["shots"] == 1) & (conds["checkpoint"].isna() | (conds["checkpoint"] == 1.0))]
    problems = []
    table = rsa_measures.block_table(at_k, problems)
    assert problems == [] and set(table["method"]) == {"icl", "lora"}
    dirs = sft_dirs(run)
    for layer in range(N_LAYERS):
        values = [load_rsa(dirs[(seed, 1.0)])["within_exemplar_resid"][layer] for seed in (0, 1)]
        row = table[(table["method"] == "lora") & (table["stream"] == "resid") & (table["measure"] == "within_exemplar")
                    & (table["layer"] == layer)].iloc[0]
        np.testing.assert_allclose(row["mean"], np.mean(values), rtol=1e-12)
        assert row["n"] == 2
    got = rsa_measures.draw_block_means(FigureWriter(tmp_path), "blocks", "t", at_k, ["icl", "lora"], problems)
    assert got is not None and (tmp_path / got[0]).is_file()
    assert got[1] == "band: 95% t over seeds, n = 2; lines with one seed: no band"


def test_report_shows_the_rsa_figures_or_says_why_not(sft_run, icl_run, tmp_path):
    from iclsft.report import build_report

    run = copy_run(sft_run[0], tmp_path / "with")
    html = build_report(run).read_text()
    for fig in ("rsa-dynamics", "rsa-blocks", "rsa-sub-resid", "rsa-collapse"):
        assert f"fig-{fig}-linear2d-a45.png" in html
    assert "t over seeds, n = 2" in html and "exemplars + hold-out test points" in html
    run = copy_run(icl_run[0], tmp_path / "without")
    html = build_report(run).read_text()
    assert "fig-rsa-dynamics" not in html
    assert "No collapse against training fraction: no SFT method has RSA at two or more checkpoints" in html


@pytest.mark.parametrize("name", ["semantic", "xor"])
def test_task_variants_use_their_own_prompts_and_truth(name, tiny_model, tiny_model_dir, smollm_tokenizer, tmp_path):
    """`semantic` writes n1 and n2 as words and `xor` has its own truth: RSA follows scoring in both."""
    from iclsft.prompts import builder_for

    spec, ref = make_icl_spec(model=str(tiny_model_dir), task=name, angles=(30.0,), shots=(2,), grid_step=10)
    run_spec(spec, tmp_path / "run", ref, progress=False)
    [cdir] = [d for d, _, _ in RunDir(tmp_path / "run").finished()]
    assert compute_rsa(tmp_path / "run", progress=False) == [cdir.name]
    arrays = load_rsa(cdir)
    task = spec.tasks[0]
    check_matrix_points(arrays, task, 0, 2)  # xor's truth orders the blocks
    builder = builder_for(smollm_tokenizer, spec.template, task)
    ex = pd.read_parquet(cdir / "exemplars.parquet")
    prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
    want_resid, _ = naive_matrix(tiny_model, [prefix + builder.query(a, b)
                                              for a, b in zip(arrays["sub_n1"], arrays["sub_n2"])])
    np.testing.assert_allclose(arrays["sub_resid"].astype(np.float64), want_resid, rtol=0, atol=2e-3)
    points = linear2d.queries(task)
    resid, _ = activations(tiny_model, prefix, builder.queries(points.n1, points.n2))
    stats = layer_stats(resid, points.truth.to_numpy(), [])
    np.testing.assert_allclose(arrays["collapse_resid"], stats["collapse"], rtol=0, atol=1e-6)
