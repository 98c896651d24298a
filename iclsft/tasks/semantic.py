"""The `semantic` variant (SPEC §2): linear2d with n1 and n2 written as adjectives of a 100-word list
in axis order: "sentiment" (default, the study's; most negative to most positive) or "size"
(smallest to largest, the earlier default). Each list file's header says its source and order."""

from __future__ import annotations

from functools import cache, partial
from importlib import resources

from iclsft.tasks import registry
from iclsft.tasks.linear2d import GRID, truth

WORD_FILES = {"sentiment": "adjectives_sentiment.txt", "size": "adjectives.txt"}


@cache
def adjectives(words: str = "sentiment") -> tuple[str, ...]:
    """One of the 100-word lists, in axis order (value 0 first)."""
    if words not in WORD_FILES:
        raise ValueError(f"word list {words!r} is not allowed: choose one of {', '.join(WORD_FILES)}")
    name = WORD_FILES[words]
    text = resources.files("iclsft.tasks").joinpath(name).read_text(encoding="utf-8")
    # the first field of each line: a file may carry notes (e.g. ratings) after the word
    found = tuple(line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if len(found) != GRID or len(set(found)) != GRID:
        raise ValueError(f"{name} must hold {GRID} distinct words, one per line; it holds {len(found)}")
    return found


SEMANTIC = registry.register(registry.GridTask(
    name="semantic", truth=truth, boundary_angle=True,
    word_lists={name: partial(adjectives, name) for name in WORD_FILES}))
