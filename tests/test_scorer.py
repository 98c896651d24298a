"""The scorer of the SFT arms (iclsft.arms.scorer): a full fine-tune arm starts one hf engine and swaps
each checkpoint's weights into it, and every checkpoint's scores equal those of an engine opened on that
checkpoint alone (the way full fine-tunes were scored before: one engine start per checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from iclsft.arms import make_sft_spec
from iclsft.arms.scorer import Scorer
from iclsft.engine.base import open_engine
from iclsft.graph.driver import run_spec
from iclsft.prompts import prompt_builders
from iclsft.spec import EngineSpec, ExecutorSpec, sft_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def full_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    spec, ref = make_sft_spec(model=str(tiny_model_dir), angles=(45.0,), shots=(1, 2), grid_step=20,
                              sft=sft_spec("full", epochs=1, min_steps=4, lr=1e-3), checkpoints=(0.5, 1.0),
                              executor=ExecutorSpec(name="local"), engine=EngineSpec(name="hf"))
    out = tmp_path / "run"
    table = run_spec(spec, out, ref, progress=False)
    return out, spec, ref, table


def test_a_full_fine_tune_arm_starts_one_engine_for_all_its_checkpoints(full_run, smollm_tokenizer):
    out, spec, ref, table = full_run
    record = json.loads((out / "record.json").read_text())["arms"]["sft-full"]
    assert record["status"] == "ok" and record["engine_starts"] == 1
    records = [json.loads(p.read_text()) for p in sorted(out.glob("conditions/*/record.json"))]
    assert len(records) == 4 and len({r["checkpoint_dir"] for r in records}) == 4  # 2 trainings x 2 checkpoints
    builder = next(iter(prompt_builders(smollm_tokenizer, spec.template, spec.tasks).values()))
    for r in records:  # the reference: an engine of its own per checkpoint
        scores = pd.read_parquet(out / "conditions" / next(p.name for p in (out / "conditions").iterdir()
                                                          if r["condition"][-8:] in p.name) / "scores.parquet")
        fresh = open_engine(EngineSpec(name="hf"), out / "adapters" / r["checkpoint_dir"], "float32", progress=False)
        try:
            queries = builder.queries_after(builder.start(), scores.n1, scores.n2)
            expected = fresh.score(builder.start(), queries, builder.label_ids)
        finally:
            fresh.close()
        np.testing.assert_array_equal(scores[["lp_0", "lp_1"]].to_numpy(), expected)


def test_the_base_weights_come_back_after_a_swap(full_run, smollm_tokenizer):
    out, spec, ref, _ = full_run
    builder = next(iter(prompt_builders(smollm_tokenizer, spec.template, spec.tasks).values()))
    queries = builder.queries([10, 60, 90], [20, 40, 5])
    scorer = Scorer(EngineSpec(name="hf"), ref, "float32", progress=False)
    try:
        before = scorer.base().score(builder.start(), queries, builder.label_ids)
        ckpt = next(p for p in (out / "adapters").iterdir() if not p.name.startswith("."))
        engine, adapter = scorer.checkpoint(ckpt, lora=False)
        tuned = engine.score(builder.start(), queries, builder.label_ids)
        assert adapter is None and not np.allclose(tuned, before)  # the fine-tune's weights are in
        np.testing.assert_array_equal(scorer.base().score(builder.start(), queries, builder.label_ids), before)
        assert scorer.starts == 1
    finally:
        scorer.close()


def test_weights_of_another_architecture_are_refused(full_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    out, _, ref, _ = full_run
    engine = open_engine(EngineSpec(name="hf"), ref.path, "float32", progress=False)
    try:
        config = engine.base.config.to_dict()
        deeper = LlamaForCausalLM(LlamaConfig(**{**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
        deeper.save_pretrained(tmp_path / "deeper")
        with pytest.raises(ValueError, match="do not fit the engine's model"):
            engine.load_weights(tmp_path / "deeper")
    finally:
        engine.close()


def test_an_engine_that_cannot_swap_weights_opens_one_per_checkpoint_and_never_the_base(full_run, monkeypatch):
    """An engine that cannot swap weights: each full checkpoint gets an engine of its own, opened once for all its
    conditions and closed when released; the base model's engine is never opened for nothing."""
    import iclsft.arms.scorer as scorer_module

    out, _, ref, _ = full_run
    opened, closed = [], []

    class NoSwap:
        can_load_weights = False

    class Dummy:
        def __init__(self, path):
            self.path = path

        def close(self):
            closed.append(self.path)

    monkeypatch.setattr(scorer_module, "engine_class", lambda name: NoSwap)
    monkeypatch.setattr(scorer_module, "open_engine",
                        lambda spec, path, dtype, **kw: opened.append(str(path)) or Dummy(str(path)))
    ckpts = sorted(str(p) for p in (out / "adapters").iterdir() if not p.name.startswith("."))
    scorer = Scorer(EngineSpec(name="vllm"), ref, "float32", progress=False)
    first, _ = scorer.checkpoint(ckpts[0], lora=False)
    again, _ = scorer.checkpoint(ckpts[0], lora=False)  # a second condition of the same checkpoint
    assert again is first and opened == [ckpts[0]]
    scorer.release(ckpts[0])
    scorer.checkpoint(ckpts[1], lora=False)
    scorer.close()
    assert opened == ckpts[:2] and closed == ckpts[:2] and scorer.starts == 2
    assert str(ref.path) not in opened


def test_a_swap_with_adapters_still_loaded_takes_them_out_and_scores_right(full_run, smollm_tokenizer, tmp_path):
    """A sweep's scorer keeps its recent LoRA adapters loaded (the Ray scorer releases one only as it leaves
    its last KEEP_CHECKPOINTS): a full fine-tune swapped in then must neither fail (it did: "swap weights
    only into a base model without adapters", 3 conditions of a reproduction run) nor mix with them. The
    full checkpoint scores as on an engine of its own, and the adapter afterwards as it did before."""
    out, spec, ref, _ = full_run
    lora, _ = make_sft_spec(model=str(ref.path), angles=(45.0,), shots=(1,), grid_step=20,
                            sft=sft_spec("lora", epochs=1, min_steps=4, lr=1e-2), executor=ExecutorSpec(name="local"),
                            engine=EngineSpec(name="hf"))
    run_spec(lora, tmp_path / "lora", ref, progress=False)
    adapter = next(p for p in (tmp_path / "lora" / "adapters").iterdir() if not p.name.startswith("."))
    full = next(p for p in (out / "adapters").iterdir() if not p.name.startswith("."))
    builder = next(iter(prompt_builders(smollm_tokenizer, spec.template, spec.tasks).values()))
    start, queries = builder.start(), builder.queries([10, 60, 90], [20, 40, 5])
    scorer = Scorer(EngineSpec(name="hf"), ref, "float32", progress=False)
    try:
        engine, name = scorer.checkpoint(adapter, lora=True)
        with_adapter = engine.score(start, queries, builder.label_ids, adapter=name)
        base = engine.score(start, queries, builder.label_ids)
        engine, _ = scorer.checkpoint(full, lora=False)  # the adapter is still loaded
        tuned = engine.score(start, queries, builder.label_ids)
        engine, name = scorer.checkpoint(adapter, lora=True)
        again = engine.score(start, queries, builder.label_ids, adapter=name)
        assert scorer.starts == 1
    finally:
        scorer.close()
    fresh = open_engine(EngineSpec(name="hf"), full, "float32", progress=False)
    try:
        np.testing.assert_array_equal(tuned, fresh.score(start, queries, builder.label_ids))
    finally:
        fresh.close()
    np.testing.assert_array_equal(again, with_adapter)
    assert np.abs(with_adapter - base).max() > 1e-4 and np.abs(tuned - base).max() > 1e-4
