"""RSA (SPEC §7) on the tiny random Llama with the real SmolLM2 tokenizer: the statistics against
dense references, hooked activations with prefix-KV reuse against a plain forward, and the
resumable per-condition step on tiny ICL and SFT runs."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch

from iclsft.icl import ConditionsFailed, make_icl_spec, run_icl
from iclsft.prompts import PromptBuilder
from iclsft.rsa import RSA_JSON, RSA_NPZ, compute_rsa, load_rsa, read_rsa_record, rsa_is_current
from iclsft.rsa.activations import activations
from iclsft.rsa.stats import BINS, balanced_subset, bin_counts, collapse_index, cosine_histogram, layer_stats, unit_rows
from iclsft.spec import ExecutorSpec, TaskSpec, TemplateSpec, sft_spec
from iclsft.store import RunDir
from iclsft.tasks import linear2d

N_LAYERS = 2  # the tiny Llama of conftest.py
ARRAY_KEYS = {"layers", "bins", "hist_resid", "hist_mlp", "sub_resid", "sub_mlp", "sub_n1", "sub_n2", "sub_truth",
              "collapse_resid", "collapse_mlp", "within_resid", "between_resid", "within_mlp", "between_mlp"}


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


def test_layer_stats_shapes_and_diagonal():
    rng = np.random.default_rng(5)
    acts = torch.from_numpy(rng.normal(size=(3, 50, 8))).float()
    truth = np.repeat([0, 1, -1], [20, 20, 10])
    subset = balanced_subset(truth, per_class=5)
    stats = layer_stats(acts, truth, subset)
    assert stats["hist"].shape == (3, 100) and (stats["hist"].sum(1) == 50 * 49 // 2).all()
    assert stats["sub"].shape == (3, 10, 10) and stats["sub"].dtype == np.float16
    np.testing.assert_allclose(np.diagonal(stats["sub"], axis1=1, axis2=2), 1.0, atol=1e-3)
    u = unit_rows(acts[1]).double().numpy()
    np.testing.assert_allclose(stats["sub"][1], (u @ u.T)[np.ix_(subset, subset)], atol=1e-3)
    np.testing.assert_allclose(stats["collapse"][1], dense_collapse(u, truth)[0], atol=1e-5)


# -- hooked activations ---------------------------------------------------------------------------


def plain_forward(model, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Residual stream and MLP output per layer at the last token of one unbatched, uncached forward."""
    resid, mlp, handles = {}, {}, []
    for i, layer in enumerate(model.model.layers):
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
    run_icl(spec, out, ref, progress=False)
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


def check_arrays(arrays: dict, n_points: int, subset: int) -> None:
    assert set(arrays) == ARRAY_KEYS
    np.testing.assert_array_equal(arrays["layers"], np.arange(N_LAYERS))
    np.testing.assert_array_equal(arrays["bins"], BINS)
    for hook in ("resid", "mlp"):
        assert arrays[f"hist_{hook}"].shape == (N_LAYERS, 100)
        assert (arrays[f"hist_{hook}"].sum(axis=1) == n_points * (n_points - 1) // 2).all()
        assert arrays[f"sub_{hook}"].shape == (N_LAYERS, subset, subset)
        assert arrays[f"sub_{hook}"].dtype == np.float16
        np.testing.assert_allclose(np.diagonal(arrays[f"sub_{hook}"], axis1=1, axis2=2), 1.0, atol=1e-3)
        for stat in ("collapse", "within", "between"):
            assert arrays[f"{stat}_{hook}"].shape == (N_LAYERS,)
            assert np.isfinite(arrays[f"{stat}_{hook}"]).all()
        np.testing.assert_allclose(arrays[f"collapse_{hook}"],
                                   arrays[f"within_{hook}"] - arrays[f"between_{hook}"], atol=1e-12)
    for key in ("sub_n1", "sub_n2", "sub_truth"):
        assert arrays[key].shape == (subset,)
    np.testing.assert_array_equal(arrays["sub_truth"], np.repeat([0, 1], subset // 2))


def test_compute_rsa_writes_every_condition(icl_run, tiny_model, smollm_tokenizer):
    run, computed, seconds = icl_run
    dirs = condition_dirs(run)
    assert sorted(computed) == sorted(d.name for d in dirs.values())
    per_condition = ", ".join(f"K={k} {read_rsa_record(d)['seconds']:.2f} s" for k, d in sorted(dirs.items()))
    print(f"compute_rsa on 2 tiny ICL conditions (100 queries each): {seconds:.2f} s in all; {per_condition}")
    task = TaskSpec(angle=45.0, grid_step=10)
    points = linear2d.queries(task)
    loaded = {}
    for k, cdir in dirs.items():
        info = read_rsa_record(cdir)
        assert info["status"] == "ok" and info["seconds"] >= 0 and info["dtype"] == "float32"
        assert info["files"][RSA_NPZ]["bytes"] == (cdir / RSA_NPZ).stat().st_size
        loaded[k] = arrays = load_rsa(cdir)
        check_arrays(arrays, n_points=100, subset=90)
        truth = points.truth.to_numpy()
        sub = balanced_subset(truth)
        np.testing.assert_array_equal(arrays["sub_n1"], points.n1.to_numpy()[sub])
        np.testing.assert_array_equal(arrays["sub_n2"], points.n2.to_numpy()[sub])
        # the stored statistics are those of the ICL prompt at K, recomputed here from the session's model
        builder = PromptBuilder(smollm_tokenizer, TemplateSpec(), task.labels)
        ex = pd.read_parquet(cdir / "exemplars.parquet")
        assert len(ex) == 2 * k
        prefix = builder.prefix(ex.n1, ex.n2, ex.truth)
        resid, mlp = activations(tiny_model, prefix, builder.queries(points.n1, points.n2))
        for hook, acts in (("resid", resid), ("mlp", mlp)):
            stats = layer_stats(acts, truth, sub)
            np.testing.assert_allclose(arrays[f"collapse_{hook}"], stats["collapse"], atol=1e-5)
            np.testing.assert_allclose(arrays[f"sub_{hook}"].astype(np.float32), stats["sub"].astype(np.float32),
                                       atol=2e-3)
    # the subset is shared; the prompts (K) differ, and so do the representations
    np.testing.assert_array_equal(loaded[1]["sub_n1"], loaded[2]["sub_n1"])
    assert np.abs(loaded[1]["collapse_resid"] - loaded[2]["collapse_resid"]).max() > 1e-4


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
    check_arrays(load_rsa(dirs[2]), n_points=100, subset=90)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        compute_rsa(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no RSA results"):
        load_rsa(tmp_path)


def test_sft_condition_uses_its_adapter(icl_run, tmp_path, tiny_model_dir, smollm_tokenizer):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from iclsft.sft.runner import make_sft_spec, run_sft

    run = copy_run(icl_run[0], tmp_path)  # the SFT arm joins the ICL run's directory
    spec, ref = make_sft_spec(model=str(tiny_model_dir), angles=(45.0,), shots=(1,), grid_step=10,
                              sft=sft_spec("lora", epochs=1, min_steps=2, batch_size=2),
                              executor=ExecutorSpec(name="local"))
    run_sft(spec, run, ref, progress=False)
    before = mtimes(run)
    t0 = time.time()
    computed = compute_rsa(run, progress=False)
    print(f"compute_rsa on 1 tiny SFT condition: {time.time() - t0:.2f} s")
    sft_dirs = [cdir for cdir, _, rec in RunDir(run).finished() if rec["method"] == "lora"]
    assert computed == [sft_dirs[0].name]
    assert {p: t for p, t in mtimes(run).items() if p in before} == before  # the ICL results stay
    cdir = sft_dirs[0]
    arrays = load_rsa(cdir)
    check_arrays(arrays, n_points=100, subset=90)

    # zero-shot prompt (BOS + query) through the adapter, and through the base model alone
    task = TaskSpec(angle=45.0, grid_step=10)
    points = linear2d.queries(task)
    truth = points.truth.to_numpy()
    builder = PromptBuilder(smollm_tokenizer, TemplateSpec(), task.labels)
    queries = builder.queries(points.n1, points.n2)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_resid, _ = activations(base, builder.start(), queries)
    ckpt = run / "adapters" / RunDir(run).read_record(cdir)["checkpoint_dir"]
    tuned_resid, _ = activations(PeftModel.from_pretrained(base, str(ckpt)).eval(), builder.start(), queries)
    assert (tuned_resid - base_resid).abs().max() > 1e-4  # the adapter moved the activations
    tuned = layer_stats(tuned_resid, truth, balanced_subset(truth))
    untuned = layer_stats(base_resid, truth, balanced_subset(truth))
    np.testing.assert_allclose(arrays["collapse_resid"], tuned["collapse"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["within_resid"], tuned["within"], rtol=0, atol=1e-6)
    assert np.abs(arrays["within_resid"] - untuned["within"]).max() > 1e-5
    assert os.path.isfile(ckpt / "adapter_config.json")


@pytest.mark.parametrize("name", ["semantic", "xor"])
def test_task_variants_use_their_own_prompts_and_truth(name, tiny_model, tiny_model_dir, smollm_tokenizer, tmp_path):
    """`semantic` writes n1 and n2 as words and `xor` has its own truth: RSA follows scoring in both."""
    from iclsft.prompts import builder_for

    spec, ref = make_icl_spec(model=str(tiny_model_dir), task=name, angles=(30.0,), shots=(2,), grid_step=10)
    run_icl(spec, tmp_path / "run", ref, progress=False)
    [cdir] = [d for d, _, _ in RunDir(tmp_path / "run").finished()]
    assert compute_rsa(tmp_path / "run", progress=False) == [cdir.name]
    arrays = load_rsa(cdir)
    task = spec.tasks[0]
    points = linear2d.queries(task)
    truth = points.truth.to_numpy()
    sub = balanced_subset(truth)
    np.testing.assert_array_equal(arrays["sub_truth"], truth[sub])
    np.testing.assert_array_equal(arrays["sub_n1"], points.n1.to_numpy()[sub])
    builder = builder_for(smollm_tokenizer, spec.template, task)
    ex = pd.read_parquet(cdir / "exemplars.parquet")
    resid, _ = activations(tiny_model, builder.prefix(ex.n1, ex.n2, ex.truth), builder.queries(points.n1, points.n2))
    stats = layer_stats(resid, truth, sub)
    np.testing.assert_allclose(arrays["collapse_resid"], stats["collapse"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["within_resid"], stats["within"], rtol=0, atol=1e-6)
