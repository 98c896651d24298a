"""The task registry: every task of both studies registers here, with what the arms need to know.

A 2D task (`GridTask`, SPEC §2) labels the points of the 100×100 grid; the linear2d study's stream,
prompts, scoring and metrics work for any of them. An implicit-pattern task (`ImplicitTask`,
SPEC §8) brings its item generator and prompt formats. Each says how it is evaluated: "labels" (a
closed label set, every label scored exactly) or "generate" (an open answer, greedy generation).

A new task or variant is one module that calls `register(...)` at import, plus its tests: every module
of the `iclsft.tasks` package (and of `iclsft.tasks.implicit`) is imported on first use, so dropping
`iclsft/tasks/<name>.py` in is all it takes. tests/test_task_registry.py registers a task of its own.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

STUDIES = ("linear2d", "implicit")
FIRST = ("linear2d", "xor", "semantic", "implicit")  # imported first, so built-in names list first

Truth = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class GridTask:
    """A task of the 2D study: `truth(n1, n2, angle)` gives each point's label index (0 = first label)
    or -1 on a boundary; `boundary_angle`: one line at the angle splits the classes, so an inferred
    boundary angle means something; `word_lists`: how values may be written instead of integers
    (name -> loader of 100 words, the first the default), empty for integers."""

    name: str
    truth: Truth = field(repr=False)
    boundary_angle: bool
    word_lists: dict[str, Callable[[], tuple[str, ...]]] = field(default_factory=dict, repr=False)
    study: str = "linear2d"
    evaluation: str = "labels"

    def labels_of(self, n1, n2, angle: float, swap_labels: bool = False) -> np.ndarray:
        """`truth`, with the two labels exchanged where `swap_labels` (boundary points stay -1)."""
        t = np.asarray(self.truth(np.asarray(n1), np.asarray(n2), angle), dtype=np.int8)
        return np.where(t >= 0, 1 - t, t).astype(np.int8) if swap_labels else t

    @property
    def default_words(self) -> str | None:
        return next(iter(self.word_lists), None)

    def words(self, name: str | None) -> tuple[str, ...] | None:
        """The 100 words for values 0..99 of the list `name` (None: integers)."""
        if name is None:
            return None
        if name not in self.word_lists:
            raise ValueError(f"word list {name!r} is not allowed for task {self.name!r}: "
                             f"choose one of {', '.join(self.word_lists) or 'none (it writes integers)'}")
        return self.word_lists[name]()


_REGISTRY: dict[str, object] = {}
_loaded = False


def register(task):
    """Add a task (a `GridTask`, or an implicit task with `study = "implicit"`); a name is taken once."""
    if task.study not in STUDIES:
        raise ValueError(f"task {task.name!r}: study {task.study!r} is not one of {', '.join(STUDIES)}")
    if task.name in _REGISTRY and _REGISTRY[task.name] is not task:
        raise ValueError(f"a task named {task.name!r} is registered already")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a task (tests that register their own)."""
    _REGISTRY.pop(name, None)


def _load() -> None:
    """Import every task module once (each registers its tasks)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import iclsft.tasks as package

    found = [m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "registry"]
    for name in sorted(found, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n)):
        importlib.import_module(f"iclsft.tasks.{name}")


def names(study: str | None = None) -> tuple[str, ...]:
    """Registered task names (of one study), built-in ones first, in registration order."""
    _load()
    return tuple(n for n, t in _REGISTRY.items() if study is None or t.study == study)


def get(name: str, study: str | None = None):
    """The task called `name` (of `study`); one ValueError line naming the allowed names otherwise."""
    _load()
    task = _REGISTRY.get(name) if isinstance(name, str) else None
    if task is None or (study is not None and task.study != study):
        what = f"{study} task" if study else "task"
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(names(study))}")
    return task
