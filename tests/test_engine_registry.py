"""An engine of one's own (iclsft.engine.base.register_engine): a fake engine, registered here, runs an
ICL arm end to end through the CLI (`icl --engine fake`). Its log-probs are a rule of each query's text
(read back from the token ids it was given), so the test knows, without the engine's code, what every
row of scores.parquet and the accuracy must be; the registry refuses clashes with one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from iclsft.cli import main
from iclsft.engine.base import engine_class, register_engine, unregister_engine
from iclsft.engine.contract import Engine, check_model_dir
from iclsft.spec import EngineSpec

OPENED: list[tuple] = []  # (model dir, dtype) of every fake engine opened
QUERY = re.compile(r"(\d+) (\d+) ->$")


def fake_lp(x1: int, x2: int) -> tuple[float, float]:
    """The fake's rule: label 1 is preferred exactly when x2 > x1."""
    return -1.0 - x1 / 100, -1.0 - (x1 if x2 > x1 else x1 + 1) / 100 + 0.005


class FakeEngine(Engine):
    name = "fake"

    def __init__(self, path, *, dtype: str, progress: bool):
        from transformers import AutoTokenizer

        self.path, self.tokenizer = path, AutoTokenizer.from_pretrained(path)
        OPENED.append((str(path), dtype))

    def score(self, prefix, queries, labels, adapter=None) -> np.ndarray:
        out = np.zeros((len(queries), len(labels)))
        for i, q in enumerate(queries):
            x1, x2 = map(int, QUERY.search(self.tokenizer.decode(list(q)).strip()).groups())
            out[i] = fake_lp(x1, x2)
        return out

    def generate(self, prefix, queries, *, stop_ids, max_new_tokens, adapter=None):
        raise ValueError("the fake engine does not generate")

    def release(self, adapter) -> None:
        pass

    def check_model(self, path, fingerprint: str) -> None:
        check_model_dir(self.name, self.path, path, fingerprint)

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "iclsft-home"))
    OPENED.clear()
    register_engine("fake", FakeEngine)
    yield
    unregister_engine("fake")


def test_a_registered_engine_scores_an_arm_through_the_cli(fake, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["icl", "--angle", "45", "--shots", "1,2", "--grid-step", "10", "--engine",
                                       "fake", "--model", str(tiny_model_dir), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert OPENED == [(str(tiny_model_dir), "float32")]  # one engine for both conditions
    assert json.loads((out / "spec.json").read_text())["arms"]["icl"]["engine"]["name"] == "fake"
    metrics = pd.read_parquet(out / "metrics.parquet").set_index("shots")
    for cdir in sorted((out / "conditions").iterdir()):
        shots = json.loads((cdir / "condition.json").read_text())["shots"]
        scores = pd.read_parquet(cdir / "scores.parquet")
        assert len(scores) == 100  # the step-10 lattice
        want = np.array([fake_lp(int(a), int(b)) for a, b in zip(scores.n1, scores.n2)])
        np.testing.assert_array_equal(scores[["lp_0", "lp_1"]].to_numpy(), want)
        accuracy = float(((scores.n2 > scores.n1).astype(int) == scores.truth).mean())
        assert metrics.loc[shots, "accuracy"] == pytest.approx(accuracy)
    assert set(metrics["accuracy"]) != {0.5}


def test_engine_names_are_checked_everywhere(fake):
    assert engine_class("fake") is FakeEngine and EngineSpec(name="fake").name == "fake"
    with pytest.raises(ValueError, match="an engine named 'fake' exists already"):
        register_engine("fake", FakeEngine)
    with pytest.raises(ValueError, match="must be a subclass of iclsft.engine.contract.Engine"):
        register_engine("other", object)
    with pytest.raises(ValueError, match="'hf' is a built-in engine"):
        unregister_engine("hf")


def test_an_unregistered_engine_is_refused_with_the_names_allowed():
    with pytest.raises(ValueError, match="unknown engine 'fake'; available: hf, vllm, vllm-server"):
        EngineSpec(name="fake")
    result = CliRunner().invoke(main, ["icl", "--engine", "fake", "--out", "x"])
    assert result.exit_code == 2 and "'fake' is not one of 'auto', 'hf', 'vllm', 'vllm-server'" in result.output
