"""The study registry (iclsft.study): a toy study of parity (tests/toy_study.py), registered here as a
plugin would be, runs end to end through the CLI (`run`, `metrics`, `claims`, `report`) on the tiny
random Llama; its scores are the naive reference's, its metrics recomputed by hand; and the registry
refuses clashes and unknown names with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from toy_study import LABELS, STUDY, query_numbers, texts

from iclsft import study
from iclsft.cli import main
from iclsft.engine.reference import naive_score

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def parity(monkeypatch, tmp_path):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "iclsft-home"))
    study.register(STUDY)
    yield STUDY
    study.unregister(STUDY.name)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def spec_file(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "parity.yaml"
    path.write_text(yaml.safe_dump({"study": "parity", **fields}))
    return path


def test_toy_study_runs_through_the_cli_with_the_reference_scores(parity, tmp_path, tiny_model, tiny_model_dir,
                                                                     smollm_tokenizer):
    out = tmp_path / "run"
    result = invoke("run", spec_file(tmp_path, model=str(tiny_model_dir), shots=[1, 2, 4], seeds=[0, 3]),
                    "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "spec.json").read_text())
    assert list(spec["arms"]) == ["parity-icl"] and spec["arms"]["parity-icl"]["kind"] == "parity"
    assert study.of_run(out) is parity

    def ids(text):
        return smollm_tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = []
    for cdir in sorted((out / "conditions").iterdir()):
        cond = json.loads((cdir / "condition.json").read_text())
        record = json.loads((cdir / "record.json").read_text())
        assert record["status"] == "ok" and cond["suite"] == "parity"
        scores = pd.read_parquet(cdir / "scores.parquet")
        prompt, queries = texts(cond["seed"], cond["shots"])
        want = naive_score(tiny_model, ids(prompt), [ids(q) for q in queries], [ids(x) for x in LABELS])
        np.testing.assert_allclose(scores[["lp_0", "lp_1"]].to_numpy(), want, atol=1e-4)
        truth = np.array(query_numbers(cond["seed"])) % 2
        rows.append((cond["seed"], cond["shots"], float(((want[:, 1] > want[:, 0]) == truth).mean())))
    assert len(rows) == 6

    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns) == [*parity.key_columns, *parity.metric_columns]
    assert [(r.seed, r.shots) for r in metrics.itertuples()] == sorted((s, k) for s, k, _ in rows)
    np.testing.assert_allclose(metrics["accuracy"], [a for _, _, a in sorted(rows)])

    before = {p: p.stat().st_mtime_ns for p in out.rglob("record.json")}
    again = invoke("run", spec_file(tmp_path, model=str(tiny_model_dir), shots=[1, 2, 4], seeds=[0, 3]),
                   "--out", out, "--quiet")
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("record.json") if "conditions" in p.parts} == \
        {p: t for p, t in before.items() if "conditions" in p.parts}  # resumed: nothing scored again

    recomputed = invoke("metrics", out)
    assert recomputed.exit_code == 0, recomputed.output
    assert recomputed.output.split("\n")[0].split() == [*parity.key_columns, *parity.metric_columns]
    compared = invoke("compare", out)
    assert compared.exit_code == 1 and "the parity study has no comparison table" in compared.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet"), metrics)

    claims = invoke("claims", out, "--json")
    assert claims.exit_code == 0, claims.output
    verdicts = {c["verdict"] for c in json.loads((out / "claims.json").read_text())["claims"]}
    assert verdicts == {"untestable"}  # the built-in studies' claims; the toy study states none

    report = invoke("report", out)
    assert report.exit_code == 1 and "the parity study has no report page" in report.output


def test_spec_file_errors_are_one_line(parity, tmp_path, tiny_model_dir):
    bad = invoke("run", spec_file(tmp_path, model=str(tiny_model_dir), shot=[1]), "--out", tmp_path / "r")
    assert bad.exit_code == 1 and "parity.yaml: field shot = [1]: Extra inputs are not permitted" in bad.output
    (tmp_path / "icl.yaml").write_text("study: linear2d\nshots: [0]\n")
    zero = invoke("run", tmp_path / "icl.yaml", "--out", tmp_path / "r")
    assert zero.exit_code == 1 and "shot count 0 is not allowed" in zero.output, zero.output
    (tmp_path / "none.yaml").write_text("model: x\n")
    missing = invoke("run", tmp_path / "none.yaml", "--out", tmp_path / "r")
    assert missing.exit_code == 1 and "with a `study` field (one of linear2d, implicit, parity)" in missing.output
    (tmp_path / "other.yaml").write_text("study: nope\n")
    unknown = invoke("run", tmp_path / "other.yaml", "--out", tmp_path / "r")
    assert unknown.exit_code == 1 and "unknown study 'nope'; registered: linear2d, implicit, parity" in unknown.output
    assert not (tmp_path / "r").exists()


def test_registry_refuses_clashes(parity):
    assert [s.name for s in study.studies()] == ["linear2d", "implicit", "parity"]
    assert study.register(parity) is parity  # the same object again: a no-op
    with pytest.raises(ValueError, match="a study named 'parity' is registered already"):
        study.register(study.Study(**{**parity.__dict__, "kinds": ("other",)}))
    with pytest.raises(ValueError, match="arm kind 'icl' belongs to the study 'linear2d'"):
        study.register(study.Study(**{**parity.__dict__, "name": "other", "kinds": ("icl",)}))
    with pytest.raises(ValueError, match="arm kind 'nope' belongs to no registered study"):
        study.of_kind("nope")
    assert study.of_kind("sft").name == "linear2d" and study.of_kind("implicit").name == "implicit"


def test_a_run_directory_is_found_by_its_arms(tmp_path):
    (tmp_path / "a").mkdir()
    arms = {"icl": {"kind": "icl"}, "sft-lora": {"kind": "sft"}}
    (tmp_path / "a" / "spec.json").write_text(json.dumps({"arms": arms}))
    assert study.of_run(tmp_path / "a").name == "linear2d"
    assert study.of_run(tmp_path / "missing") is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "spec.json").write_text(json.dumps({"arms": {"icl": {"kind": "icl"},
                                                                 "implicit-icl": {"kind": "implicit"}}}))
    with pytest.raises(ValueError, match="holds the arms of one study"):
        study.of_run(tmp_path / "b")
