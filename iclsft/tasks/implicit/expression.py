"""Expression calculation with a reducible term (notes §3.1): `(S)+(Z)*(C)=`.

Each part is a sum of terms written without spaces, e.g. `(0+2)+(-1+1)*(3-1+9-15)=`: all terms but
the last are drawn uniformly, the last one brings the part to its target sum.

- S: 1-2 terms drawn from 0..10, summing to g, uniform over 0..10.
- Z: 2-4 terms drawn from -20..20; C: 4 terms drawn from -10..10, summing to c in -10..10.
- holds: Z sums to 0, so the answer is g (the shortcut: ignore the product).
- broken (our fix): Z sums to z != 0 and C to c with g + z*c = a, a in 0..10, a != g, a uniform
  over the values reachable by the edit below (in practice all of 0..10 minus g). The broken item is
  its holds twin with the last term of Z and (only where needed) the last term of C changed, each
  keeping its number of digits, so both questions have the same character structure.
- faithful broken (the original `need_false`): Z replaced by a fresh 2-4 term sum with a target
  uniform in -20..20, so the answer g + z*c mostly falls outside 0..10 (about 88%), and equals g
  whenever z or c is 0.
"""

from __future__ import annotations

import random

from iclsft.tasks.implicit.core import ImplicitTask, Item

ANSWERS = range(11)


def sum_terms(rng: random.Random, n_terms: int, draw: int, target: int, minus: bool = True) -> list[int]:
    """`n_terms` integers summing to `target`: all but the last drawn from [-draw, draw] (from
    [0, draw] without `minus`), the last one balancing."""
    if n_terms == 1:
        return [target]
    low = -draw if minus else 0
    terms = [rng.randint(low, draw) for _ in range(n_terms - 1)]
    return terms + [target - sum(terms)]


def write(terms: list[int]) -> str:
    """`[3, -1, 9, -15]` -> `3-1+9-15`: no space, no sign on a non-negative first term."""
    return str(terms[0]) + "".join(f"{t:+d}" for t in terms[1:])


def question(s: list[int], z: list[int], c: list[int]) -> str:
    return f"({write(s)})+({write(z)})*({write(c)})="


def _digits(value: int) -> int:
    return len(str(abs(value)))


def _edits(g: int, z: list[int], c: list[int]) -> dict[int, list[tuple[int, int]]]:
    """For each reachable broken answer a, the (z_sum, c_sum) choices with g + z_sum*c_sum = a that
    change only last terms and keep their digit counts (every non-first term carries a sign, so
    the character structure stays the same)."""
    c_sum = sum(c)
    reachable: dict[int, list[tuple[int, int]]] = {}
    for a in ANSWERS:
        d = a - g
        if d == 0:
            continue
        options = []
        for z_sum in range(-abs(d), abs(d) + 1):
            if z_sum == 0 or d % z_sum:
                continue
            c_new = d // z_sum
            z_last, c_last = z[-1] + z_sum, c[-1] + c_new - c_sum
            if _digits(z_last) == _digits(z[-1]) and _digits(c_last) == _digits(c[-1]):
                options.append((z_sum, c_new))
        if options:
            reachable[a] = options
    return reachable


def _holds_parts(rng: random.Random) -> tuple[int, list[int], list[int], list[int]]:
    g = rng.randint(0, 10)
    s = sum_terms(rng, rng.randint(1, 2), 10, g, minus=False)
    z = sum_terms(rng, rng.randint(2, 4), 20, 0)
    c = sum_terms(rng, 4, 10, rng.randint(-10, 10))
    return g, s, z, c


def draw_pair(rng: random.Random) -> tuple[Item, Item]:
    while True:
        g, s, z, c = _holds_parts(rng)
        reachable = _edits(g, z, c)
        if reachable:
            break
    a = rng.choice(sorted(reachable))
    options = reachable[a]
    # Prefer leaving C alone: then the pair differs in one number only.
    same_c = [option for option in options if option[1] == sum(c)]
    z_sum, c_sum = rng.choice(same_c or options)
    z_broken = z[:-1] + [z[-1] + z_sum]
    c_broken = c[:-1] + [c[-1] + c_sum - sum(c)]
    holds = Item(question(s, z, c), str(g), str(g), "holds")
    broken = Item(question(s, z_broken, c_broken), str(a), str(g), "broken")
    return holds, broken


def draw_faithful(rng: random.Random, variant: str) -> Item:
    if variant == "holds":
        return draw_pair(rng)[0]
    g, s, _, c = _holds_parts(rng)
    z = sum_terms(rng, rng.randint(2, 4), 20, rng.randint(-20, 20))
    return Item(question(s, z, c), str(g + sum(z) * sum(c)), str(g), "broken")


TASK = ImplicitTask(
    name="expression",
    instruction="Now you need to calculate the answer of some mathematical equations.",
    # "1" is a prefix of "10" (tokens 1 | 1 0), so a bare label "10" could never outscore "1";
    # ending every label with the newline that closes the answer makes the set prefix-free.
    labels=tuple(f"{a}\n" for a in ANSWERS),
    answer_prefix="",
    label_end="\n",
    gap="",
    draw_pair=draw_pair,
    draw_faithful=draw_faithful,
)
