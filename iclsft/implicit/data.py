"""The items of one condition, and their prompts as token ids.

Three deterministic item streams per (task, seed), each from its own derived seed: the demo stream
(pattern holds; the ICL prompt at K shows its first K items, so every prompt is a token prefix of
the longer ones and the engine's prefix cache is reused across K), the training items of the SFT
arm (pattern holds), and the evaluation items (holds and broken twins from one stream). A pair
with a question that is also a demo or a training item is dropped whole, so no method is scored on
an item it has seen.

Pieces are tokenized on their own and concatenated (as in `iclsft.prompts`): the prefix (BOS if
the tokenizer adds one, the instruction, the demos) is identical for every query, and an SFT
example is exactly a zero-shot prompt followed by its answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

from iclsft.implicit.spec import MAX_SHOTS
from iclsft.tasks.implicit import ImplicitTask, Item


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
    """Token ids of one task's prompts for one tokenizer.

    Closed label sets are scored as the task's label strings (" True"; "4\n" for expression, whose
    newline makes "1" and "10" two exclusive answers rather than one a prefix of the other); the
    tests check that these are the tokens a label has inside a demo. A fine-tuned model learns an
    answer's tokens as they are in a demo: the answer, then the first token of what follows it (the
    newline that ends a demo, merged with the blank line where the task puts one), so that it also
    learns to stop."""

    def __init__(self, tokenizer, task: ImplicitTask):
        self.tokenizer = tokenizer
        self.task = task
        probe = tokenizer("1", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.start = self.bos + self.encode(task.instruction + "\n" + task.gap)
        self.answers = None  # the closed set's bare answers, in label order
        self.label_ids = None
        if task.labels is not None:
            from iclsft.prompts import check_labels

            end = len(task.label_end)
            self.answers = [label[len(task.answer_prefix): len(label) - end if end else None] for label in task.labels]
            self.label_ids = [self.encode(label) for label in task.labels]
            check_labels(task.labels, self.label_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prefix(self, demos: Sequence[Item]) -> list[int]:
        """BOS, instruction, then every demo (question, answer, newline, gap)."""
        return self.start + self.encode("".join(self.task.demo(d) + self.task.gap for d in demos))

    def query(self, item: Item) -> list[int]:
        return self.encode(self.task.query(item))

    def answer_ids(self, answer: str | Item) -> list[int]:
        """The answer's tokens up to and including the first one holding a newline."""
        answer = answer.answer if isinstance(answer, Item) else answer
        ids = self.encode(self.task.answer_prefix + answer + "\n" + self.task.gap + "x")
        for i, tok in enumerate(ids):
            if "\n" in self.tokenizer.decode([tok]):
                return ids[: i + 1]
        raise ValueError(f"task {self.task.name!r}: answer {answer!r} has no newline token after it")

    def stop_ids(self) -> list[int]:
        """Every token holding a newline: a generated answer ends at the first of them."""
        if not hasattr(self, "_stop"):
            vocab = self.tokenizer.get_vocab().values()
            self._stop = sorted(t for t in vocab if "\n" in self.tokenizer.decode([t]))
        return self._stop

    def training_examples(self, items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
        """(zero-shot prompt, answer tokens) per item: the loss is on the answer tokens only."""
        return [(self.start + self.query(it), self.answer_ids(it)) for it in items]

    def bare_examples(self, items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
        """(BOS + question, answer tokens) per item: the bare example text of the study's training file
        (no instruction), for a loss on every token."""
        return [(self.bos + self.query(it), self.answer_ids(it)) for it in items]


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
