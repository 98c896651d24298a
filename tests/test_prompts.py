"""Tests for prompt construction as token ids (SPEC §4) with the real SmolLM2 tokenizer.

Known facts about this tokenizer, asserted where they matter: digits are single tokens, " Baz" is two
tokens [389, 1437], " Rud" is one [20729], and its BOS (id 1, "<|im_start|>") is not added by default.
"""

from __future__ import annotations

import pytest

from iclsft.prompts import PromptBuilder, check_labels
from iclsft.spec import TaskSpec, TemplateSpec
from iclsft.tasks.linear2d import exemplars

BOS = 1
BAZ = [389, 1437]
RUD = [20729]


@pytest.fixture(scope="module")
def tok(smollm_tokenizer):
    return smollm_tokenizer


def enc(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def builder(tok, labels=(" Baz", " Rud"), **template) -> PromptBuilder:
    return PromptBuilder(tok, TemplateSpec(**template), labels)


def stream_prefix(b: PromptBuilder, shots: int, seed: int = 0) -> list[int]:
    ex = exemplars(TaskSpec(angle=30), seed, shots)
    return b.prefix(ex["n1"], ex["n2"], ex["truth"])


# -- rendering ---------------------------------------------------------------------------------


def test_tokenizer_facts(tok):
    assert enc(tok, " Baz") == BAZ
    assert enc(tok, " Rud") == RUD
    assert tok.bos_token_id == BOS and tok.bos_token == "<|im_start|>"
    assert tok("1", add_special_tokens=True)["input_ids"][0] != BOS
    assert len(enc(tok, "1234")) == 4  # digits are split individually


def test_label_ids(tok):
    b = builder(tok)
    assert b.label_ids == [BAZ, RUD]


def test_exemplar_renders_exact_text(tok):
    b = builder(tok)
    ids = b.exemplar(12, 45, 0)
    assert b.text(ids) == "12 45 -> Baz\n"
    assert ids == enc(tok, "12 45 ->") + BAZ + enc(tok, "\n")
    assert b.text(b.exemplar(3, 0, 1)) == "3 0 -> Rud\n"
    assert b.text(b.exemplar(99, 7, 0)) == "99 7 -> Baz\n"


def test_query_is_a_prefix_of_the_exemplar(tok):
    b = builder(tok)
    q = b.query(12, 45)
    assert q == enc(tok, "12 45 ->")
    assert b.text(q) == "12 45 ->"
    for label in (0, 1):
        ex = b.exemplar(12, 45, label)
        assert ex[: len(q)] == q
        assert ex[len(q) : len(q) + len(b.label_ids[label])] == b.label_ids[label]
    assert b.queries([12, 3], [45, 0]) == [q, enc(tok, "3 0 ->")]


def test_prefix_is_concatenation_of_exemplars(tok):
    b = builder(tok)
    ex = exemplars(TaskSpec(angle=30), 0, 3)
    prefix = b.prefix(ex["n1"], ex["n2"], ex["truth"])
    expected = []
    for a, c, y in zip(ex["n1"], ex["n2"], ex["truth"], strict=True):
        expected += b.exemplar(a, c, y)
    assert prefix == expected
    assert b.text(prefix) == stream_text(3)


def test_prefix_at_k_is_token_prefix_at_larger_k(tok):
    b = builder(tok)
    big = stream_prefix(b, 25)
    for shots in (1, 2, 10, 24):
        small = stream_prefix(b, shots)
        assert 0 < len(small) < len(big)
        assert big[: len(small)] == small


def test_labels_follow_swap(tok):
    b = builder(tok, labels=(" Rud", " Baz"))
    assert b.text(b.exemplar(1, 2, 0)) == "1 2 -> Rud\n"


# -- BOS and header ----------------------------------------------------------------------------


def test_bos_auto_follows_tokenizer(tok):
    b = builder(tok, bos="auto")
    assert b.bos == []
    prefix = stream_prefix(b, 3)
    assert BOS not in prefix
    assert prefix == stream_prefix(builder(tok, bos="never"), 3)


def test_bos_always(tok):
    b = builder(tok, bos="always")
    prefix = stream_prefix(b, 3)
    assert prefix[0] == BOS
    assert prefix.count(BOS) == 1
    assert prefix[1:] == stream_prefix(builder(tok, bos="never"), 3)
    assert b.prefix([], [], []) == [BOS]


def test_bos_never(tok):
    b = builder(tok, bos="never")
    assert b.start() == []
    assert BOS not in stream_prefix(b, 3)


@pytest.mark.parametrize("bos", ["always", "never", "auto"])
def test_header_after_bos_before_first_exemplar(tok, bos):
    header = "Classify each point.\n"
    b = builder(tok, header=header, bos=bos)
    h = enc(tok, header)
    lead = [BOS] if bos == "always" else []
    assert b.start() == lead + h
    prefix = stream_prefix(b, 2)
    assert prefix[: len(lead) + len(h)] == lead + h
    assert prefix[len(lead) + len(h) :] == stream_prefix(builder(tok, bos="never"), 2)
    assert b.text(prefix[len(lead) :]).startswith(header + stream_text(2))


def stream_text(shots: int) -> str:
    ex = exemplars(TaskSpec(angle=30), 0, shots)
    names = [" Baz", " Rud"]
    return "".join(f"{a} {c} ->{names[y]}\n" for a, c, y in zip(ex["n1"], ex["n2"], ex["truth"], strict=True))


def test_header_holding_bos_with_bos_always_is_an_error(tok):
    b = builder(tok, header="<|im_start|>Classify.\n", bos="always")
    with pytest.raises(ValueError, match="at most one is allowed"):
        stream_prefix(b, 2)
    with pytest.raises(ValueError, match="at most one is allowed"):
        b.prefix([], [], [])


@pytest.mark.parametrize("bos", ["never", "auto"])
def test_header_with_two_bos_is_an_error_whatever_the_bos_mode(tok, bos):
    b = builder(tok, header="<|im_start|><|im_start|>Classify.\n", bos=bos)
    with pytest.raises(ValueError, match="BOS"):
        stream_prefix(b, 2)


@pytest.mark.parametrize("bos", ["never", "auto"])
def test_header_with_one_bos_is_allowed_when_builder_adds_none(tok, bos):
    b = builder(tok, header="<|im_start|>Classify.\n", bos=bos)
    prefix = stream_prefix(b, 2)
    assert prefix[0] == BOS and prefix.count(BOS) == 1


# -- labels ------------------------------------------------------------------------------------


def test_multi_token_labels_are_kept_whole(tok):
    b = builder(tok, labels=(" Bazooka", " Rud"))
    assert b.label_ids[0] == enc(tok, " Bazooka")
    assert len(b.label_ids[0]) == 4
    assert b.text(b.exemplar(5, 6, 0)) == "5 6 -> Bazooka\n"


@pytest.mark.parametrize(("short", "long"), [(" B", " Baz"), (" Baz", " Bazel"), (" Rud", " Rudolph")])
@pytest.mark.parametrize("swap", [False, True])
def test_ambiguous_label_pair(tok, short, long, swap):
    s, lg = enc(tok, short), enc(tok, long)
    assert len(s) < len(lg) and lg[: len(s)] == s  # really a token prefix for this tokenizer
    labels = (long, short) if swap else (short, long)
    with pytest.raises(ValueError, match="ambiguous") as info:
        builder(tok, labels=labels)
    assert repr(short) in str(info.value) and repr(long) in str(info.value)


def test_labels_sharing_first_token_are_fine(tok):
    # " Bazaar" [389, 15540, 280] and " Bazinga" [389, 4750, 81] share 389 but neither is a prefix
    a, c = enc(tok, " Bazaar"), enc(tok, " Bazinga")
    assert a[0] == c[0] and a[1] != c[1]
    b = builder(tok, labels=(" Bazaar", " Bazinga"))
    assert b.label_ids == [a, c]


def test_identical_labels_are_an_error(tok):
    with pytest.raises(ValueError):
        builder(tok, labels=(" Baz", " Baz"))
    with pytest.raises(ValueError, match="ambiguous"):
        check_labels([" Baz", " Baz"], [BAZ, BAZ])


def test_label_without_tokens_is_an_error(tok):
    with pytest.raises(ValueError, match="no tokens"):
        builder(tok, labels=("", " Rud"))


# -- malformed templates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({"exemplar": "{x1} {x2 ->{label}\n"}, "malformed"),
        ({"exemplar": "{x1},{x2} ->{label}\n"}, "must be the query template"),
        ({"exemplar": "{x1} {x2} -> {label}\n"}, "must be the query template"),
        ({"exemplar": "{label} {x1} {x2} ->\n"}, "must be the query template"),
        ({"exemplar": "{x1} {x2} ->{label}\n{x3}"}, "fields"),
        ({"query": "{x1} {x3} ->", "exemplar": "{x1} {x3} ->{label}\n"}, "fields"),
        ({"query": "{x1:3d} {x2} ->", "exemplar": "{x1:3d} {x2} ->{label}\n"}, "malformed"),
        ({"query": "{x1!r} {x2} ->", "exemplar": "{x1!r} {x2} ->{label}\n"}, "malformed"),
        ({"query": "{} {} ->", "exemplar": "{} {} ->{label}\n"}, "malformed"),
        ({"exemplar": "{x1} {x2} ->{label}{label}\n"}, "must be the query template"),
        ({"exemplar": "{x1} {x2} ->{label}\n{label}"}, "must be the query template"),
        ({"exemplar": "{x1} {x2} ->{label}\n{x1}"}, "after"),
        ({"header": "Points {x1}:\n"}, "header"),
        ({"header": "Labels: {label}\n"}, "header"),
    ],
)
def test_malformed_templates(template, message):
    with pytest.raises(ValueError, match=message):
        TemplateSpec(**template)


def test_custom_template_round_trip(tok):
    b = builder(tok, query="Point ({x1}, {x2}):", exemplar="Point ({x1}, {x2}):{label}\n\n", header="Hi\n")
    assert b.text(b.exemplar(4, 50, 1)) == "Point (4, 50): Rud\n\n"
    assert b.text(b.query(4, 50)) == "Point (4, 50):"
