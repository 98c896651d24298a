"""Relation reasoning whose answer follows the parity of the line count (notes §3.2).

Lines `X is connected with Y`; the question is whether city A and city Z are connected. The answer
is a breadth-first search over the stated edges; the shortcut is "an even number of lines means
True".

- holds (the original generator): the 9 cities B..J shuffled into a chain (8 lines) after the line
  `A is connected with X`, X a random city; a fair coin appends `X is connected with Z` (True,
  10 lines) or not (False, 9 lines). Z appears exactly in the True items.
- broken (ours), the holds twin edited in place, one or two letters, same line count:
  from a True twin -> False: one chain link has one city replaced by another city of its own side
  (the chain falls into two parts, one with a cycle) and the Z line's X is replaced by a city of
  the part without X: Z appears but is not reachable from A; 10 lines (even).
  From a False twin -> True: the chain's last city (its first if that one is X) is renamed Z in its
  one line: Z is the end of the chain, reachable; 9 lines (odd).
  So parity is wrong in every item, labels are 50/50 and Z appears in every broken item.
- faithful broken (the original `need_false`): the last chain line dropped, no Z line: 8 lines and
  False in every item (parity wrong, but "Z does not appear" still gives the answer).
"""

from __future__ import annotations

import random
from collections import deque

from iclsft.tasks.implicit.core import ImplicitTask, Item

CITIES = "BCDEFGHIJ"
ASK = "So the statement 'city A and city Z are connected' is"

Edge = tuple[str, str]


def question(edges: list[Edge]) -> str:
    return "".join(f"{x} is connected with {y}\n" for x, y in edges) + ASK


def connected(edges: list[Edge], start: str = "A", goal: str = "Z") -> bool:
    neighbours: dict[str, set[str]] = {}
    for x, y in edges:
        neighbours.setdefault(x, set()).add(y)
        neighbours.setdefault(y, set()).add(x)
    seen, todo = {start}, deque([start])
    while todo:
        city = todo.popleft()
        for other in neighbours.get(city, ()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return goal in seen


def item(edges: list[Edge], variant: str) -> Item:
    shortcut = len(edges) % 2 == 0
    return Item(question(edges), str(connected(edges)), str(shortcut), variant)


def _chain(rng: random.Random) -> tuple[list[str], str]:
    chain = list(CITIES)
    rng.shuffle(chain)
    return chain, rng.choice(chain)


def _cut(rng: random.Random, chain: list[str], x: str) -> list[Edge]:
    """The True twin's edges with the chain cut in two and Z hung on the part without X."""
    k = rng.randint(1, len(chain) - 1)  # cut the link chain[k-1] - chain[k]
    left, right = chain[:k], chain[k:]
    # Replace one end of the cut link by a non-adjacent city of the other end's side: a cycle
    # there, no duplicate line, and the two sides are no longer joined.
    options = [(left[-1], city) for city in left[:-2]] + [(city, right[0]) for city in right[2:]]
    links = list(zip(chain, chain[1:]))
    links[k - 1] = rng.choice(options)
    y = rng.choice(right if x in left else left)
    return [("A", x), *links, (y, "Z")]


def _attach(chain: list[str], x: str) -> list[Edge]:
    """The False twin's edges with the chain's last city (first if it is X) renamed Z."""
    links = list(zip(chain, chain[1:]))
    if x != chain[-1]:
        links[-1] = (chain[-2], "Z")
    else:
        links[0] = ("Z", chain[1])
    return [("A", x), *links]


def draw_pair(rng: random.Random) -> tuple[Item, Item]:
    chain, x = _chain(rng)
    edges = [("A", x), *zip(chain, chain[1:])]
    if rng.choice([True, False]):
        return item([*edges, (x, "Z")], "holds"), item(_cut(rng, chain, x), "broken")
    return item(edges, "holds"), item(_attach(chain, x), "broken")


def draw_faithful(rng: random.Random, variant: str) -> Item:
    if variant == "holds":
        return draw_pair(rng)[0]
    chain, x = _chain(rng)
    return item([("A", x), *zip(chain, chain[1:-1])], "broken")


TASK = ImplicitTask(
    name="relation",
    instruction=(
        "Here are some cities expressed as A, B, C, etc. I will show some connection relations, "
        "and you need to tell me if city A and city Z are connected (answer True or False)."
    ),
    labels=(" True", " False"),
    answer_prefix=" ",
    label_end="",
    gap="\n",
    draw_pair=draw_pair,
    draw_faithful=draw_faithful,
)
