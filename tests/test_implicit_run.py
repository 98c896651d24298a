"""The implicit-pattern suite end to end on the tiny model: ICL and LoRA arms, matched evaluation
sets, scores against a plain forward, greedy generation against transformers' generate, resume,
circuit shift, report, and the sweep section."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from logcapture import capture

from iclsft.arms import make_implicit_spec
from iclsft.evaluate.runs import read_metrics, recompute_metrics
from iclsft.graph.driver import run_spec
from iclsft.implicit.data import TaskPrompts, demo_stream, eval_items, train_items
from iclsft.implicit.results import results_table
from iclsft.spec import ExecutorSpec
from iclsft.tasks.implicit import get_task

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ("expression", "boolean", "code")
SMALL = dict(tasks=TASKS, seeds=(0,), train_size=24, eval_size=6)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ICLSFT_HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def icl_run(home, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("implicit") / "run"
    spec, ref = make_implicit_spec(model=str(tiny_model_dir), method="icl", shots=(0, 2), **SMALL)
    run_spec(spec, out, ref, progress=False)
    return out, spec, ref


@pytest.fixture(scope="module")
def lora_run(icl_run):
    out, _, _ = icl_run
    spec, ref = make_implicit_spec(model=spec_model(icl_run), method="lora", sft={"epochs": 1, "batch_size": 8},
                                   executor=ExecutorSpec(name="local"), **SMALL)
    run_spec(spec, out, ref, progress=False)
    return out, spec, ref


def spec_model(run) -> str:
    return run[1].model.name


def test_icl_arm_writes_every_condition_with_its_scores(icl_run):
    out, spec, _ = icl_run
    table = recompute_metrics(out)
    assert len(table) == len(TASKS) * 2 * 2  # tasks x K x variants
    pd.testing.assert_frame_equal(read_metrics(out), table)  # written with its checksum
    (out / "metrics.parquet").write_bytes((out / "metrics.parquet").read_bytes()[:-10])
    assert read_metrics(out) is None  # a damaged table is not read
    recompute_metrics(out)
    assert set(table["variant"]) == {"holds", "broken"}
    assert table["accuracy"].between(0, 1).all() and table["shortcut_rate"].between(0, 1).all()
    for cdir in (out / "conditions").iterdir():
        scores = pd.read_parquet(cdir / "scores.parquet")
        assert len(scores) == 6
        if cdir.name.startswith("code"):
            assert not any(c.startswith("lp_") for c in scores.columns)  # generated, not scored
        else:
            assert {"lp_0", "lp_1"} <= set(scores.columns)
    # shortcut_rate is what it says: the fraction of predictions equal to the shortcut's answer
    cdir = next(d for d in (out / "conditions").iterdir() if d.name.startswith("boolean-broken"))
    scores = pd.read_parquet(cdir / "scores.parquet")
    record = json.loads((cdir / "record.json").read_text())
    assert record["metrics"]["shortcut_rate"] == pytest.approx((scores.prediction == scores.shortcut).mean())
    assert (scores.answer != scores.shortcut).all()  # broken: the shortcut is always wrong


def test_rerun_computes_nothing(icl_run):
    out, spec, ref = icl_run
    before = {f: f.stat().st_mtime_ns for f in out.glob("conditions/*/scores.parquet")}
    run_spec(spec, out, ref, progress=False)
    assert {f: f.stat().st_mtime_ns for f in out.glob("conditions/*/scores.parquet")} == before


def test_closed_label_scores_equal_a_plain_forward(icl_run, tiny_model, smollm_tokenizer):
    """The stored log-prob of each answer = log p(answer tokens | prefix + query) from one plain
    forward of the concatenated ids (fp32: the packed engine differs by float noise only)."""
    out, _, _ = icl_run
    task = get_task("expression")
    prompts = TaskPrompts(smollm_tokenizer, task)
    cdir = next(d for d in (out / "conditions").iterdir() if d.name.startswith("expression-holds-icl-K2"))
    scores = pd.read_parquet(cdir / "scores.parquet")
    items = eval_items(task, "holds", 0, 6, 24)
    prefix = prompts.prefix(demo_stream(task, 0)[:2])
    for i in (0, 3):
        for j in (0, 10):
            ids = prefix + prompts.query(items[i]) + prompts.label_ids[j]
            with torch.no_grad():
                logp = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0].double(), -1)
            n = len(prompts.label_ids[j])
            want = sum(logp[len(ids) - n - 1 + t, ids[len(ids) - n + t]].item() for t in range(n))
            assert scores[f"lp_{j}"][i] == pytest.approx(want, abs=1e-4)


def test_generation_equals_transformers_greedy(icl_run, tiny_model, smollm_tokenizer):
    out, _, _ = icl_run
    task = get_task("code")
    prompts = TaskPrompts(smollm_tokenizer, task)
    cdir = next(d for d in (out / "conditions").iterdir() if d.name.startswith("code-broken-icl-K2"))
    scores = pd.read_parquet(cdir / "scores.parquet")
    items = eval_items(task, "broken", 0, 6, 24)
    prefix = prompts.prefix(demo_stream(task, 0)[:2])
    stop = set(prompts.stop_ids())
    for i in range(len(items)):  # one padded batch of 6 queries of different lengths
        ids = torch.tensor([prefix + prompts.query(items[i])])
        with torch.no_grad():
            full = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                       pad_token_id=2)[0, ids.shape[1]:].tolist()
        new = []
        for t in full:
            if t in stop:
                break
            new.append(t)
        assert scores["prediction"][i] == smollm_tokenizer.decode(new).strip()


def test_evaluation_sets_are_matched_and_disjoint_from_what_was_seen():
    task = get_task("boolean")
    items = eval_items(task, "holds", 0, 50, 200)
    seen = {it.question for it in demo_stream(task, 0)} | {it.question for it in train_items(task, 0, 200)}
    assert not seen & {it.question for it in items}
    assert items == eval_items(task, "holds", 0, 50, 200)  # the same set for every method and K


def test_too_few_unseen_items_is_an_error():
    from iclsft.tasks.implicit import Item

    class OneQuestion:  # a task whose every item is the same question: nothing is left unseen
        name = "one"

        def generate(self, n, seed, variant, faithful=False):
            return [Item("1+1=", "2", "2", variant)] * n

    with pytest.raises(ValueError, match="only 0 holds items .* fewer than 5"):
        eval_items(OneQuestion(), "holds", 0, 5, 3)


def test_lora_arm_scores_both_variants_of_one_model_per_task(lora_run):
    out, spec, _ = lora_run
    table = recompute_metrics(out)
    lora = table[table["method"] == "lora"]
    assert len(lora) == len(TASKS) * 2
    records = [json.loads(p.read_text()) for p in out.glob("conditions/*-lora-*/record.json")]
    per_task = {}
    for r in records:
        per_task.setdefault(r["task"], set()).add(r["checkpoint_dir"])
    assert all(len(dirs) == 1 for dirs in per_task.values()) and len(per_task) == len(TASKS)
    # the same evaluation questions as ICL's
    icl_q = pd.read_parquet(next(out.glob("conditions/boolean-holds-icl-K0-*/scores.parquet"))).question
    lora_q = pd.read_parquet(next(out.glob("conditions/boolean-holds-lora-*/scores.parquet"))).question
    assert list(icl_q) == list(lora_q)
    res = results_table(table)
    assert {"base (K=0)", "ICL best-of-K", "SFT lora"} <= set(res.columns)
    assert len(res) == len(TASKS) * 2


def test_metrics_compare_and_report_commands_work_on_an_implicit_run(lora_run, tmp_path):
    """The issue's traceback (`KeyError: 'angle'`): `metrics`, `compare` and `report` read any run directory."""
    from click.testing import CliRunner

    from iclsft.cli import main

    out, _, _ = lora_run
    table = recompute_metrics(out)
    result = CliRunner().invoke(main, ["metrics", str(out)])
    assert result.exit_code == 0, result.output
    assert "shortcut_rate" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["compare", str(out)])
    assert result.exit_code == 0, result.output
    assert "icl K=0" in result.output and "icl K=2" in result.output and "lora" in result.output
    # compare's cells are the metrics table's own numbers, pivoted: one cell by hand
    row = table[(table.task == "boolean") & (table.variant == "broken") & (table.method == "lora")].iloc[0]
    from iclsft.evaluate.runs import compare_implicit

    wide = compare_implicit(table, ["accuracy"])
    assert wide.loc[("boolean", "broken", 0), ("accuracy", "lora")] == pytest.approx(row.accuracy)
    result = CliRunner().invoke(main, ["compare", str(out), "--metric", "auc"])
    assert result.exit_code == 1 and "unknown metric 'auc'; choose from accuracy, shortcut_rate" in result.output
    result = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "Implicit patterns" in (tmp_path / "rep" / "index.html").read_text()
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    for command in ("metrics", "compare"):
        result = CliRunner().invoke(main, [command, str(not_a_run)])
        assert result.exit_code == 1 and "is not a run directory (no spec.json)" in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_damaged_implicit_adapter_is_set_aside_and_trained_again(home, tiny_model_dir, tmp_path):
    """Like the 2D arms: a checkpoint whose file no longer matches its marker is never scored."""
    from iclsft.sft.adapters import MARKER

    out = tmp_path / "run"
    small = dict(SMALL, tasks=("relation",))
    spec, ref = make_implicit_spec(model=str(tiny_model_dir), method="lora", sft={"epochs": 1, "batch_size": 8},
                                   executor=ExecutorSpec(name="local"), **small)
    first = run_spec(spec, out, ref, progress=False)
    [ckpt] = [p.parent for p in (out / "adapters").glob(f"*/{MARKER}")]
    weights = ckpt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    for record in out.glob("conditions/*/record.json"):
        record.unlink()  # the conditions are scored again, on whatever checkpoint the run trusts
    logs: list[str] = []
    with capture(logs):
        again = run_spec(spec, out, ref, progress=False)
    assert any("is damaged" in m and "set aside" in m for m in logs), logs
    assert any("1 models to train, 0 reused" in m for m in logs), logs
    assert list(out.glob("adapters/.damaged-*"))
    pd.testing.assert_frame_equal(first, again)  # retrained from the same seed: the same numbers


def test_negative_seeds_are_refused_like_the_2d_arms():
    with pytest.raises(ValueError, match="seed -1 is not allowed: seeds must be integers >= 0"):
        make_implicit_spec(model="x", seeds=(-1,))


def test_results_table_takes_the_best_k_in_1_to_16():
    rows = [dict(task="t", variant="holds", method="icl", shots=k, seed=s, accuracy=a)
            for k, accs in {0: (0.1, 0.3), 2: (0.5, 0.7), 32: (0.9, 0.9), 4: (0.4, 0.4)}.items()
            for s, a in enumerate(accs)]
    rows += [dict(task="t", variant="holds", method="full", shots=0, seed=s, accuracy=a)
             for s, a in enumerate((0.2, 0.4))]
    res = results_table(pd.DataFrame(rows)).iloc[0]
    assert res["base (K=0)"] == pytest.approx(0.2)
    assert res["ICL best-of-K"] == pytest.approx(0.6) and res["best K"] == 2  # K=32 is outside 1..16
    assert res["ICL max K"] == pytest.approx(0.9)
    assert res["SFT full"] == pytest.approx(0.3)


def test_circuit_shift_and_report(lora_run):
    from iclsft.implicit.circuits import compute_circuits
    from iclsft.report import build_report

    out, _, _ = lora_run
    table = compute_circuits(out, pairs=4, shots=2)
    assert set(table["state"]) == {"icl-K2", "lora"}
    assert set(table["task"]) == set(TASKS)
    for col in ("heads_cosine", "mlps_cosine"):
        assert table[col].between(0, 2).all()
    for col in ("heads_jaccard", "mlps_jaccard"):
        assert table[col].between(0, 1).all()
    # ICL changes the inputs of every component: its scores are not the base model's
    assert (table[table.state == "icl-K2"]["heads_cosine"] > 1e-6).all()
    before = {f: f.stat().st_mtime_ns for f in (out / "circuits").glob("*.npz")}
    again = compute_circuits(out, pairs=4, shots=2)
    assert {f: f.stat().st_mtime_ns for f in (out / "circuits").glob("*.npz")} == before  # reused
    pd.testing.assert_frame_equal(table, again)
    index = build_report(out)
    html = index.read_text()
    assert "Implicit patterns" in html and "Circuit shift" in html and "SFT lora" in html
    assert len(list(index.parent.glob("fig-*.png"))) == 2


def test_sweep_runs_the_suite(home, tiny_model_dir, tmp_path):
    from iclsft.sweep import SweepConfig, format_plan, run_sweep

    config = SweepConfig(out=str(tmp_path / "sw"), models=(str(tiny_model_dir),), tasks=(), methods=(),
                         engine="hf", executor=ExecutorSpec(name="local"), report=True,
                         implicit=dict(tasks=("relation",), methods=("icl",), shots=(0, 1), train_size=8,
                                       eval_size=4, circuits=False))
    assert "implicit-icl" in format_plan(config, "cpu")
    run_sweep(config)
    run = Path(config.out) / str(tiny_model_dir).strip("/").replace("/", "--") / "implicit"
    assert len(recompute_metrics(run)) == 4
    assert (run / "report" / "index.html").is_file()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="shot count 65"):
        make_implicit_spec(model="x", shots=(65,))
    with pytest.raises(ValueError):
        make_implicit_spec(model="x", tasks=("parity",))
    with pytest.raises(ValueError, match="takes no SFT"):
        from iclsft.implicit.spec import ImplicitSpec
        from iclsft.spec import ModelSpec, sft_spec

        ImplicitSpec(model=ModelSpec(name="m", fingerprint="f"), method="icl", sft=sft_spec("lora"))


@pytest.mark.parametrize("name", ["expression", "relation", "boolean", "code"])
def test_answers_have_the_tokens_they_have_inside_a_demo(name, smollm_tokenizer):
    """Scored labels and learned answers are token for token what the demos show after a question."""
    task = get_task(name)
    prompts = TaskPrompts(smollm_tokenizer, task)
    for item in task.generate(40, 5, "holds"):
        demo = prompts.encode(task.demo(item) + task.gap + task.query(item))
        start = len(prompts.query(item))
        assert demo[:start] == prompts.query(item)
        answer = prompts.answer_ids(item)
        assert demo[start: start + len(answer)] == answer
        if prompts.label_ids is not None:
            label = prompts.label_ids[prompts.answers.index(item.answer)]
            assert demo[start: start + len(label)] == label


# -- the original study's recipe (full fine-tuning, lr 1e-5, loss on every token, one mixed file) ---------
def test_loss_on_every_token_is_the_causal_lm_loss(tiny_model):
    """loss="all" against transformers' own causal-LM loss (labels = input ids: the mean next-token NLL
    over every token after the first), computed per example and averaged; "label" covers the answer only."""
    from iclsft.sft.train import label_nll, target_rows

    # positions of the logits that predict a token, for a 4-token prompt and a 2-token answer
    assert list(target_rows(4, 2, "all")) == [0, 1, 2, 3, 4]
    assert list(target_rows(4, 2, "label")) == [3, 4]
    with pytest.raises(ValueError, match="loss 'some' is not allowed"):
        target_rows(4, 2, "some")
    batch = [([1, 50, 60, 70], [80, 90]), ([1, 55], [66, 77, 88, 99, 111])]  # right-padded to one width
    with torch.no_grad():
        ours = label_nll(tiny_model, batch, pad_id=2, loss="all").item()
        hf = [tiny_model(input_ids=torch.tensor([p + a]), labels=torch.tensor([p + a])).loss.item() for p, a in batch]
        label_only = label_nll(tiny_model, batch[:1], pad_id=2, loss="label").item()
        logp = torch.log_softmax(tiny_model(torch.tensor([batch[0][0] + batch[0][1]])).logits[0].double(), -1)
    assert ours == pytest.approx(sum(hf) / 2, rel=1e-5)
    assert label_only == pytest.approx(-(logp[3, 80] + logp[4, 90]).item(), rel=1e-5)


def test_recipes_have_ids_of_their_own():
    """The original recipe's conditions share no id with the default recipe's; both are stored."""
    from iclsft.implicit.spec import ImplicitSpec
    from iclsft.spec import ModelSpec, sft_spec

    model = ModelSpec(name="m", fingerprint="f")
    full = ImplicitSpec(model=model, method="full", sft=sft_spec("full", epochs=1, min_steps=0),
                        tasks=("expression", "relation"), train_size=24, eval_size=6)
    assert full.model_dump(mode="json")["recipe"] == "ours" and full.arm == "implicit-full"
    original = full.model_copy(update={"recipe": "original"})
    assert not {c.id for c in original.conditions()} & {c.id for c in full.conditions()}
    with pytest.raises(ValueError, match="recipe 'original' is full fine-tuning, not method 'lora'"):
        make_implicit_spec(model="x", method="lora", recipe="original")
    with pytest.raises(ValueError, match="recipe 'theirs' is not allowed: choose one of ours, original"):
        make_implicit_spec(model="x", method="full", recipe="theirs")


def test_original_recipe_trains_one_model_for_every_task(home, tiny_model_dir, smollm_tokenizer, tmp_path):
    from iclsft.implicit.data import mixed_training_examples
    from iclsft.sft.adapters import MARKER
    from iclsft.sweep import SweepConfig, plan

    out = tmp_path / "run"
    spec, ref = make_implicit_spec(model=str(tiny_model_dir), method="full", recipe="original",
                                   executor=ExecutorSpec(name="local"), **SMALL)
    assert (spec.sft.method, spec.sft.lr, spec.sft.batch_size, spec.recipe) == ("full", 1e-5, 16, "original")
    run_spec(spec, out, ref, progress=False)
    stored = json.loads((out / "spec.json").read_text())["arms"]["implicit-full-original"]
    assert stored["recipe"] == "original" and stored["sft"]["lr"] == 1e-5 and stored["sft"]["method"] == "full"
    records = [json.loads(p.read_text()) for p in out.glob("conditions/*/record.json")]
    assert len(records) == len(TASKS) * 2 and {r["status"] for r in records} == {"ok"}
    assert len({r["checkpoint_dir"] for r in records}) == 1  # one model, scored on every task
    assert {r["task"] for r in records} == set(TASKS)
    for r in records:
        assert (r["method"], r["recipe"], r["loss_on"]) == ("full-original", "original", "all")
        assert r["mixture"] == ["expression", "boolean", "code"] and r["train_examples"] == 3 * 24
    (adapter,) = (out / "adapters").iterdir()
    marker = json.loads((adapter / MARKER).read_text())
    assert marker["loss_on"] == "all" and marker["examples"] == 72 and marker["total_steps"] == 5  # ceil(72/16)
    # the mixed file: each task's 24 training items, bare (BOS + question, no instruction), all together
    prompts = {name: TaskPrompts(smollm_tokenizer, get_task(name)) for name in TASKS}
    mixed = mixed_training_examples(prompts, ("expression", "boolean", "code"), 0, 24)
    bos = [smollm_tokenizer.bos_token_id] if prompts["code"].bos else []
    expect = [(bos + list(smollm_tokenizer(get_task(n).query(it), add_special_tokens=False)["input_ids"]),
               prompts[n].answer_ids(it)) for n in TASKS for it in train_items(get_task(n), 0, 24)]
    assert sorted(map(repr, mixed)) == sorted(map(repr, expect)) and mixed != expect  # shuffled together
    table = recompute_metrics(out)
    assert set(table["method"]) == {"full-original"} and set(table["recipe"]) == {"original"}
    assert "SFT full-original" in results_table(table).columns
    config = SweepConfig(out=str(tmp_path / "sw"), models=(str(tiny_model_dir),), tasks=(), methods=(),
                         engine="hf", implicit=dict(tasks=TASKS, methods=("icl",), recipes=("original",),
                                                    shots=(0,), train_size=24, eval_size=6))
    rows = {r["arm"]: r for r in plan(config)["rows"]}
    assert set(rows) == {"implicit-icl", "implicit-full-original"}  # ICL runs whatever the recipes
    assert rows["implicit-full-original"]["trainings"] == 1 and rows["implicit-full-original"]["train_steps"] == 5


def test_an_implicit_run_of_the_piecewise_prompts_is_refused(tmp_path):
    """Runs made before the prompts were natural (condition ids v1) scored other ids for relation,
    boolean and code: resuming one is refused, never mixed with new scores."""
    import json

    from iclsft.implicit.spec import ImplicitSpec
    from iclsft.spec import ModelSpec
    from iclsft.store import RunDir, SpecMismatchError

    spec = ImplicitSpec(model=ModelSpec(name="m", fingerprint="f"), method="icl", shots=(0, 2), train_size=24,
                        eval_size=6)
    run = RunDir(tmp_path / "run")
    run.open(spec)
    run.release_lock()
    stored = json.loads((tmp_path / "run" / "spec.json").read_text())
    stored["arms"][spec.arm]["hash_version"] = "v1"
    (tmp_path / "run" / "spec.json").write_text(json.dumps(stored))
    with pytest.raises(SpecMismatchError, match="made by another version of iclsft-eval"):
        RunDir(tmp_path / "run").open(spec)
