"""The implicit-pattern suite (SPEC §8, notes/implicit-patterns-facts.md §3): four tasks in which a
hidden shortcut gives the answer ("holds") or a wrong answer in every item ("broken").

API
---
    task = get_task("expression")        # or TASKS["expression"]; ValueError on an unknown name
    items = task.generate(n, seed, "holds" | "broken", faithful=False) -> list[Item]
    task.prompt(demos, item) -> str      # instruction + demos + query; demos must be "holds" items
    task.query(item) -> str              # == item.question; the answer follows it directly
    task.completion(item) -> str         # answer_prefix + answer + "\\n": what follows the query in a demo
    task.demo(item) -> str               # query + completion
    task.train_text(item) -> str         # one SFT example: the same text as a demo, no instruction
    task.label_of(item) -> str | None    # the gold label, exactly as in task.labels; None if open
    task.labels                          # the closed label set (strings that follow the query), or None
    pair(task, n, seed, count_tokens=None) -> list[tuple[Item, Item]]   # (holds, broken) minimal pairs

`Item(question, answer, shortcut, variant)`: `answer` is the gold answer by full evaluation and
`shortcut` the answer the hidden pattern predicts, both bare ("2", "True"); holds items have
shortcut == answer, broken items shortcut != answer, checked for every generated pair.

Tasks (details in each module's docstring):

- expression: shortcut sum(S) (ignore the zero-sum product); labels "0\n" .. "10\n" (with the
  newline, because "1" is a prefix of "10").
- relation: shortcut "an even line count means True"; labels " True", " False".
- boolean: shortcut "the last literal"; labels " True", " False".
- code: shortcut v <op> n (function2 ignores a); no labels: greedy generation, the continuation's
  first line stripped, exact match with the answer.

Pairs (for circuit analysis): the broken item is its holds twin edited in place; in every pair
both items have the same shortcut prediction and different gold answers. Edits: expression, the
last term of Z (and of C where needed) with the same digit counts; relation, one or two city
letters; boolean, the suffix operator (`and False` <-> `or False`, `or True` <-> `and True`) plus
the fewest core literals that give the needed value (none in about half the pairs); code,
`return z` -> `return a`. With the SmolLM2 tokenizer every sampled pair had equal token counts;
`pair(..., count_tokens=...)` drops unequal ones for other tokenizers. Boolean caveat: in both
variants `and` goes with False and `or` with True, so the suffix operator alone still predicts the
answer; only the last-literal rule is broken (inherent in `and True`/`or False` broken suffixes).

Prompt layout: `instruction + "\\n" + gap + (demo + gap) * K + query`, where gap = "" for the
one-line expression task and "\\n" (a blank line between examples) for the others. A demo ends with
a newline. The instruction is one fixed sentence per task (the original's wording minus its
"Here are some examples:" tail, which would be false at K = 0).

Seeds: item streams come from `random.Random("iclsft.tasks.implicit/<task>/<seed>")`, never the
global RNG, so (task, n, seed, variant, faithful) gives the same items in every process, and
`generate(m, ...)` is a prefix of `generate(n, ...)` for m < n. Without `faithful`, item i of the
two variants at one seed is the (holds, broken) pair i of `pair`, so demos and queries must be drawn
with different seeds (`prompt` rejects a query that is also a demo).

`faithful=True` reproduces the original generators' quirks: expression broken with a random-sum Z
(answers mostly outside 0..10, `label_of` then raises); relation broken = the original misleading
variant (8 lines, always False, Z absent); boolean without the decisive suffix and with shrinking
group sizes, broken with a value-preserving suffix. The holds variants of expression and relation
are the originals already (faithful gives the same items). code has no faithful mode (ValueError).
Prompt formats are ours in both modes; the original's prompt bugs (boolean 1/0 labels and its
collapsed demos, the code prompt's stray "The input is:") are not reproduced.
"""

from __future__ import annotations

import importlib
import pkgutil

from iclsft.tasks import registry
from iclsft.tasks.implicit.core import VARIANTS, ImplicitTask, Item, pair

ORDER = ("expression", "relation", "boolean", "code")  # the study's order; a new module (with a TASK) follows


def _task_modules() -> list[str]:
    found = [m.name for m in pkgutil.iter_modules(__path__) if m.name != "core"]
    return sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


TASKS: dict[str, ImplicitTask] = {}
for _name in _task_modules():
    _task = importlib.import_module(f"{__name__}.{_name}").TASK
    TASKS[_task.name] = registry.register(_task)


def get_task(name: str) -> ImplicitTask:
    """The implicit task called `name` (`iclsft.tasks.registry`); ValueError naming the allowed names."""
    return registry.get(name, "implicit")


__all__ = ["TASKS", "VARIANTS", "ImplicitTask", "Item", "get_task", "pair"]
