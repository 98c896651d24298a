"""The `iclsft-eval` CLI end to end on the tiny random Llama (real SmolLM2 tokenizer): run layout,
resume, spec protection, metrics recomputation, and one clear error for every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from iclsft import __version__
from iclsft.cli import main
from iclsft.evaluate.metrics import METRIC_NAMES, sigmoid

BASE = ["--angle", "45", "--shots", "1,2", "--grid-step", "10"]
SCORE_COLUMNS = ["n1", "n2", "truth", "lp_0", "lp_1", "is_exemplar"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _empty_home(tmp_path, monkeypatch):
    """No test here may read or fill the real model cache."""
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "iclsft-home"))


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def icl(out: Path, model: Path, *extra: str):
    return invoke("icl", *BASE, "--out", out, "--model", model, *extra)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def condition_dirs(run: Path) -> dict[int, Path]:
    """Condition directories by shot count."""
    return {json.loads((d / "condition.json").read_text())["shots"]: d for d in (run / "conditions").iterdir()}


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, tmp_path_factory):
    """One run of the base command, shared read-only by the tests below (copy it to change it)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICLSFT_HOME", str(out.parent / "iclsft-home"))
        result = icl(out, tiny_model_dir)
    assert result.exit_code == 0, result.output
    return out, result


def copy_run(base_run, tmp_path) -> Path:
    return Path(shutil.copytree(base_run[0], tmp_path / "run"))  # copy2 keeps mtimes


# -- a fresh run ---------------------------------------------------------------------------------


def test_run_prints_metrics_table(base_run):
    _, result = base_run
    table, summary = result.stdout.strip().split("\n\n")
    lines = table.splitlines()
    header = lines[0].split()
    for column in ("angle", "method", "shots", "seed", "accuracy", "auc", "cal_accuracy", "label_mass"):
        assert column in header
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 2
    assert [r[header.index("shots")] for r in rows] == ["1", "2"]
    assert all(r[header.index("method")] == "icl" for r in rows)
    assert "2 conditions, 0 already finished, 2 to run" in result.stderr
    accuracy = [float(r[header.index("accuracy")]) for r in rows]
    assert summary.startswith("ICL θ=45°: accuracy ")
    assert f"{accuracy[0]:.2f} (K=1) → {accuracy[1]:.2f} (K=2)" in summary


def test_run_dir_top_level(base_run, tiny_model_dir):
    out, _ = base_run
    assert {p.name for p in out.iterdir()} == {"spec.json", "record.json", "metrics.parquet", "metrics.json",
                                               "conditions", ".lock"}
    spec = json.loads((out / "spec.json").read_text())["arms"]["icl"]
    assert spec["kind"] == "icl" and spec["shots"] == [1, 2] and spec["seeds"] == [0]
    assert spec["tasks"] == [{"name": "linear2d", "angle": 45.0, "labels": [" Baz", " Rud"],
                              "swap_labels": False, "grid_step": 10, "words": None}]
    assert spec["model"]["name"] == str(tiny_model_dir)
    record = json.loads((out / "record.json").read_text())["arms"]["icl"]
    assert record["status"] == "ok" and record["failed"] == 0 and record["conditions"] == 2
    assert record["version"] == __version__


def test_metrics_parquet(base_run):
    out, _ = base_run
    table = pd.read_parquet(out / "metrics.parquet")
    assert len(table) == 2
    for column in ("task", "angle", "method", "shots", "seed", *METRIC_NAMES):
        assert column in table.columns, column
    assert table["shots"].tolist() == [1, 2]
    assert set(table["task"]) == {"linear2d"} and set(table["method"]) == {"icl"}
    assert set(table["angle"]) == {45.0} and set(table["seed"]) == {0}
    assert set(table["n_points"]) == {100} and set(table["n_boundary"]) == {10}
    for shots, cdir in condition_dirs(out).items():
        ex = pd.read_parquet(cdir / "exemplars.parquet")
        on_lattice = int(((ex.n1 % 10 == 0) & (ex.n2 % 10 == 0)).sum())
        assert table.set_index("shots").loc[shots, "n_holdout"] == 90 - on_lattice
    assert table["label_mass"].between(0, 2).all() and table["auc"].between(0, 1).all()


@pytest.mark.parametrize("shots", [1, 2])
def test_condition_files(base_run, shots):
    out, _ = base_run
    cdir = condition_dirs(out)[shots]
    assert {p.name for p in cdir.iterdir()} == {"condition.json", "scores.parquet", "exemplars.parquet",
                                                "field.npy", "record.json"}

    scores = pd.read_parquet(cdir / "scores.parquet")
    assert sorted(scores.columns) == sorted(SCORE_COLUMNS)
    assert len(scores) == 100
    assert set(scores["n1"]) == set(scores["n2"]) == set(range(0, 100, 10))
    assert set(scores["truth"]) == {-1, 0, 1}
    # 45 degrees: the boundary is n1 == n2; margin > 0 (n2 > n1) is the first label.
    on_line = scores["n1"] == scores["n2"]
    assert (scores["truth"][on_line] == -1).all() and on_line.sum() == 10
    assert (scores["truth"][scores["n2"] > scores["n1"]] == 0).all()
    assert (scores["truth"][scores["n2"] < scores["n1"]] == 1).all()
    assert np.isfinite(scores[["lp_0", "lp_1"]].to_numpy()).all()
    assert (scores[["lp_0", "lp_1"]].to_numpy() <= 0).all()

    exemplars = pd.read_parquet(cdir / "exemplars.parquet")
    assert list(exemplars.columns) == ["pair", "n1", "n2", "truth"]
    assert len(exemplars) == 2 * shots
    assert (exemplars["truth"] == 0).sum() == (exemplars["truth"] == 1).sum() == shots
    for _, pair in exemplars.groupby("pair"):
        assert sorted(pair["truth"]) == [0, 1]  # one exemplar per class in every pair
    # exemplars carry their true labels and are flagged in the score table when on the lattice
    assert ((exemplars["n2"] > exemplars["n1"]) == (exemplars["truth"] == 0)).all()
    assert (exemplars["n1"] != exemplars["n2"]).all()
    on_lattice = set(zip(exemplars.n1, exemplars.n2)) & set(zip(scores.n1, scores.n2))
    assert set(zip(scores.n1[scores.is_exemplar], scores.n2[scores.is_exemplar])) == on_lattice

    field = np.load(cdir / "field.npy")
    assert field.shape == (10, 10)
    assert ((field >= 0) & (field <= 1)).all()
    expected = np.empty((10, 10))
    expected[scores.n1 // 10, scores.n2 // 10] = sigmoid(scores.lp_0 - scores.lp_1)
    np.testing.assert_allclose(field, expected, rtol=1e-6, atol=1e-7)

    record = json.loads((cdir / "record.json").read_text())
    assert record["status"] == "ok" and record["shots"] == shots and record["queries"] == 100
    assert set(record["files"]) == {"scores.parquet", "exemplars.parquet", "field.npy"}
    for name, info in record["files"].items():
        data = (cdir / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_prompt_at_k1_is_prefix_of_k2(base_run):
    """Matched trajectories (SPEC §3): the K=1 exemplars are the first pair of the K=2 prompt."""
    dirs = condition_dirs(base_run[0])
    one = pd.read_parquet(dirs[1] / "exemplars.parquet")
    two = pd.read_parquet(dirs[2] / "exemplars.parquet")
    pd.testing.assert_frame_equal(one, two.iloc[:2].reset_index(drop=True))


# -- resume ------------------------------------------------------------------------------------


def test_rerun_skips_everything(base_run, tmp_path, tiny_model_dir):
    out = copy_run(base_run, tmp_path)
    before = snapshot(out)
    result = icl(out, tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "2 already finished, 0 to run" in result.stderr
    assert result.stdout == base_run[1].stdout  # same table
    after = snapshot(out)
    for name, (data, mtime) in before.items():
        if name.startswith("conditions/"):
            assert after[name] == (data, mtime), name  # not rewritten, not even touched
    assert json.loads((out / "record.json").read_text())["arms"]["icl"]["status"] == "ok"


def test_deleted_record_recomputes_only_that_condition(base_run, tmp_path, tiny_model_dir):
    """K=1 is computed from an empty prefix cache in both runs: the files come out byte-identical."""
    out = copy_run(base_run, tmp_path)
    dirs = condition_dirs(out)
    old_scores = pd.read_parquet(dirs[1] / "scores.parquet")
    old_record = json.loads((dirs[1] / "record.json").read_text())
    untouched = snapshot(dirs[2])
    (dirs[1] / "record.json").unlink()

    result = icl(out, tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "1 already finished, 1 to run" in result.stderr
    assert snapshot(dirs[2]) == untouched
    new_scores = pd.read_parquet(dirs[1] / "scores.parquet")
    pd.testing.assert_frame_equal(new_scores, old_scores, check_exact=True)  # deterministic
    new_record = json.loads((dirs[1] / "record.json").read_text())
    assert new_record["status"] == "ok"
    assert new_record["files"] == old_record["files"]  # byte-identical files
    assert result.stdout == base_run[1].stdout


def test_recomputed_later_condition_matches_within_float_noise(base_run, tmp_path, tiny_model_dir):
    """In the first run K=2 extends the prefix KV cached for K=1; alone it computes the whole prefix.
    The two paths differ only by fp32 rounding (measured ~3e-6 on these log-probs of about -22)."""
    out = copy_run(base_run, tmp_path)
    dirs = condition_dirs(out)
    old_scores = pd.read_parquet(dirs[2] / "scores.parquet")
    (dirs[2] / "record.json").unlink()

    result = icl(out, tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "1 already finished, 1 to run" in result.stderr
    new_scores = pd.read_parquet(dirs[2] / "scores.parquet")
    pd.testing.assert_frame_equal(new_scores.drop(columns=["lp_0", "lp_1"]),
                                  old_scores.drop(columns=["lp_0", "lp_1"]), check_exact=True)
    for column in ("lp_0", "lp_1"):
        np.testing.assert_allclose(new_scores[column], old_scores[column], rtol=0, atol=1e-4)
    assert json.loads((dirs[2] / "record.json").read_text())["status"] == "ok"


def test_truncated_scores_are_recomputed(base_run, tmp_path, tiny_model_dir):
    out = copy_run(base_run, tmp_path)
    scores = condition_dirs(out)[1] / "scores.parquet"
    good = scores.read_bytes()
    scores.write_bytes(good[: len(good) // 2])
    result = icl(out, tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "1 already finished, 1 to run" in result.stderr
    assert scores.read_bytes() == good


def test_different_spec_is_refused_and_changes_nothing(base_run, tmp_path, tiny_model_dir):
    out = copy_run(base_run, tmp_path)
    before = snapshot(out)
    result = invoke("icl", "--angle", "45", "--shots", "1,2,3", "--grid-step", "10", "--out", out,
                    "--model", tiny_model_dir)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # a clean error, not a crash
    assert "different spec" in result.output and "shots" in result.output
    assert "Traceback" not in result.output
    assert result.output.count("Error:") == 1
    assert snapshot(out) == before


def test_changed_transport_knob_resumes(base_run, tmp_path, tiny_model_dir):
    out = copy_run(base_run, tmp_path)
    result = icl(out, tiny_model_dir, "--token-budget", "64", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == base_run[1].stdout
    assert "to run" not in result.output  # --quiet


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_recomputes_same_table(base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    before = pd.read_parquet(out / "metrics.parquet")
    (out / "metrics.parquet").unlink()
    result = invoke("metrics", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == base_run[1].stdout
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet"), before)
    wide = invoke("metrics", out, "--all-columns")
    assert wide.exit_code == 0
    for name in ("condition", "ece", "log_loss", "cal_angle_error", "n_holdout"):
        assert name in wide.stdout.splitlines()[0]


def test_metrics_refuses_tampered_scores(base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    field = condition_dirs(out)[1] / "field.npy"
    data = bytearray(field.read_bytes())
    data[-1] ^= 0xFF
    field.write_bytes(bytes(data))
    result = invoke("metrics", out)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "does not match the checksum" in result.output


def test_metrics_without_spec(tmp_path):
    result = invoke("metrics", tmp_path)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "not a run directory" in result.output and "spec.json" in result.output
    missing = invoke("metrics", tmp_path / "nothing-here")
    assert missing.exit_code != 0 and isinstance(missing.exception, SystemExit)
    assert "spec.json" in missing.output
    assert not (tmp_path / "nothing-here").exists()


# -- bad input -----------------------------------------------------------------------------------

BAD_INPUTS = {
    "angle-180": (["--angle", "180"], ["180", "[0, 180)"]),
    "angle-negative": (["--angle", "-5"], ["-5", "[0, 180)"]),
    "shots-0": (["--shots", "0"], ["shot count 0", ">= 1"]),
    "shots-negative": (["--shots", "-1"], ["shot count -1", ">= 1"]),
    "shots-too-many": (["--shots", "4951"], ["4951", "1..4950"]),
    "shots-not-ints": (["--shots", "a,b"], ["'a,b'", "--shots", "ints"]),
    "model-missing": (["--model", "./no/such/model"], ["./no/such/model", "does not exist", "smollm2-135m"]),
    "template-malformed": (["--exemplar-template", "{x1} {x2 ->{label}"],
                           ["malformed", "{x1} {x2 ->{label}"]),
    "template-not-query-first": (["--exemplar-template", "{x2} {x1} ->{label}\n"],
                                 ["{x2} {x1} ->{label}", "query template", "{x1} {x2} ->"]),
    "order-pattern": (["--order-pattern", "1122"], ["'1122'", "'12'", "'1221'"]),
    "labels-ambiguous": (["--labels", "B,Baz"], ["' B'", "' Baz'", "ambiguous"]),
    "labels-three": (["--labels", "Baz,Rud,Foo"], ["Baz,Rud,Foo", "exactly two"]),
    "labels-equal": (["--labels", "Baz,Baz"], ["' Baz'", "two different"]),
    "labels-bad-json": (["--labels", '[" Baz", '], ["JSON list"]),
    "grid-step": (["--grid-step", "3"], ["grid_step 3", "1, 2, 4, 5, 10"]),
    "dtype": (["--dtype", "float64"], ["float64", "float32", "bfloat16"]),
    "engine": (["--engine", "vllm-magic"], ["vllm-magic", "hf"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative model path resolves here
    args, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    # later options win in click, so the bad value goes last
    result = invoke("icl", *BASE, "--out", out, "--model", tiny_model_dir, *args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a clear error, not a crash
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    assert not out.exists()
    home = tmp_path / "iclsft-home"
    # the only thing a rejected command may leave in the cache is the model-file hash cache
    left = sorted(p.name for p in home.rglob("*")) if home.exists() else []
    assert left in ([], ["sha256-cache.json"]), left


def test_unwritable_out_dir(tmp_path, tiny_model_dir):
    if os.geteuid() == 0:  # root ignores permissions: a path below a regular file fails for anyone
        parent = tmp_path / "a-file"
        parent.write_text("not a directory")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o500)
    out = parent / "run"
    try:
        result = icl(out, tiny_model_dir)
    finally:
        if parent.is_dir():
            parent.chmod(0o700)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "cannot write to output directory" in result.output
    assert str(out) in result.output
    assert not out.exists()


def test_out_is_an_existing_file(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.write_text("not a run directory")
    result = icl(out, tiny_model_dir)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    assert "cannot write to output directory" in result.output and str(out) in result.output
    assert out.read_text() == "not a run directory"


def test_negative_seed_is_bad_input(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = icl(out, tiny_model_dir, "--seed", "-1")
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "-1" in result.output and "seed" in result.output
    assert not out.exists()


def test_negative_threads_is_bad_input(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = icl(out, tiny_model_dir, "--threads", "-1")
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "threads" in result.output and "-1" in result.output
    assert not out.exists()


def test_token_budget_error_names_option_and_value(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = icl(out, tiny_model_dir, "--token-budget", "8")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert not out.exists()
    assert "16" in result.output  # the allowed range is there ...
    assert "token_budget" in result.output or "token-budget" in result.output  # ... the option is not
    assert "8" in result.output.replace("16", "")  # nor the bad value


def _failing_k2(monkeypatch):
    import iclsft.arms.linear2d

    real = iclsft.arms.linear2d.score_condition

    def score_condition(cond, *args, **kwargs):
        if cond.shots == 2:
            raise RuntimeError("simulated out of memory")
        return real(cond, *args, **kwargs)

    monkeypatch.setattr(iclsft.arms.linear2d, "score_condition", score_condition)


def test_failed_condition_is_recorded_and_retried(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        _failing_k2(mp)
        result = icl(out, tiny_model_dir)
    assert result.exit_code != 0
    dirs = condition_dirs(out)
    assert json.loads((dirs[1] / "record.json").read_text())["status"] == "ok"
    failed = json.loads((dirs[2] / "record.json").read_text())
    assert failed["status"] == "error" and failed["error"] == "RuntimeError: simulated out of memory"
    assert "simulated out of memory" in failed["traceback"]
    run_record = json.loads((out / "record.json").read_text())["arms"]["icl"]
    assert run_record["status"] == "error" and run_record["failed"] == 1
    assert pd.read_parquet(out / "metrics.parquet")["shots"].tolist() == [1]  # only what finished

    again = icl(out, tiny_model_dir)
    assert again.exit_code == 0, again.output
    assert "1 already finished, 1 to run" in again.stderr
    assert json.loads((dirs[2] / "record.json").read_text())["status"] == "ok"
    assert json.loads((out / "record.json").read_text())["arms"]["icl"]["status"] == "ok"
    assert pd.read_parquet(out / "metrics.parquet")["shots"].tolist() == [1, 2]


def test_failed_condition_is_one_clear_cli_error(tmp_path, tiny_model_dir, monkeypatch):
    _failing_k2(monkeypatch)
    result = icl(tmp_path / "run", tiny_model_dir)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "1 of 2 icl conditions failed" in result.output


# -- labels --------------------------------------------------------------------------------------


def test_json_labels_equal_word_labels(base_run, tmp_path, tiny_model_dir):
    """The JSON form gives exactly the same spec: resuming the Baz,Rud run finds nothing to do."""
    out = copy_run(base_run, tmp_path)
    result = icl(out, tiny_model_dir, "--labels", '[" Baz", " Rud"]')
    assert result.exit_code == 0, result.output
    assert "2 already finished, 0 to run" in result.stderr
    assert json.loads((out / "spec.json").read_text())["arms"]["icl"]["tasks"][0]["labels"] == [" Baz", " Rud"]


def test_labels_word_form_adds_a_leading_space(tmp_path, tiny_model_dir):
    """Different labels are a different spec; the refusal names the task (where labels live)."""
    out = tmp_path / "run"
    result = invoke("icl", "--angle", "45", "--shots", "1", "--grid-step", "20", "--out", out,
                    "--model", tiny_model_dir, "--labels", " Foo , Bar")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "spec.json").read_text())["arms"]["icl"]["tasks"][0]["labels"] == [" Foo", " Bar"]
    again = invoke("icl", "--angle", "45", "--shots", "1", "--grid-step", "20", "--out", out,
                   "--model", tiny_model_dir, "--labels", '["Foo", "Bar"]')
    assert again.exit_code != 0 and "different spec" in again.output and "tasks" in again.output


def test_swap_labels_flips_truth(base_run, tmp_path, tiny_model_dir):
    out = tmp_path / "swapped"
    result = invoke("icl", "--angle", "45", "--shots", "1", "--grid-step", "10", "--out", out,
                    "--model", tiny_model_dir, "--swap-labels")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "spec.json").read_text())["arms"]["icl"]["tasks"][0]["swap_labels"] is True
    plain = pd.read_parquet(condition_dirs(base_run[0])[1] / "scores.parquet")
    swapped = pd.read_parquet(condition_dirs(out)[1] / "scores.parquet")
    pd.testing.assert_frame_equal(plain[["n1", "n2"]], swapped[["n1", "n2"]])
    flipped = np.where(plain.truth == -1, -1, 1 - plain.truth)
    np.testing.assert_array_equal(swapped.truth.to_numpy(), flipped)
    assert (swapped.truth[swapped.n2 > swapped.n1] == 1).all()  # the first label now goes below
    exemplars = pd.read_parquet(condition_dirs(out)[1] / "exemplars.parquet")
    assert ((exemplars.n2 > exemplars.n1) == (exemplars.truth == 1)).all()


# -- models and version ---------------------------------------------------------------------------


def test_models_list_not_prepared(tmp_path):
    result = invoke("models", "list")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("smollm2-135m"))
    assert "not prepared" in line
    assert str(tmp_path / "iclsft-home" / "models" / "smollm2-135m") in line


def test_models_list_prepared(tmp_path, monkeypatch):
    from iclsft.models import MARKER

    prepared = tmp_path / "iclsft-home" / "models" / "smollm2-135m"
    prepared.mkdir(parents=True)
    (prepared / MARKER).write_text("{}")
    result = invoke("models", "list")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("smollm2-135m"))
    assert "prepared" in line and "not prepared" not in line


def test_models_prepare_unknown_name(tmp_path):
    result = invoke("models", "prepare", "gpt-17")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "'gpt-17'" in result.output and "smollm2-135m" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"iclsft-eval, version {__version__}"


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("icl", "metrics", "models"):
        assert command in result.output


def test_help_shows_template_escapes_and_the_shown_default_is_the_default(base_run, tiny_model_dir, tmp_path):
    """`icl --help` shows the exemplar template with `\\n` (not a newline printed as a space), and the
    text shown, typed back on the command line, is the same template: the run's conditions are kept."""
    import re

    help_text = invoke("icl", "--help").output
    shown = re.search(r"\[default: '([^']*)'\]", help_text.split("--exemplar-template", 1)[1])[1]
    assert shown == r"{x1} {x2} ->{label}\n"
    out = copy_run(base_run, tmp_path)
    before = snapshot(out / "conditions")
    result = icl(out, tiny_model_dir, "--exemplar-template", shown, "--query-template", "{x1} {x2} ->")
    assert result.exit_code == 0, result.output
    assert snapshot(out / "conditions") == before  # same template, so the same conditions: nothing rescored
    template = json.loads((out / "spec.json").read_text())["arms"]["icl"]["template"]
    assert template["exemplar"] == "{x1} {x2} ->{label}\n"
    result = icl(tmp_path / "tab", tiny_model_dir, "--exemplar-template", r"{x1}\t{x2} ->{label}\n",
                 "--query-template", r"{x1}\t{x2} ->")
    assert result.exit_code == 0, result.output
    template = json.loads((tmp_path / "tab" / "spec.json").read_text())["arms"]["icl"]["template"]
    assert template["exemplar"] == "{x1}\t{x2} ->{label}\n" and template["query"] == "{x1}\t{x2} ->"
