"""The task object shared by the four implicit-pattern tasks: items, prompt formats, seeded streams.

See the package docstring (`iclsft.tasks.implicit`) for the formats and the guarantees.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import ClassVar

from iclsft.names import VARIANTS  # re-exported by iclsft.tasks.implicit
from iclsft.tasks import registry


@dataclass(frozen=True)
class Item:
    """One problem. `question` is the exact text that precedes the answer in a prompt (the query);
    `answer` and `shortcut` are bare strings ("2", "True"), without a label's leading space."""

    question: str
    answer: str  # the gold answer, by a full evaluation of the question
    shortcut: str  # the answer the hidden pattern predicts
    variant: str  # "holds" (shortcut == answer) or "broken" (shortcut != answer)


PairDraw = Callable[[random.Random], tuple[Item, Item]]
FaithfulDraw = Callable[[random.Random, str], Item]


@dataclass(frozen=True)
class ImplicitTask:
    """A task: its fixed texts and its generator.

    `labels`: the closed label set, as the exact strings that follow a query (None: open answer,
    scored by greedy generation up to the first newline and exact match with `Item.answer`).
    A label is `answer_prefix + answer + label_end`; a completion (what follows the query in a demo
    or a training text) is `answer_prefix + answer + "\\n"`.
    """

    name: str
    instruction: str
    labels: tuple[str, ...] | None
    answer_prefix: str  # " " where the answer follows a word, "" where it follows "="
    label_end: str  # "\n" where bare labels would be prefixes of each other ("1" of "10")
    gap: str  # extra text after the instruction and after every demo: "\n" gives blank lines
    draw_pair: PairDraw = field(repr=False, compare=False)
    draw_faithful: FaithfulDraw | None = field(default=None, repr=False, compare=False)
    study: ClassVar[str] = "implicit"  # iclsft.tasks.registry

    @property
    def evaluation(self) -> str:
        """"labels": the closed label set is scored exactly; "generate": greedy generation, exact match."""
        return "labels" if self.labels is not None else "generate"

    # -- generation ----------------------------------------------------------------------------

    def pairs(self, seed: int) -> Iterator[tuple[Item, Item]]:
        """The endless seeded stream of (holds, broken) minimal pairs behind `generate`."""
        rng = _rng(self.name, seed)
        while True:
            holds, broken = self.draw_pair(rng)
            # The whole suite rests on these two facts; a generator bug must not pass silently.
            if not holds.answer == holds.shortcut == broken.shortcut != broken.answer:
                raise RuntimeError(f"{self.name}: generator produced an invalid pair {holds!r} / {broken!r}")
            yield holds, broken

    def generate(self, n: int, seed: int, variant: str, *, faithful: bool = False) -> list[Item]:
        """`n` items of `variant`, a pure function of (task, n, seed, variant, faithful).

        Without `faithful`, item i of "holds" and item i of "broken" at the same seed form a minimal
        pair (see `pair`), and `generate(m, ...)` is a prefix of `generate(n, ...)` for m < n.
        `faithful=True` reproduces the original generators' quirks (task docstrings say which)."""
        check_n(n)
        check_variant(variant)
        if not faithful:
            index = VARIANTS.index(variant)
            return [p[index] for p in islice(self.pairs(seed), n)]
        if self.draw_faithful is None:
            raise ValueError(f"task {self.name!r} has no faithful mode (the original's data is not available)")
        rng = _rng(self.name, seed)
        return [self.draw_faithful(rng, variant) for _ in range(n)]

    # -- formats -------------------------------------------------------------------------------

    def query(self, item: Item) -> str:
        """The question as it ends a prompt; the answer follows it directly."""
        return item.question

    def completion(self, item: Item) -> str:
        """What follows the query in a solved example, ending with the newline that closes it."""
        return self.answer_prefix + item.answer + "\n"

    def demo(self, item: Item) -> str:
        """One solved example as it appears in an ICL prompt."""
        return self.query(item) + self.completion(item)

    def train_text(self, item: Item) -> str:
        """One SFT example: the solved example without instruction (as in the original FT data)."""
        return self.demo(item)

    def label_of(self, item: Item) -> str | None:
        """The gold answer's label, exactly as in `labels`; None for an open-answer task."""
        if self.labels is None:
            return None
        label = self.answer_prefix + item.answer + self.label_end
        if label not in self.labels:
            raise ValueError(
                f"{self.name}: answer {item.answer!r} is outside the closed label set {self.labels} "
                f"(faithful broken items can be; score them by generation)"
            )
        return label

    def prompt(self, demos: Sequence[Item], item: Item) -> str:
        """Instruction, the demos in order, then the query. Demos must come from the holds variant
        and must not contain the query item."""
        for demo in demos:
            if demo.variant != "holds":
                raise ValueError(f"{self.name}: demos must be 'holds' items, got a {demo.variant!r} demo")
            if demo.question == item.question:
                raise ValueError(f"{self.name}: the query item is also a demo: {item.question!r}")
        body = "".join(self.demo(demo) + self.gap for demo in demos)
        return self.instruction + "\n" + self.gap + body + self.query(item)


def pair(
    task: str | ImplicitTask,
    n: int,
    seed: int,
    *,
    count_tokens: Callable[[str], int] | None = None,
) -> list[tuple[Item, Item]]:
    """`n` (holds, broken) minimal pairs for circuit analysis: the two questions differ in a few
    characters at the same places; both items have the same shortcut prediction (the holds item's
    answer) and different gold answers, in every task.

    Without `count_tokens` these are `zip(generate(n, seed, "holds"), generate(n, seed, "broken"))`.
    With it (e.g. `lambda s: len(tok(s, add_special_tokens=False)["input_ids"])`), pairs whose two
    queries have different token counts are skipped and further pairs are drawn from the same stream
    until there are `n`; the result is still a pure function of (task, n, seed, count_tokens)."""
    task = registry.get(task, "implicit") if isinstance(task, str) else task
    check_n(n)
    if count_tokens is None:
        return list(islice(task.pairs(seed), n))
    kept: list[tuple[Item, Item]] = []
    limit = 50 * n
    for drawn, (holds, broken) in enumerate(task.pairs(seed), start=1):
        if count_tokens(task.query(holds)) == count_tokens(task.query(broken)):
            kept.append((holds, broken))
            if len(kept) == n:
                return kept
        if drawn >= limit:
            raise RuntimeError(f"{task.name}: only {len(kept)} of {drawn} pairs have equal token counts; wanted {n}")
    raise AssertionError("unreachable: the pair stream is endless")


def check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _rng(name: str, seed: int) -> random.Random:
    # A str seed goes through SHA-512, so the stream is the same in every process, whatever
    # PYTHONHASHSEED; the task name in it keeps the four tasks' streams apart at equal seeds.
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return random.Random(f"iclsft.tasks.implicit/{name}/{seed}")
