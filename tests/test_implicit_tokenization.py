"""The implicit suite's prompts equal the natural tokenization of their text (SPEC §4; issue 17).

References are independent of `TaskPrompts`: the tokenizer called on the text that
`ImplicitTask.prompt` renders (with each family's own BOS default, written out here), a plain
forward and transformers' greedy `generate` on those ids, and the construction before this change
(every piece tokenized on its own), copied below to show what changed for the default model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizer_families import FAMILIES, load_tokenizer, tiny_model_dir

from iclsft.implicit.data import (
    TaskPrompts,
    check_prompts,
    demo_stream,
    derived_seed,
    eval_items,
    mixed_training_examples,
    train_items,
)
from iclsft.prompts import TokenizationError
from iclsft.tasks.implicit import TASKS, get_task

pytestmark = pytest.mark.usefixtures("one_thread")
ADDS_BOS = {"llama2": True, "llama3": False, "qwen3": False, "gemma3": True}  # each tokenizer's own default
NL, NLNL = 198, 1116  # SmolLM2's "Ċ" and "ĊĊ" (hand-checked with convert_tokens_to_ids)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, load_tokenizer(request.param)


def natural(tok, text: str, bos: bool) -> list[int]:
    return ([tok.bos_token_id] if bos else []) + list(tok(text, add_special_tokens=False)["input_ids"])


class OldTaskPrompts:
    """The construction before natural tokenization (HEAD 2d4e17a, iclsft/implicit/data.py): each
    piece tokenized on its own and concatenated."""

    def __init__(self, tokenizer, task):
        self.tokenizer, self.task = tokenizer, task
        probe = tokenizer("1", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.start = self.bos + self.encode(task.instruction + "\n" + task.gap)
        self.label_ids = [self.encode(label) for label in task.labels] if task.labels else None

    def encode(self, text):
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prefix(self, demos):
        return self.start + self.encode("".join(self.task.demo(d) + self.task.gap for d in demos))

    def query(self, item):
        return self.encode(self.task.query(item))

    def answer_ids(self, item):
        ids = self.encode(self.task.answer_prefix + item.answer + "\n" + self.task.gap + "x")
        for i, tok in enumerate(ids):
            if "\n" in self.tokenizer.decode([tok]):
                return ids[: i + 1]
        raise ValueError("no newline")

    def training_examples(self, items):
        return [(self.start + self.query(it), self.answer_ids(it)) for it in items]

    def bare_examples(self, items):
        return [(self.bos + self.query(it), self.answer_ids(it)) for it in items]


# -- the default model: what changed, exactly ---------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_default_model_ids_unchanged_but_the_blank_line(name, smollm_tokenizer):
    """SmolLM2: queries, labels, answers and bare (original-recipe) examples are the old ids for every
    variant and seed; so are the prefixes of expression. The tasks with a blank line after the
    instruction and each demo (relation, boolean, code) had it as one token "ĊĊ" where the old pieces
    ended (the start, and the demos at K > 0: SmolLM2 writes "\\n\\n" so at the end of a text);
    before a word, as in the prompt's text, SmolLM2 writes "Ċ", "Ċ". So those one or two tokens of
    every prefix (K = 0 included, so also of the SFT examples of recipe "ours") are now two each,
    and nothing else changed."""
    tok = smollm_tokenizer
    task = get_task(name)
    new, old = TaskPrompts(tok, task), OldTaskPrompts(tok, task)
    assert new.label_ids == old.label_ids and new.bos == old.bos == []
    faithful = (False, True) if name != "code" else (False,)
    for seed in (0, 1):
        for f in faithful:
            for variant in ("holds", "broken"):
                items = eval_items(task, variant, seed, 30, 40, f)
                assert new.queries(items) == [old.query(it) for it in items]
            train = train_items(task, seed, 40, f)
            assert new.bare_examples(train) == old.bare_examples(train)
            examples, before = new.training_examples(train), old.training_examples(train)
            assert [a for _, a in examples] == [a for _, a in before]
            stream = demo_stream(task, seed, f)
            for shots in (0, 1, 2, 4, 8, 16, 32, 64):
                ids, was = new.prefix(stream[:shots]), old.prefix(stream[:shots])
                if task.gap:  # "ĊĊ" after the instruction and (K > 0) after the last demo, "Ċ", "Ċ" in the text
                    n = len(old.start)
                    assert old.start[-1] == NLNL and was[-1] == NLNL
                    fixed = old.start[:-1] + [NL, NL] + was[n:]
                    assert ids == (fixed[:-1] + [NL, NL] if shots else fixed)
                    assert was != natural(tok, new.prefix_text(stream[:shots]) + new.sample, False)[: len(was)]
                else:
                    assert ids == was
            if task.gap:
                assert [p for p, _ in examples] == [old.start[:-1] + [NL, NL] + p[len(old.start):] for p, _ in before]
            else:
                assert examples == before
    if name == "expression":  # hand-checked: "6\n" is "6", "Ċ"; the start ends with "Ċ" (gap "")
        assert tok.convert_ids_to_tokens(new.label_ids[6]) == ["6", "Ċ"] and new.start[-1] == NL


def test_default_model_mixed_training_file_unchanged(smollm_tokenizer):
    """The original recipe's one training file (bare examples of every task, shuffled) is the old one."""
    prompts = {n: TaskPrompts(smollm_tokenizer, get_task(n)) for n in TASKS}
    olds = {n: OldTaskPrompts(smollm_tokenizer, get_task(n)) for n in TASKS}
    got = mixed_training_examples(prompts, tuple(TASKS), 3, 50)
    rng = np.random.default_rng(derived_seed("mixture", list(TASKS), 3))
    want = [ex for n in TASKS for ex in olds[n].bare_examples(train_items(get_task(n), 3, 50))]
    order = np.argsort(rng.random(len(want)), kind="stable")
    assert got == [want[i] for i in order] and len(got) == 200


# -- every family: prompts, prefixes, SFT examples ----------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_prompts_are_the_natural_tokenization(family, name):
    fam, tok = family
    task = get_task(name)
    p = TaskPrompts(tok, task)
    assert p.bos == ([tok.bos_token_id] if ADDS_BOS[fam] else [])
    items = eval_items(task, "holds", 0, 4, 24) + eval_items(task, "broken", 0, 4, 24)
    for shots in (0, 1, 3, 8):
        demos = demo_stream(task, 0)[:shots]
        prefix = p.prefix(demos)
        for item, query in zip(items, p.queries(items)):
            text = task.prompt(demos, item)
            assert prefix + query == natural(tok, text, ADDS_BOS[fam]), (fam, name, shots)
            for label, ids in zip(task.labels or (), p.label_ids or ()):
                assert prefix + query + ids == natural(tok, text + label, ADDS_BOS[fam]), (fam, name, shots, label)
    if fam == "llama2":  # the case: alone, each question gains a dummy-prefix "▁" it has not in a prompt
        alone = list(tok(task.query(items[0]), add_special_tokens=False)["input_ids"])
        assert alone != p.query(items[0]) and tok.convert_ids_to_tokens(alone[:1])[0].startswith("▁")


def test_prefix_at_k_is_a_token_prefix_of_larger_k(family):
    _, tok = family
    for name in TASKS:
        p = TaskPrompts(tok, get_task(name))
        stream = demo_stream(p.task, 2)
        big = p.prefix(stream[:32])
        for shots in (0, 1, 2, 8, 16):
            ids = p.prefix(stream[:shots])
            assert len(ids) < len(big) and big[: len(ids)] == ids


@pytest.mark.parametrize(("fam", "tokens"), [
    ("llama2", ["▁True", "<0x0A>"]), ("llama3", ["ĠTrue", "ĊĊ"]), ("qwen3", ["ĠTrue", "ĊĊ"]),
    ("gemma3", ["▁True", "\n\n"]),
])
def test_answers_end_with_the_newline_as_a_demo_has_it(fam, tokens):
    # hand-checked: the answer's first newline token, merged with the blank line where the family does
    tok = load_tokenizer(fam)
    p = TaskPrompts(tok, get_task("relation"))
    item = next(it for it in train_items(p.task, 0, 10) if it.answer == "True")
    assert tok.convert_ids_to_tokens(p.answer_ids(item)) == tokens
    assert tok.convert_ids_to_tokens(p.label_ids[0]) == tokens[:1]  # the scored label: " True" alone


@pytest.mark.parametrize("name", list(TASKS))
def test_sft_examples_are_the_items_as_scored_prompts_show_them(family, name):
    fam, tok = family
    task = get_task(name)
    p = TaskPrompts(tok, task)
    train = train_items(task, 0, 6)
    head = task.instruction + "\n" + task.gap
    prefix = p.prefix(train)  # the training items as the demos of one ICL prompt
    pos = len(p.start)
    for i, ((prompt, answer), (bare, bare_answer)) in enumerate(zip(p.training_examples(train),
                                                                    p.bare_examples(train))):
        item, nxt = train[i], train[(i + 1) % len(train)]
        # recipe "ours": the K=0 prompt the model is scored with, then the answer's tokens up to its newline
        assert prompt == p.start + p.queries([item])[0]
        assert prompt + answer == natural(tok, head + task.demo(item) + task.gap + nxt.question,
                                          ADDS_BOS[fam])[: len(prompt) + len(answer)]
        body = prompt[len(p.start):] + answer
        assert prefix[pos: pos + len(body)] == body  # token for token the item as a demo inside the prompt
        assert "\n" in tok.decode(answer[-1:]) and "\n" not in tok.decode(answer[:-1])
        # recipe "original": the bare text on its own (no instruction)
        assert bare + bare_answer == natural(tok, task.demo(item) + task.gap + nxt.question,
                                             ADDS_BOS[fam])[: len(bare) + len(bare_answer)]
        assert bare_answer == answer and bare[len(p.bos) + 1:] == prompt[len(p.start) + 1:]
        first, inside = tok.convert_ids_to_tokens([bare[len(p.bos)], prompt[len(p.start)]])
        # a text's first piece gets the dummy prefix "▁" (Llama-2) that it has not after a newline
        assert first == ("▁" + inside if fam == "llama2" else inside)
        pos += len(p.demos([item])[0])
    assert pos == len(prefix)


# -- the run-start check ------------------------------------------------------------------------------


def test_check_passes_for_every_family(family):
    _, tok = family
    counts = {name: check_prompts(TaskPrompts(tok, get_task(name)), 0, 32) for name in TASKS}
    # (K=32, K=0) x 16 items x (query + each label), + 8 examples x 2 recipes
    assert counts == {"expression": 2 * 16 * 12 + 16, "relation": 2 * 16 * 3 + 16, "boolean": 2 * 16 * 3 + 16,
                      "code": 2 * 16 + 16}
    assert check_prompts(TaskPrompts(tok, get_task("relation")), 1, 0, faithful=True) == 16 * 3 + 16


def test_check_names_the_first_difference(monkeypatch):
    tok = load_tokenizer("llama2")
    p = TaskPrompts(tok, get_task("expression"))
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    # the old construction of queries: each tokenized alone, so with a dummy-prefix "▁" after "\n"
    monkeypatch.setattr(p, "queries", lambda items: [enc(p.task.query(it)) for it in items])
    pos = len(p.prefix(demo_stream(p.task, 0)[:2]))
    with pytest.raises(TokenizationError) as info:
        check_prompts(p, 0, 2)
    message = str(info.value)
    assert message.startswith("task 'expression': prompts cannot equal this tokenizer's tokenization of their "
                              "text (2 demos, question '(")
    assert f"first difference at token {pos} of " in message
    assert "built from pieces ['" in message and "'<0x0A>', '▁('" in message  # the stray "▁" after the newline


def test_pieces_that_merge_are_refused():
    tok = load_tokenizer("llama3")
    relation = get_task("relation")
    with pytest.raises(TokenizationError, match=r"makes one token \['ĠA'\] of ' A' across the boundary"):
        TaskPrompts(tok, dataclasses.replace(relation, gap=" "))  # the gap's space joins the next question
    with pytest.raises(TokenizationError, match="merges 'land' into the text before it .* 'Ġisland'"):
        TaskPrompts(tok, dataclasses.replace(relation, labels=("land", "sue"), answer_prefix=""))


# -- scores and generations on a tiny model with the Llama-2 tokenizer --------------------------------


@pytest.fixture(scope="module")
def llama2_run(tmp_path_factory):
    from iclsft.arms import make_implicit_spec
    from iclsft.graph.driver import run_spec

    mp = pytest.MonkeyPatch()
    mp.setenv("ICLSFT_HOME", str(tmp_path_factory.mktemp("home")))
    model_dir = tiny_model_dir("llama2", tmp_path_factory.mktemp("llama2-tiny"))
    out = tmp_path_factory.mktemp("implicit-llama2") / "run"
    spec, ref = make_implicit_spec(model=str(model_dir), method="icl", shots=(0, 2),
                                   tasks=("expression", "relation", "code"), seeds=(0,), train_size=16, eval_size=4)
    run_spec(spec, out, ref, progress=False)
    yield out, model_dir
    mp.undo()


def test_llama2_closed_label_scores_equal_a_naive_forward(llama2_run):
    from transformers import AutoModelForCausalLM

    out, model_dir = llama2_run
    tok = load_tokenizer("llama2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name in ("expression", "relation"):
        task = get_task(name)
        for shots in (0, 2):
            cdir = next((out / "conditions").glob(f"{name}-broken-icl-K{shots}-*"))
            scores = pd.read_parquet(cdir / "scores.parquet")
            items = eval_items(task, "broken", 0, 4, 16)
            assert list(scores["question"]) == [it.question for it in items]
            for i, item in enumerate(items):
                text = task.prompt(demo_stream(task, 0)[:shots], item)
                context = natural(tok, text, True)
                for j, label in enumerate(task.labels):
                    full = natural(tok, text + label, True)
                    with torch.no_grad():
                        lp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
                    want = sum(lp[t - 1, full[t]].item() for t in range(len(context), len(full)))
                    assert scores[f"lp_{j}"][i] == pytest.approx(want, abs=1e-4), (name, shots, i, label)


def test_llama2_generation_equals_transformers_greedy_on_the_natural_ids(llama2_run):
    from transformers import AutoModelForCausalLM

    out, model_dir = llama2_run
    tok = load_tokenizer("llama2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    task = get_task("code")
    stop = {t for t in tok.get_vocab().values() if "\n" in tok.decode([t])}
    cdir = next((out / "conditions").glob("code-holds-icl-K2-*"))
    scores = pd.read_parquet(cdir / "scores.parquet")
    for i, item in enumerate(eval_items(task, "holds", 0, 4, 16)):
        ids = torch.tensor([natural(tok, task.prompt(demo_stream(task, 0)[:2], item), True)])
        with torch.no_grad():
            full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  pad_token_id=2)[0, ids.shape[1]:].tolist()
        new = full[: next((k for k, t in enumerate(full) if t in stop), len(full))]
        assert scores["prediction"][i] == tok.decode(new).strip()


def test_run_refuses_prompts_that_are_not_natural_before_writing(monkeypatch, tmp_path):
    from iclsft.arms import make_implicit_spec
    from iclsft.graph.driver import run_spec

    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    model_dir = tiny_model_dir("llama2", tmp_path / "model")
    enc = lambda self, items: [list(self.tokenizer(self.task.query(it), add_special_tokens=False)["input_ids"])  # noqa: E731
                               for it in items]
    monkeypatch.setattr(TaskPrompts, "queries", enc)  # the old, piece-by-piece queries
    spec, ref = make_implicit_spec(model=str(model_dir), method="icl", shots=(0, 2), tasks=("boolean",),
                                   seeds=(0,), train_size=16, eval_size=4)
    with pytest.raises(TokenizationError, match=r"task 'boolean': .* \(2 demos, .*first difference at token"):
        run_spec(spec, tmp_path / "run", ref, progress=False)
    assert not (tmp_path / "run" / "spec.json").exists()
