"""Tests for the implicit-pattern task generators (SPEC §8, iclsft.tasks.implicit).

Every answer and shortcut is re-derived from the question text alone by an evaluator written here
(Python arithmetic, union-find connectivity, Python eval of a whitelisted boolean string, exec of
the generated program), never from the generator's internals.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from functools import cache

import pytest

from iclsft.tasks.implicit import TASKS, VARIANTS, Item, get_task, pair

N = 2000
RELATION_ASK = "So the statement 'city A and city Z are connected' is"

# -- independent evaluators: question text -> (answer, shortcut) ---------------------------------

EXPRESSION = re.compile(r"\(([-+\d]+)\)\+\(([-+\d]+)\)\*\(([-+\d]+)\)=")


def eval_expression(question: str) -> tuple[str, str]:
    match = EXPRESSION.fullmatch(question)
    assert match, question
    s, z, c = match.groups()
    # Only digits and signs reach eval (the regex), so eval is plain integer arithmetic here.
    answer = eval(f"({s})+({z})*({c})", {"__builtins__": {}})
    return str(answer), str(eval(s, {"__builtins__": {}}))


def relation_edges(question: str) -> list[tuple[str, str]]:
    *lines, ask = question.split("\n")
    assert ask == RELATION_ASK
    edges = []
    for line in lines:
        match = re.fullmatch(r"([A-Z]) is connected with ([A-Z])", line)
        assert match, line
        edges.append(match.groups())
    return edges


def eval_relation(question: str) -> tuple[str, str]:
    edges = relation_edges(question)
    parent: dict[str, str] = {}

    def root(city: str) -> str:
        while parent.setdefault(city, city) != city:
            city = parent[city]
        return city

    for x, y in edges:
        parent[root(x)] = root(y)
    return str(root("A") == root("Z")), str(len(edges) % 2 == 0)


def eval_boolean(question: str) -> tuple[str, str]:
    expression, ask = question.split("\n")
    assert ask == "The result is:"
    assert re.fullmatch(r"(\(|\)|True|False|and|or| )+", expression), expression
    last = re.search(r"(True|False)\)*$", expression).group(1)
    return str(eval(expression, {"__builtins__": {}})), last


def eval_code(question: str) -> tuple[str, str]:
    assert question.startswith("The code is:\n") and question.endswith("\nThe output is:")
    source = question.removeprefix("The code is:\n").removesuffix("\nThe output is:")
    builtins = {"range": range, "sum": sum, "int": int, "str": str, "len": len, "print": print}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(source, {"__builtins__": builtins})
    op, n = re.search(r"def function2\(z, a\):\n    return [az] (\+|-|\*|//) (\d+)\n", source).groups()
    v = re.search(r"\nprint\(function2\((\d+), function1\((\d+)\)\)\)$", source).group(1)
    return out.getvalue().strip(), str(eval(f"{v} {op} {n}", {"__builtins__": {}}))


EVALUATE = {"expression": eval_expression, "relation": eval_relation, "boolean": eval_boolean, "code": eval_code}


# -- the two variants, checked independently ----------------------------------------------------


@cache
def variants(name: str, n: int = 4000, seed: int = 11) -> dict[str, list[Item]]:
    """Both variants of one seed, drawn once per module (generate() would draw the pairs twice)."""
    pairs = pair(name, n, seed)
    return {"holds": [h for h, _ in pairs], "broken": [b for _, b in pairs]}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", sorted(TASKS))
def test_shortcut_holds_or_breaks_in_every_item(name, variant):
    items = variants(name)[variant][:N]
    assert variants(name)[variant][:5] == get_task(name).generate(5, 11, variant)
    assert len(items) == N and {item.variant for item in items} == {variant}
    for item in items:
        answer, shortcut = EVALUATE[name](item.question)
        assert (item.answer, item.shortcut) == (answer, shortcut), item
        assert (answer == shortcut) == (variant == "holds"), item


def test_expression_answers_uniform_and_in_label_set():
    task = get_task("expression")
    for variant in VARIANTS:
        items = task.generate(2200, 5, variant)
        counts = Counter(int(item.answer) for item in items)
        assert sorted(counts) == list(range(11)), counts
        for value, count in counts.items():  # within 30% of n/11 = 200
            assert 140 <= count <= 260, (variant, value, count)
        assert {task.label_of(item) for item in items} == set(task.labels)


@pytest.mark.parametrize("name", ["relation", "boolean"])
def test_binary_labels_balanced(name):
    # A fair coin decides each label: at n = 4000 the share of True has sd 0.79 points, so
    # 50 +- 3.2 points is 4 sd; a generator tilted as far as the original boolean (60% True) fails.
    for variant in VARIANTS:
        items = variants(name)[variant]
        share = sum(item.answer == "True" for item in items) / len(items)
        assert 0.468 <= share <= 0.532, (variant, share)


def test_relation_broken_has_no_letter_z_shortcut():
    holds, broken = variants("relation")["holds"][:N], variants("relation")["broken"][:N]
    mentions_z = [any("Z" in edge for edge in relation_edges(item.question)) for item in holds + broken]
    # holds (the original): Z appears exactly in the True items; broken: Z appears in every item.
    assert mentions_z[:N] == [item.answer == "True" for item in holds]
    assert all(mentions_z[N:])
    assert Counter(item.answer for item in broken)["False"] > 0.45 * N
    assert {len(relation_edges(item.question)) for item in holds} == {9, 10}


def test_boolean_suffix_forms():
    holds, broken = variants("boolean")["holds"][:N], variants("boolean")["broken"][:N]
    for item in holds:
        expression = item.question.split("\n")[0]
        assert expression.startswith("((") and expression.endswith((") and False", ") or True"))
    for item in broken:
        expression = item.question.split("\n")[0]
        assert expression.endswith((") and True", ") or False"))
        assert item.answer == ("False" if expression.endswith("and True") else "True")


# -- minimal pairs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_pairs_keep_the_shortcut_and_flip_the_answer(name):
    task = get_task(name)
    pairs = pair(name, 500, 4)
    assert pairs == list(zip(task.generate(500, 4, "holds"), task.generate(500, 4, "broken")))
    for holds, broken in pairs:
        assert holds.shortcut == broken.shortcut == holds.answer != broken.answer
        if name == "boolean":  # a literal True <-> False and the operator and <-> or change length
            assert len(holds.question.split()) == len(broken.question.split())
        else:
            assert len(holds.question) == len(broken.question)
        changed = sum(a != b for a, b in zip(holds.question.split(), broken.question.split()))
        if name == "boolean":  # the operator, plus the fewest core literals that give the needed value
            flips = _boolean_flips_needed(holds.question)
            assert changed == 1 + flips if flips < 2 else changed >= 3, (holds.question, broken.question)
        else:
            assert 1 <= changed <= 2, (holds.question, broken.question)


def _boolean_flips_needed(question: str) -> int:
    """0 if the holds core already has the value its broken twin needs (the opposite of the last
    literal), 1 if flipping one literal gives it, else 2 (meaning: two or more)."""
    expression = question.split("\n")[0]
    core, literal = re.fullmatch(r"\((.*)\) (?:and|or) (True|False)", expression).groups()
    need = literal == "False"

    def value(words: list[str]) -> bool:
        return eval(" ".join(words), {"__builtins__": {}})

    words = core.split(" ")
    if value(words) == need:
        return 0
    literals = [i for i, w in enumerate(words) if w.strip("()") in ("True", "False")]
    for i in literals:
        flipped = words[i].replace("True", "X").replace("False", "True").replace("X", "False")
        if value(words[:i] + [flipped] + words[i + 1 :]) == need:
            return 1
    return 2


def test_pair_filter_keeps_only_equal_counts():
    # A stand-in for a token counter: the number of True literals is the same in exactly those
    # boolean pairs whose core needed no flip (about half), so the filter must skip the others and
    # still return n pairs, in stream order.
    def count(text: str) -> int:
        return text.count("True")

    pairs = pair("boolean", 200, 4, count_tokens=count)
    unfiltered = pair("boolean", 600, 4)
    equal = [p for p in unfiltered if count(p[0].question) == count(p[1].question)]
    assert 0.3 < len(equal) / len(unfiltered) < 0.7
    assert pairs == equal[:200]


def test_pairs_have_equal_token_counts_with_smollm2(smollm_tokenizer):
    def count(text: str) -> int:
        return len(smollm_tokenizer(text, add_special_tokens=False)["input_ids"])

    fractions = {}
    for name, task in TASKS.items():
        demos = task.generate(3, 99, "holds")
        pairs = pair(name, 200, 8)
        equal = sum(count(task.prompt(demos, h)) == count(task.prompt(demos, b)) for h, b in pairs)
        fractions[name] = equal / len(pairs)
    print("equal-token-length pair fractions:", fractions)
    assert fractions == {"expression": 1.0, "relation": 1.0, "boolean": 1.0, "code": 1.0}


# -- labels and the tokenizer -------------------------------------------------------------------


def test_closed_labels_are_prefix_free_and_tokenize_cleanly(smollm_tokenizer):
    def ids(text: str) -> list[int]:
        return list(smollm_tokenizer(text, add_special_tokens=False)["input_ids"])

    expression = get_task("expression")
    assert expression.labels == tuple(f"{a}\n" for a in range(11))
    sequences = [ids(label) for label in expression.labels]
    assert len(sequences[10]) == 3  # "10\n": 1 | 0 | newline; bare "10" would extend "1"
    for i, a in enumerate(sequences):
        for j, b in enumerate(sequences):
            assert i == j or a != b[: len(a)], (expression.labels[i], expression.labels[j])
    for name in ("expression", "relation", "boolean"):
        task = get_task(name)
        demos, queries = task.generate(2, 1, "holds"), task.generate(3, 2, "broken")
        for item in queries:
            text = task.prompt(demos, item)
            for label in task.labels:  # the prompt/label boundary never merges tokens
                assert ids(text + label) == ids(text) + ids(label), (name, label)


def test_label_of():
    expression, relation, code = get_task("expression"), get_task("relation"), get_task("code")
    assert expression.label_of(Item("(10)+(1-1)*(2+0+0+0)=", "10", "10", "holds")) == "10\n"
    assert relation.label_of(Item("x", "False", "True", "broken")) == " False"
    assert code.labels is None and code.label_of(code.generate(1, 0, "holds")[0]) is None
    with pytest.raises(ValueError, match="'-37' is outside the closed label set"):
        expression.label_of(Item("x", "-37", "3", "broken"))


# -- determinism --------------------------------------------------------------------------------


def _digest(n: int, seed: int) -> str:
    items = [
        [item.question, item.answer, item.shortcut, item.variant]
        for name in sorted(TASKS)
        for variant in VARIANTS
        for item in TASKS[name].generate(n, seed, variant)
    ]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def test_same_seed_same_items_in_another_process():
    script = (
        "import hashlib, json\nfrom iclsft.tasks.implicit import TASKS, VARIANTS\n"
        + inspect.getsource(_digest)
        + "print(_digest(40, 123))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == _digest(40, 123)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_seeds_differ_and_streams_are_prefixes(name):
    task = get_task(name)
    a, b = task.generate(200, 0, "holds"), task.generate(200, 1, "holds")
    assert a == task.generate(200, 0, "holds")
    assert task.generate(50, 0, "holds") == a[:50]
    assert len({item.question for item in a} & {item.question for item in b}) < 20
    assert len({item.question for item in a}) > 190


def test_pinned_texts():
    # Prompts are hashed into condition ids: any change to a generator or a format shows here.
    expression = get_task("expression")
    holds, broken = pair("expression", 1, 0)[0]
    assert (holds.question, holds.answer) == ("(3+0)+(11-18+17-10)*(5+4-10+1)=", "3")
    assert (broken.question, broken.answer) == ("(3+0)+(11-18+17-11)*(5+4-10-4)=", "8")
    assert expression.train_text(holds) == "(3+0)+(11-18+17-10)*(5+4-10+1)=3\n"
    prompts = "".join(t.prompt(t.generate(2, 1, "holds"), t.generate(1, 2, "broken")[0]) for t in TASKS.values())
    assert hashlib.sha256(prompts.encode()).hexdigest()[:16] == PINNED_PROMPTS


PINNED_PROMPTS = "467cd4f184d3b7d3"


# -- prompt format ------------------------------------------------------------------------------


def test_prompt_by_hand():
    expression, relation = get_task("expression"), get_task("relation")
    d1 = Item("(1)+(2-2)*(1+1+1-3)=", "1", "1", "holds")
    d2 = Item("(4+6)+(0+0)*(5-1+2-1)=", "10", "10", "holds")
    query = Item("(2)+(1-1)*(0+0+0+7)=", "2", "2", "holds")
    assert expression.prompt([d1, d2], query) == (
        "Now you need to calculate the answer of some mathematical equations.\n"
        "(1)+(2-2)*(1+1+1-3)=1\n(4+6)+(0+0)*(5-1+2-1)=10\n(2)+(1-1)*(0+0+0+7)="
    )
    demo = Item(f"A is connected with B\nB is connected with Z\n{RELATION_ASK}", "True", "True", "holds")
    query = Item(f"A is connected with B\n{RELATION_ASK}", "False", "False", "holds")
    assert relation.prompt([demo], query) == (
        relation.instruction + "\n\n"
        f"A is connected with B\nB is connected with Z\n{RELATION_ASK} True\n\n"
        f"A is connected with B\n{RELATION_ASK}"
    )
    assert relation.prompt([], query) == relation.instruction + "\n\n" + query.question


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompt_structure(name):
    task = get_task(name)
    demos, query = task.generate(4, 21, "holds"), task.generate(1, 22, "broken")[0]
    text = task.prompt(demos, query)
    assert text.startswith(task.instruction + "\n") and "\n" not in task.instruction
    assert text.endswith(task.query(query))
    positions = [text.index(task.demo(demo)) for demo in demos]
    assert positions == sorted(positions) and positions[-1] < len(text) - len(task.query(query))
    assert "None" not in text and "\n\n\n" not in text and " \n" not in text and not text.endswith(" ")
    assert task.train_text(query) == task.query(query) + task.completion(query)
    assert task.instruction not in task.train_text(query) and task.train_text(query).endswith("\n")
    with pytest.raises(ValueError, match="demos must be 'holds' items"):
        task.prompt([query], demos[0])
    with pytest.raises(ValueError, match="also a demo"):
        task.prompt(demos, demos[1])


# -- faithful mode ------------------------------------------------------------------------------


def test_faithful_expression_broken_leaves_the_label_set():
    task = get_task("expression")
    assert task.generate(300, 6, "holds", faithful=True) == task.generate(300, 6, "holds")
    items = task.generate(N, 6, "broken", faithful=True)
    outside = sum(not 0 <= int(item.answer) <= 10 for item in items) / N
    assert 0.82 <= outside <= 0.94, outside  # the notes measured ~88% outside 0..10
    assert any(item.answer == item.shortcut for item in items)  # z*c = 0 happens: not always broken
    for item in items:
        assert (item.answer, item.shortcut) == eval_expression(item.question)


def test_faithful_relation_broken_is_the_original_misleading_variant():
    items = get_task("relation").generate(500, 6, "broken", faithful=True)
    for item in items:
        edges = relation_edges(item.question)
        assert len(edges) == 8 and item.answer == "False" and item.shortcut == "True"
        assert not any("Z" in edge for edge in edges) and eval_relation(item.question) == ("False", "True")


def test_faithful_boolean_has_no_decisive_suffix():
    task = get_task("boolean")
    holds = task.generate(N, 6, "holds", faithful=True)
    sizes = Counter()
    for item in holds:
        expression = item.question.split("\n")[0]
        groups = re.findall(r"\(([^()]*)\)", expression)
        lengths = [group.count("True") + group.count("False") for group in groups]
        assert len(groups) == 3 and lengths == sorted(lengths, reverse=True), expression
        sizes[lengths[0]] += 1
        assert (item.answer, item.shortcut) == eval_boolean(item.question)
    assert set(sizes) == {2, 3, 4}
    true_share = sum(item.answer == "True" for item in holds) / N
    assert 0.55 <= true_share <= 0.66, true_share  # the notes measured ~60% True
    for item in task.generate(500, 6, "broken", faithful=True):
        expression = item.question.split("\n")[0]
        core, suffix = re.fullmatch(r"\((.*)\) (or False|and True)", expression).groups()
        assert item.answer == str(eval(core, {"__builtins__": {}}))


def test_code_has_no_faithful_mode():
    with pytest.raises(ValueError, match="no faithful mode"):
        get_task("code").generate(3, 0, "holds", faithful=True)


# -- errors -------------------------------------------------------------------------------------


def test_bad_inputs_name_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError,
                       match=r"unknown implicit task 'parity'; allowed: expression, relation, boolean, code"):
        get_task("parity")
    with pytest.raises(ValueError, match=r"\('holds', 'broken'\), got 'misleading'"):
        get_task("code").generate(3, 0, "misleading")
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match=f"n must be an integer >= 1, got {n!r}"):
            get_task("boolean").generate(n, 0, "holds")
    with pytest.raises(ValueError, match="n must be"):
        pair("relation", 0, 0)
    with pytest.raises(ValueError, match="seed must be an integer, got '1'"):
        get_task("relation").generate(2, "1", "holds")
