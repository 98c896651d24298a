"""Code reading with an irrelevant function (notes §3.4), on generated programs.

The original's 536 snippets are not available, so programs are generated:

    def function1(x):
        <one of 8 templates: loops, arithmetic, branches; constants drawn per item>
    def function2(z, a):
        return z <op> n
    print(function2(v, function1(v)))

v in 0..10, op in + - * // (integers only, no float division), n in 1..20 for + and -, 2..9
for * and //. The answer is the printed integer; the shortcut is v <op> n.

- holds: function2 ignores `a`, so the answer is v <op> n whatever function1 does.
- broken: the holds twin with `return z` changed to `return a`: the answer is function1(v) <op> n,
  and items where that equals v <op> n are redrawn.
- no faithful mode: the original snippets (and their first-digit label bug) cannot be reproduced.

Open answer (no label set): scored by greedy generation and exact match with `Item.answer`.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

from iclsft.tasks.implicit.core import ImplicitTask, Item

OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "//": operator.floordiv,
}
OPERANDS = {"+": (1, 20), "-": (1, 20), "*": (2, 9), "//": (2, 9)}
ASK = "The output is:"


def _collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def _fibonacci(p: int, q: int, x: int) -> int:
    for _ in range(x):
        p, q = q, p + q
    return p


def _mod_product(c: int, k: int, m: int, x: int) -> int:
    result = c
    for i in range(1, x + 1):
        result = (result * k + i) % m
    return result


def _countdown(x: int, c: int, k: int) -> int:
    count = 0
    while x > c:
        x -= k
        count += x
    return count


@dataclass(frozen=True)
class Template:
    """A body for function1 with constants {c} {k} {m}, and its value computed here in Python."""

    body: str
    value: Callable[[int, int, int, int], int]  # (x, c, k, m) -> function1(x)


TEMPLATES = (
    Template(
        "    total = {c}\n    for i in range(x):\n        total += i * {k}\n    return total",
        lambda x, c, k, m: c + k * (x * (x - 1) // 2),
    ),
    Template(
        "    result = {c}\n    for i in range(1, x + 1):\n        result = (result * {k} + i) % {m}\n    return result",
        lambda x, c, k, m: _mod_product(c, k, m, x),
    ),
    Template(
        "    n = x + {c}\n    steps = 0\n    while n != 1:\n        if n % 2 == 0:\n            n = n // 2\n"
        "        else:\n            n = 3 * n + 1\n        steps += 1\n    return steps",
        lambda x, c, k, m: _collatz_steps(x + c),
    ),
    Template(
        "    values = [i * i - {k} for i in range(x + {c})]\n    return sum(values) % {m}",
        lambda x, c, k, m: sum(i * i - k for i in range(x + c)) % m,
    ),
    Template(
        "    if x % 2 == 0:\n        return x * {k} - {c}\n    return x + {k} * {c}",
        lambda x, c, k, m: x * k - c if x % 2 == 0 else x + k * c,
    ),
    Template(
        "    p, q = {c}, {k}\n    for _ in range(x):\n        p, q = q, p + q\n    return p % {m}",
        lambda x, c, k, m: _fibonacci(c, k, x) % m,
    ),
    Template(
        "    text = str(x * {k} + {c})\n    return sum(int(d) for d in text) * len(text)",
        lambda x, c, k, m: sum(int(d) for d in str(x * k + c)) * len(str(x * k + c)),
    ),
    Template(
        "    count = 0\n    while x > {c}:\n        x -= {k}\n        count += x\n    return count",
        lambda x, c, k, m: _countdown(x, c, k),
    ),
)


def program(body: str, uses: str, op: str, n: int, v: int) -> str:
    return (
        f"def function1(x):\n{body}\n"
        f"def function2(z, a):\n    return {uses} {op} {n}\n"
        f"print(function2({v}, function1({v})))"
    )


def question(code: str) -> str:
    return f"The code is:\n{code}\n{ASK}"


def draw_pair(rng: random.Random) -> tuple[Item, Item]:
    while True:
        template = rng.choice(TEMPLATES)
        c, k, m = rng.randint(1, 9), rng.randint(2, 9), rng.randint(7, 31)
        if template is TEMPLATES[-1]:
            c, k = c % 4, k % 3 + 1  # keep the countdown short: stop at 0..3, step 1..3
        op = rng.choice(list(OPS))
        n = rng.randint(*OPERANDS[op])
        v = rng.randint(0, 10)
        shortcut = OPS[op](v, n)
        answer = OPS[op](template.value(v, c, k, m), n)
        if answer != shortcut:
            break
    body = template.body.format(c=c, k=k, m=m)
    holds = Item(question(program(body, "z", op, n, v)), str(shortcut), str(shortcut), "holds")
    broken = Item(question(program(body, "a", op, n, v)), str(answer), str(shortcut), "broken")
    return holds, broken


TASK = ImplicitTask(
    name="code",
    instruction="Now you need to give me the printed result after running this python code.",
    labels=None,
    answer_prefix=" ",
    label_end="",
    gap="\n",
    draw_pair=draw_pair,
)
