"""Prompts equal the natural tokenization of their text for four real tokenizer families (SPEC §4).

References are independent of the builder: the tokenizer called on the whole rendered text (with
the BOS rule), a plain forward of those ids, and the old piece-by-piece construction (each piece
tokenized alone), kept here to show that the default model's prompts did not change.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from logcapture import capture
from tokenizer_families import FAMILIES, load_tokenizer

from iclsft.arms.linear2d import training_examples
from iclsft.prompts import PromptBuilder, TokenizationError
from iclsft.spec import IclRunSpec, ModelSpec, TaskSpec, TemplateSpec
from iclsft.tasks.linear2d import exemplars
from iclsft.tokenizers_check import check_prompts, check_run, split_warning, token_counts

pytestmark = pytest.mark.usefixtures("one_thread")
TASK = TaskSpec(angle=30)
POINTS = [(0, 0), (12, 45), (99, 7), (3, 99), (50, 60)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, load_tokenizer(request.param)


def natural(tok, text: str, bos: bool) -> list[int]:
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    return ([tok.bos_token_id] if bos else []) + ids


def stream_text(shots: int, seed: int = 0) -> tuple[str, object]:
    ex = exemplars(TASK, seed, shots)
    names = TASK.labels
    return "".join(f"{a} {b} ->{names[y]}\n" for a, b, y in zip(ex.n1, ex.n2, ex.truth)), ex


# -- prompts equal the tokenizer on the whole text ---------------------------------------------------


@pytest.mark.parametrize("shots", [0, 1, 3, 10])
def test_prompts_are_the_natural_tokenization(family, shots):
    name, tok = family
    b = PromptBuilder(tok, TemplateSpec(), TASK.labels)
    adds_bos = name in ("llama2", "gemma3")  # the tokenizers' own defaults (this llama3 tokenizer.json adds none)
    assert b.bos == ([tok.bos_token_id] if adds_bos else [])
    text, ex = stream_text(shots) if shots else ("", None)
    prefix = b.prefix(ex.n1, ex.n2, ex.truth) if shots else b.start()
    queries = b.queries_after(prefix, [p[0] for p in POINTS], [p[1] for p in POINTS])
    for (a, c), q in zip(POINTS, queries):
        assert prefix + q == natural(tok, f"{text}{a} {c} ->", adds_bos)
        for y, label in enumerate(TASK.labels):
            assert prefix + q + b.label_ids[y] == natural(tok, f"{text}{a} {c} ->{label}", adds_bos)


def test_prefix_at_k_is_a_token_prefix_of_larger_k(family):
    _, tok = family
    b = PromptBuilder(tok, TemplateSpec(), TASK.labels)
    ex = exemplars(TASK, 0, 20)
    big = b.prefix(ex.n1, ex.n2, ex.truth)
    for shots in (1, 2, 10):
        small = exemplars(TASK, 0, shots)
        ids = b.prefix(small.n1, small.n2, small.truth)
        assert len(ids) < len(big) and big[: len(ids)] == ids


def test_llama2_pieces_alone_gain_a_dummy_prefix():
    # the case: each separately tokenized piece gains "▁" (two exemplars and a query: 23 ids, not 21)
    tok = load_tokenizer("llama2")
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    old = enc("12 45 ->") + enc(" Baz") + enc("\n") + enc("3 7 ->") + enc(" Rud") + enc("\n") + enc("50 60 ->")
    want = enc("12 45 -> Baz\n3 7 -> Rud\n50 60 ->")
    assert (len(old), len(want)) == (26, 22)  # this text (ours has 3-digit-free values): 4 extra "▁"
    b = PromptBuilder(tok, TemplateSpec(bos="never"), TASK.labels)
    built = b.prefix([12, 3], [45, 7], [0, 1]) + b.query(50, 60)
    assert built == want
    assert tok.convert_ids_to_tokens(b.query(3, 7)) == ["3", "▁", "7", "▁->"]
    assert tok.convert_ids_to_tokens(b.query(3, 7, first=True)) == ["▁", "3", "▁", "7", "▁->"]
    assert [tok.convert_ids_to_tokens(ids) for ids in b.label_ids] == [["▁B", "az"], ["▁Rud"]]


def test_separator_of_two_newlines_is_tokenized_in_context(smollm_tokenizer):
    # SmolLM2 writes "\n\n" as one token at the end of a text but as two before a word
    tok = smollm_tokenizer
    b = PromptBuilder(tok, TemplateSpec(exemplar="{x1} {x2} ->{label}\n\n"), TASK.labels)
    ids = b.prefix([1, 2], [3, 4], [0, 1]) + b.query(5, 6)
    assert ids == natural(tok, "1 3 -> Baz\n\n2 4 -> Rud\n\n5 6 ->", False)
    assert tok.convert_ids_to_tokens(b.separators[0]) == ["Ċ", "Ċ"]


# -- the default model's prompts did not change -----------------------------------------------------


def old_builder_ids(tok, template: TemplateSpec, shots: int, seed: int, points):
    """The construction before natural tokenization: every piece tokenized on its own."""
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
    bos = [tok.bos_token_id] if template.bos == "always" else []
    start = bos + enc(template.header)
    labels = [enc(x) for x in TASK.labels]
    query = lambda a, c: enc(template.query.format(x1=a, x2=c))  # noqa: E731
    ex = exemplars(TASK, seed, shots)
    prefix = start + [t for a, c, y in zip(ex.n1, ex.n2, ex.truth) for t in query(a, c) + labels[y] + enc("\n")]
    return prefix, [query(a, c) for a, c in points], labels, [(start + query(a, c), labels[y])
                                                               for a, c, y in zip(ex.n1, ex.n2, ex.truth)]


@pytest.mark.parametrize("template", [TemplateSpec(), TemplateSpec(header="Classify each point.\n", bos="always")])
def test_default_model_prompts_unchanged(smollm_tokenizer, template):
    tok = smollm_tokenizer
    grid = [(a, c) for a in range(0, 100, 9) for c in range(0, 100, 11)]
    b = PromptBuilder(tok, template, TASK.labels)
    for shots in (1, 2, 5, 10, 50):
        for seed in (0, 3):
            prefix, queries, labels, examples = old_builder_ids(tok, template, shots, seed, grid)
            ex = exemplars(TASK, seed, shots)
            new_prefix = b.prefix(ex.n1, ex.n2, ex.truth)
            assert new_prefix == prefix
            assert b.queries_after(new_prefix, [p[0] for p in grid], [p[1] for p in grid]) == queries
            assert b.queries_after(b.start(), [p[0] for p in grid], [p[1] for p in grid]) == queries
            assert b.label_ids == labels
            assert training_examples(b, ex) == examples
    assert b.label_ids == [[389, 1437], [20729]]  # hand-checked facts of tests/test_prompts.py


def test_the_chat_template_enters_the_condition_id_and_every_field_is_stored():
    # version v3 (iclsft.versions): no field is left out of stored specs or ids at its default
    model = ModelSpec(name="smollm2-135m", fingerprint="abc")
    spec = IclRunSpec(tasks=(TaskSpec(angle=45),), model=model, shots=(1, 5))
    assert [c.id[:3] for c in spec.conditions()] == ["v3-", "v3-"]
    stored = spec.model_dump(mode="json")
    assert stored["template"]["chat"] is False and stored["tokens"] is None and stored["hash_version"] == "v3"
    chat = spec.model_copy(update={"template": TemplateSpec(chat=True)})
    assert chat.conditions()[0].id != spec.conditions()[0].id


# -- scores against a naive forward of the natural tokenization ---------------------------------------


def test_hf_scores_equal_naive_forward(family):
    from conftest import make_tiny_llama

    from iclsft.engine.hf import HFEngine

    name, tok = family
    torch.manual_seed(0)
    model = make_tiny_llama(len(tok))
    b = PromptBuilder(tok, TemplateSpec(), TASK.labels)
    adds_bos = bool(b.bos)
    points = POINTS[:4]
    for shots in (0, 3):
        text, ex = stream_text(shots) if shots else ("", None)
        prefix = b.prefix(ex.n1, ex.n2, ex.truth) if shots else b.start()
        got = HFEngine(model, token_budget=64, progress=False).score(
            prefix, b.queries_after(prefix, [p[0] for p in points], [p[1] for p in points]), b.label_ids)
        want = np.zeros_like(got)
        with torch.no_grad():
            for i, (a, c) in enumerate(points):
                for y, label in enumerate(TASK.labels):
                    context = natural(tok, f"{text}{a} {c} ->", adds_bos)
                    full = natural(tok, f"{text}{a} {c} ->{label}", adds_bos)
                    lp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
                    want[i, y] = sum(lp[t - 1, full[t]].item() for t in range(len(context), len(full)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{name} K={shots}")


# -- SFT examples ------------------------------------------------------------------------------------


def test_sft_examples_match_icl_prompts(family):
    name, tok = family
    b = PromptBuilder(tok, TemplateSpec(), TASK.labels)
    ex = exemplars(TASK, 0, 4)
    examples = training_examples(b, ex)
    prefix = b.prefix(ex.n1, ex.n2, ex.truth)
    pos = len(b.start())
    for i, ((prompt, label), a, c, y) in enumerate(zip(examples, ex.n1, ex.n2, ex.truth)):
        # the example is the natural tokenization of its own text: the K=0 prompt it is scored with
        assert prompt + label == natural(tok, f"{a} {c} ->{TASK.labels[y]}", bool(b.bos))
        assert prompt == b.start() + b.queries_after(b.start(), [a], [c])[0]
        body = prompt[len(b.start()):] + label
        inside = prefix[pos: pos + len(body)]
        if i == 0 or name != "llama2":
            assert inside == body  # token for token the exemplar in the ICL prompt
        else:  # dummy prefix: a text's first piece starts with "▁", an exemplar after "\n" does not
            assert tok.convert_ids_to_tokens(body[:1]) == ["▁"] and inside[: len(body) - 1] == body[1:]
            body = body[1:]
        pos += len(body) + len(b.separators[y])
    assert pos == len(prefix)


# -- the run-start check and token counts ------------------------------------------------------------


def test_check_passes_for_every_family(family):
    _, tok = family
    b = PromptBuilder(tok, TemplateSpec(), TASK.labels)
    assert check_prompts(b, TASK, shots=40) == 2 * 20 * 3  # (K=40, K=0) x 20 queries x (query, 2 labels)


def test_check_names_the_first_difference(monkeypatch):
    tok = load_tokenizer("llama2")
    b = PromptBuilder(tok, TemplateSpec(), TASK.labels)
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    # the old construction of queries: each tokenized alone, so with a dummy-prefix "▁" after "\n"
    monkeypatch.setattr(b, "queries_after", lambda prefix, n1, n2: [enc(f"{a} {c} ->") for a, c in zip(n1, n2)])
    ex = exemplars(TASK, 0, 2)
    pos = len(b.prefix(ex.n1, ex.n2, ex.truth))
    with pytest.raises(TokenizationError) as info:
        check_prompts(b, TASK, shots=2)
    message = str(info.value)
    assert f"first difference at token {pos} of " in message
    assert "built from pieces ['▁->', '▁B', 'az', '<0x0A>', '▁'" in message  # the stray "▁" after the newline


def test_label_merging_with_the_query_is_refused():
    tok = load_tokenizer("llama3")
    with pytest.raises(TokenizationError, match="first difference at token"):  # ":" and "Baz" become ":Baz"
        PromptBuilder(tok, TemplateSpec(query="{x1} {x2}:", exemplar="{x1} {x2}:{label}\n"), ("Baz", "Rud"))


@pytest.mark.parametrize(("name", "low", "high", "mean", "labels"), [
    ("llama2", 1, 2, 1.9, (2, 1)), ("llama3", 1, 1, 1.0, (1, 1)), ("qwen3", 1, 2, 1.9, (1, 1)),
    ("gemma3", 1, 2, 1.9, (1, 1)),
])
def test_token_counts(name, low, high, mean, labels):
    tok = load_tokenizer(name)
    counts = token_counts(PromptBuilder(tok, TemplateSpec(), TASK.labels), TASK)
    got = (counts.integer_min, counts.integer_max, counts.integer_mean, counts.label_tokens)
    assert got == (low, high, mean, labels)
    assert (split_warning(counts) is None) == (high == 1)


def test_check_run_records_counts_and_warns(smollm_tokenizer):
    from iclsft.prompts import prompt_builders

    spec = IclRunSpec(tasks=(TaskSpec(angle=45), TaskSpec(angle=30, name="semantic")),
                      model=ModelSpec(name="smollm2-135m", fingerprint="abc"), shots=(1, 5))
    logged = []
    with capture(logged):
        out = check_run(spec, prompt_builders(smollm_tokenizer, spec.template, spec.tasks))
    assert [c.id for c in out.conditions()] == [c.id for c in spec.conditions()]
    assert out.identity() == spec.identity()
    numbers = next(t for t in out.tokens if t.words is None)
    assert (numbers.integer_min, numbers.integer_max, numbers.integer_mean) == (1, 2, 1.9)  # digits split singly
    assert any(line.startswith("warning: ") and "integers 0..99 into 1-2 tokens" in line for line in logged)
    assert any("the sentiment words into" in line and "one token per word" in line for line in logged)
    assert out.model_dump(mode="json")["tokens"][0]["label_tokens"] == [2, 1]


# -- chat templates ----------------------------------------------------------------------------------


def test_chat_template_qwen3():
    tok = load_tokenizer("qwen3")
    b = PromptBuilder(tok, TemplateSpec(chat=True), TASK.labels)
    text, ex = stream_text(3)
    prefix = b.prefix(ex.n1, ex.n2, ex.truth)
    for pre, body in ((prefix, text), (b.start(), "")):
        queries = b.queries_after(pre, [12, 99], [45, 7])
        for (a, c), q in zip([(12, 45), (99, 7)], queries):
            rendered = tok.apply_chat_template([{"role": "user", "content": f"{body}{a} {c} ->"}],
                                               add_generation_prompt=True, tokenize=False)
            assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
            for y, label in enumerate(TASK.labels):
                assert pre + q + b.label_ids[y] == natural(tok, rendered + label, False)
    assert check_prompts(b, TASK, shots=10) == 120


def test_chat_needs_a_chat_template():
    with pytest.raises(ValueError, match="no chat_template"):
        PromptBuilder(load_tokenizer("llama2"), TemplateSpec(chat=True), TASK.labels)
    with pytest.raises(ValueError, match="bos 'auto'"):
        TemplateSpec(chat=True, bos="always")
