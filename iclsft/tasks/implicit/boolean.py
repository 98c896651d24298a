"""Boolean expressions with a decisive suffix (notes §3.3), the shortcut actually present.

Core: 3 parenthesised groups of 2-4 literals (True/False) joined by random `and`/`or`, the groups
joined the same way; Python precedence (`and` binds tighter than `or`). The shortcut: the answer is
the last literal.

- holds: `(core) and False` (False) or `(core) or True` (True), a fair coin; the core is random.
  Unlike the original, both forms wrap the core, so the opening parenthesis tells nothing.
- broken: `(core) and True` (answer False) or `(core) or False` (answer True): the suffix no longer
  decides, the answer is the core's value and the opposite of the last literal. The broken item is
  its holds twin with the suffix operator swapped (`and False` -> `or False`, `or True` ->
  `and True`, so the last literal, the shortcut's prediction, stays) and, where the core's value is
  not already the needed one, the fewest core literals flipped that give it (no flip in about half
  the pairs, one in a quarter, more in the rest).
  Caveat, inherent in this design: in both variants `and` goes with False and `or` with True, so
  the suffix operator alone predicts the answer everywhere; only the last-literal rule is broken.
- faithful (the original test, `randoms=True`): no decisive suffix; the groups' maximum sizes
  shrink (each group's size is drawn from 2 up to the previous group's size), labels ~60% True;
  faithful broken appends the value-preserving `or False` / `and True` to the wrapped expression.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import combinations

from iclsft.tasks.implicit.core import ImplicitTask, Item

OPS = ("and", "or")
ASK = "The result is:"


def evaluate(literals: list[bool], ops: list[str]) -> bool:
    """`l0 op0 l1 op1 l2 ...` with `and` binding tighter than `or`: an `or` of `and`-chains."""
    result, chain = False, literals[0]
    for op, literal in zip(ops, literals[1:]):
        if op == "and":
            chain = chain and literal
        else:
            result, chain = result or chain, literal
    return result or chain


@dataclass(frozen=True)
class Core:
    groups: tuple[tuple[tuple[bool, ...], tuple[str, ...]], ...]  # per group: literals, operators
    joins: tuple[str, ...]  # operators between the groups

    def value(self) -> bool:
        return self.value_with(self.literals())

    def value_with(self, literals: list[bool]) -> bool:
        """The core's value with its literals replaced by `literals` (in reading order)."""
        values, start = [], 0
        for lits, ops in self.groups:
            values.append(evaluate(literals[start : start + len(lits)], list(ops)))
            start += len(lits)
        return evaluate(values, list(self.joins))

    def text(self) -> str:
        parts = []
        for i, (lits, ops) in enumerate(self.groups):
            if i:
                parts.append(self.joins[i - 1])
            words = [str(lits[0])]
            for op, lit in zip(ops, lits[1:]):
                words += [op, str(lit)]
            parts.append("(" + " ".join(words) + ")")
        return " ".join(parts)

    def literals(self) -> list[bool]:
        return [lit for lits, _ in self.groups for lit in lits]

    def with_literals(self, values: list[bool]) -> Core:
        groups, start = [], 0
        for lits, ops in self.groups:
            groups.append((tuple(values[start : start + len(lits)]), ops))
            start += len(lits)
        return Core(tuple(groups), self.joins)


def draw_core(rng: random.Random, sizes: list[int]) -> Core:
    groups = tuple(
        (tuple(rng.choice([True, False]) for _ in range(size)), tuple(rng.choice(OPS) for _ in range(size - 1)))
        for size in sizes
    )
    return Core(groups, tuple(rng.choice(OPS) for _ in range(len(sizes) - 1)))


def _with_value(rng: random.Random, core: Core, value: bool) -> Core:
    """`core` with as few literals flipped as give it `value` (a random choice among the smallest
    such sets). Always possible: all-True literals make an and/or formula True, all-False False."""
    literals = core.literals()
    positions = list(range(len(literals)))
    for size in range(len(literals) + 1):
        flips = list(combinations(positions, size))
        rng.shuffle(flips)
        for flip in flips:
            changed = list(literals)
            for i in flip:
                changed[i] = not changed[i]
            if core.value_with(changed) == value:
                return core.with_literals(changed)
    raise AssertionError("unreachable: flipping every literal to `value` gives `value`")


def item(expression: str, answer: bool, variant: str) -> Item:
    shortcut = expression.rsplit(" ", 1)[-1].strip("()")  # the last literal
    return Item(f"{expression}\n{ASK}", str(answer), shortcut, variant)


def draw_pair(rng: random.Random) -> tuple[Item, Item]:
    core = draw_core(rng, [rng.randint(2, 4) for _ in range(3)])
    op = rng.choice(OPS)
    literal = op == "or"  # the decisive suffixes: `and False`, `or True`
    holds = item(f"({core.text()}) {op} {literal}", literal, "holds")
    swapped = "and" if op == "or" else "or"
    broken_core = _with_value(rng, core, not literal)
    broken = item(f"({broken_core.text()}) {swapped} {literal}", not literal, "broken")
    return holds, broken


def draw_faithful(rng: random.Random, variant: str) -> Item:
    sizes, largest = [], 4
    for _ in range(3):
        largest = rng.randint(2, largest)  # the original reuses its size bound as the size
        sizes.append(largest)
    core = draw_core(rng, sizes)
    if variant == "holds":
        return item(core.text(), core.value(), "holds")
    suffix = rng.choice(["or False", "and True"])
    return item(f"({core.text()}) {suffix}", core.value(), "broken")


TASK = ImplicitTask(
    name="boolean",
    instruction=(
        "Here are some boolean expressions, you need to directly tell me the result. "
        "If it is true, print True, else print False."
    ),
    labels=(" True", " False"),
    answer_prefix=" ",
    label_end="",
    gap="\n",
    draw_pair=draw_pair,
    draw_faithful=draw_faithful,
)
