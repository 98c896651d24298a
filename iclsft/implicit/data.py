"""The items of one condition, and their prompts as token ids.

Three deterministic item streams per (task, seed), each from its own derived seed: the demo stream
(pattern holds; the ICL prompt at K shows its first K items, so every prompt is a token prefix of
the longer ones and the engine's prefix cache is reused across K), the training items of the SFT
arm (pattern holds), and the evaluation items (holds and broken twins from one stream). A pair
with a question that is also a demo or a training item is dropped whole, so no method is scored on
an item it has seen.

Prompts are built from pieces so that the prefix (BOS if the tokenizer adds one, the instruction,
the demos) is identical for every query and an SFT example is exactly a zero-shot prompt followed by
its answer; each piece is cut from the tokenizer's ids of a text in which it has its prompt context,
so that a prompt's ids are the tokenizer's ids for its text (SPEC §4, docs/tokenization.md).
`check_prompts` compares them at run start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

from iclsft.implicit.spec import MAX_SHOTS
from iclsft.prompts import TokenizationError, check_labels, cut_ids, mismatch
from iclsft.tasks.implicit import VARIANTS, ImplicitTask, Item

SAMPLE_ITEMS = 8  # per variant, and as many training items, in the run-start check


def derived_seed(*parts: object) -> int:
    """A seed for one stream, stable across processes and Python versions."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def demo_stream(task: ImplicitTask, seed: int, faithful: bool = False) -> list[Item]:
    return task.generate(MAX_SHOTS, derived_seed("demos", task.name, seed), "holds", faithful=faithful)


def train_items(task: ImplicitTask, seed: int, n: int, faithful: bool = False) -> list[Item]:
    return task.generate(n, derived_seed("train", task.name, seed), "holds", faithful=faithful)


def eval_items(task: ImplicitTask, variant: str, seed: int, n: int, train_size: int,
               faithful: bool = False) -> list[Item]:
    """`n` evaluation items of `variant`, none of whose questions is a demo or a training item.

    Both variants come from one seed, so item i of "broken" is the minimal-pair twin of item i of
    "holds" (the same question edited so that the shortcut is wrong); a pair is dropped whole when
    either question was seen."""
    seen = {it.question for it in demo_stream(task, seed, faithful)}
    seen |= {it.question for it in train_items(task, seed, train_size, faithful)}
    m = 2 * n + 64
    pool_seed = derived_seed("eval", task.name, seed)
    holds = task.generate(m, pool_seed, "holds", faithful=faithful)
    broken = task.generate(m, pool_seed, "broken", faithful=faithful)
    keep = [i for i in range(m) if holds[i].question not in seen and broken[i].question not in seen][:n]
    if len(keep) < n:
        raise ValueError(f"task {task.name!r}: only {len(keep)} {variant} items differ from the demos and the "
                         f"{train_size} training items; ask for fewer than {n} evaluation items")
    pool = holds if variant == "holds" else broken
    return [pool[i] for i in keep]


class TaskPrompts:
    """Token ids of one task's prompts for one tokenizer, equal to its tokenization of their text.

    Every piece is cut (at character boundaries, by token offsets) out of the tokenizer's ids of a
    text in which it has its prompt context, as in `iclsft.prompts`; pieces tokenized alone would
    not do: a dummy-prefix tokenizer (Llama-2, Mistral) puts "▁" before each, and SmolLM2 writes the
    blank line "\\n\\n" as one token at the end of a text but as two before a word. The contexts:

    - the start (BOS if the tokenizer adds one, the instruction) and every query are cut from
      instruction + question; a demo (question, answer, newline, gap) from instruction + demo + a
      question (its own, standing for the next one: every question of a task starts alike). Every
      piece follows a newline, in a prompt as in its context, so one context serves every position;
    - a closed label is what it adds after instruction + question (the lm-eval convention);
    - the answer a fine-tuned model learns is what the completion adds there, up to and including
      the first token that holds a newline (merged with the blank line where the task puts one and
      the tokenizer joins them), i.e. the answer's tokens inside a demo, so that it learns to stop.

    `prefix()` checks itself on its whole text; `check_prompts` checks queries, labels and training
    examples at run start. Closed label sets are scored as the task's label strings (" True"; "4\\n"
    for expression, whose newline makes "1" and "10" two exclusive answers)."""

    def __init__(self, tokenizer, task: ImplicitTask):
        self.tokenizer = tokenizer
        self.task = task
        probe = tokenizer("1", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.head = task.instruction + "\n" + task.gap  # the text before the first demo or the query
        self.sample = task.generate(1, 0, "holds")[0].question  # stands for "a question follows"
        self.header = cut_ids(tokenizer, [self.head + self.sample], [[len(self.head)]])[0][0]
        self.start = self.bos + self.header
        self._queries: dict[str, list[int]] = {}
        self._demos: dict[tuple[str, str], list[int]] = {}
        self.answers = None  # the closed set's bare answers, in label order
        self.label_ids = None
        if task.labels is not None:
            end = len(task.label_end)
            self.answers = [label[len(task.answer_prefix): len(label) - end if end else None] for label in task.labels]
            self.label_ids = self.continuations(self.head + self.sample, task.labels)
            check_labels(task.labels, self.label_ids)

    # -- text -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids for `text` on its own (no BOS)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def natural(self, text: str) -> list[int]:
        """BOS (if the tokenizer adds one) and the ids of `text`: what a prompt of that text must equal."""
        return self.bos + self.encode(text)

    def prefix_text(self, demos: Sequence[Item]) -> str:
        return self.head + "".join(self.task.demo(d) + self.task.gap for d in demos)

    def continuations(self, context: str | Sequence[str], texts: Sequence[str]) -> list[list[int]]:
        """The ids each text adds after its context (one for all, or one per text; lm-eval convention),
        the context's ids unchanged."""
        contexts = [context] * len(texts) if isinstance(context, str) else list(context)
        if not texts:
            return []
        bases = self.tokenizer(contexts, add_special_tokens=False)["input_ids"]
        full = self.tokenizer([c + t for c, t in zip(contexts, texts)], add_special_tokens=False)["input_ids"]
        out = []
        for c, text, base, ids in zip(contexts, texts, bases, full):
            if list(ids[: len(base)]) != list(base):
                raise TokenizationError(
                    f"task {self.task.name!r}: this tokenizer merges {text[:30]!r} into the text before it "
                    f"({c[-30:]!r}): {mismatch(self.tokenizer, list(ids), list(base), 'context + piece', 'context')}")
            out.append(list(ids[len(base):]))
        return out

    # -- pieces ---------------------------------------------------------------------------------

    def questions(self, questions: Sequence[str]) -> list[list[int]]:
        """Each question's ids as it ends a prompt (after the instruction or a demo)."""
        missing = list(dict.fromkeys(q for q in questions if q not in self._queries))
        if missing:
            parts = cut_ids(self.tokenizer, [self.head + q for q in missing], [[len(self.head)]] * len(missing))
            for q, (before, ids) in zip(missing, parts):
                self._same_header(before, q)
                self._queries[q] = ids
        return [self._queries[q] for q in questions]

    def query(self, item: Item) -> list[int]:
        return self.questions([self.task.query(item)])[0]

    def queries(self, items: Sequence[Item]) -> list[list[int]]:
        return self.questions([self.task.query(it) for it in items])

    def demos(self, items: Sequence[Item]) -> list[list[int]]:
        """Each demo's ids (question, answer, newline, gap) as it stands in a prompt, a question after it
        (its own: what follows the gap decides how a blank line is tokenized)."""
        keys = [(it.question, it.answer) for it in items]
        missing = {k: it for k, it in zip(keys, items) if k not in self._demos}
        if missing:
            texts = [self.task.demo(it) + self.task.gap for it in missing.values()]
            parts = cut_ids(self.tokenizer, [self.head + t + it.question for t, it in zip(texts, missing.values())],
                         [[len(self.head), len(self.head) + len(t)] for t in texts])
            for key, (before, ids, _) in zip(missing, parts):
                self._same_header(before, key[0])
                self._demos[key] = ids
        return [self._demos[k] for k in keys]

    def prefix(self, demos: Sequence[Item]) -> list[int]:
        """BOS, instruction, then every demo; checked (with a question after it) to be the natural
        tokenization of its text."""
        ids = self.start + [t for piece in self.demos(demos) for t in piece]
        want = self.natural(self.prefix_text(demos) + self.sample)
        if ids + self.questions([self.sample])[0] != want:
            raise TokenizationError(
                f"task {self.task.name!r}: the prompt of {len(demos)} demos is not the tokenizer's tokenization "
                f"of its text: {mismatch(self.tokenizer, ids + self.questions([self.sample])[0], want)}")
        return ids

    def answer_ids(self, answer: str | Item) -> list[int]:
        """The answer's tokens after the instruction and its question (a bare answer: after a sample
        question), up to and including the first one holding a newline."""
        item = answer if isinstance(answer, Item) else Item(self.sample, answer, answer, "holds")
        return self._answers(self.head, [item])[0]

    def _answers(self, head: str, items: Sequence[Item]) -> list[list[int]]:
        """What each item's completion adds after head + question, a question after it, up to the newline."""
        out = []
        added = self.continuations([head + it.question for it in items],
                                   [self.task.completion(it) + self.task.gap + it.question for it in items])
        for item, ids in zip(items, added):
            stop = next((i for i, tok in enumerate(ids) if "\n" in self.tokenizer.decode([tok])), None)
            if stop is None:
                raise ValueError(f"task {self.task.name!r}: answer {item.answer!r} has no newline token after it")
            out.append(ids[: stop + 1])
        return out

    def stop_ids(self) -> list[int]:
        """Every token holding a newline: a generated answer ends at the first of them."""
        if not hasattr(self, "_stop"):
            vocab = self.tokenizer.get_vocab().values()
            self._stop = sorted(t for t in vocab if "\n" in self.tokenizer.decode([t]))
        return self._stop

    def training_examples(self, items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
        """(zero-shot prompt, answer tokens) per item: the loss is on the answer tokens only. The
        example is token for token the zero-shot prompt and the first demo of every ICL prompt."""
        return [(self.start + q, a) for q, a in zip(self.queries(items), self._answers(self.head, items))]

    def bare_examples(self, items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
        """(BOS + question, answer tokens) per item: the bare example text of the study's training file
        (no instruction), for a loss on every token; tokenized as a text of its own (so with a
        dummy-prefix tokenizer the question starts with "▁", which it has not after a newline)."""
        questions = [self.task.query(it) for it in items]
        return [(self.bos + self.encode(q), a) for q, a in zip(questions, self._answers("", items))]

    def _same_header(self, before: list[int], question: str) -> None:
        if before != self.header:
            raise TokenizationError(
                f"task {self.task.name!r}: the instruction is tokenized differently before {question[:30]!r}: "
                f"{mismatch(self.tokenizer, before, self.header, 'before this question', 'before the first question')}")


def mixed_training_examples(prompts: Mapping[str, TaskPrompts], tasks: Sequence[str], seed: int, n: int,
                            faithful: bool = False) -> list[tuple[list[int], list[int]]]:
    """The original recipe's one training file: the `n` training items of each task (the same items
    the per-task recipe trains on, so every evaluation set stays disjoint from them), written bare,
    shuffled together in an order fixed by the tasks and the seed."""
    examples = [ex for name in tasks
                for ex in prompts[name].bare_examples(train_items(prompts[name].task, seed, n, faithful))]
    rng = np.random.default_rng(derived_seed("mixture", list(tasks), seed))
    order = np.argsort(rng.random(len(examples)), kind="stable")  # as exemplar_stream: depends on PCG64 only
    return [examples[i] for i in order]


def check_prompts(prompts: TaskPrompts, seed: int, shots: int, faithful: bool = False,
                  n: int = SAMPLE_ITEMS) -> int:
    """Run start: the ids a run uses against the tokenizer's ids for their whole text. After the
    prefix of `shots` demos of the seed's stream and after the start alone (K=0, fine-tuned models):
    the first `n` evaluation items of each variant, each query alone and with each label (closed
    sets); and the first `n` training items as SFT examples of both recipes, each a token prefix of
    its text followed by the next question (with the instruction; bare). Raises TokenizationError
    naming the first difference; returns the number of sequences checked."""
    task = prompts.task
    pool = derived_seed("eval", task.name, seed)
    items = [it for v in VARIANTS for it in task.generate(n, pool, v, faithful=faithful)]
    labels = list(zip(task.labels, prompts.label_ids)) if prompts.label_ids is not None else []
    got, texts, where, whole = [], [], [], []  # whole: the ids must be all of the text's, not a prefix
    for demos in [demo_stream(task, seed, faithful)[:shots]] + ([[]] if shots else []):
        prefix, text = prompts.prefix(demos), prompts.prefix_text(demos)  # prefix() checks itself
        for item, query in zip(items, prompts.queries(items)):
            for label, ids in [("", [])] + labels:
                got.append(prefix + query + ids)
                texts.append(text + item.question + label)
                where.append(f"{len(demos)} demos, question {item.question[:40]!r}"
                             + (f", label {label!r}" if label else ""))
                whole.append(True)
    train = train_items(task, seed, n, faithful)
    for name, head, examples in (("SFT example", prompts.head, prompts.training_examples(train)),
                                 ("bare SFT example", "", prompts.bare_examples(train))):
        for item, (prompt, answer) in zip(train, examples):
            got.append(prompt + answer)  # a token prefix of the item as a demo, the next question after it
            texts.append(head + task.demo(item) + task.gap + item.question)
            where.append(f"{name} {item.question[:40]!r}")
            whole.append(False)
    for ids, text_ids, place, exact in zip(got, prompts.tokenizer(texts, add_special_tokens=False)["input_ids"],
                                           where, whole):
        want = prompts.bos + list(text_ids)
        want = want if exact else want[: len(ids)]
        if ids != want:
            raise TokenizationError(
                f"task {task.name!r}: prompts cannot equal this tokenizer's tokenization of their text ({place}): "
                f"{mismatch(prompts.tokenizer, ids, want)}")
    return len(got)


