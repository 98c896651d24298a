"""The run-start tokenization check and token counts (SPEC §4).

Before a run scores anything, the prompts the builder makes from pieces are compared with the
tokenizer's own ids for the rendered text, on the prefix of the largest K and a sample of queries
with both labels; a tokenizer for which they differ is refused with the first differing position
and the tokens around it. The counts of tokens per integer and per label are recorded in the spec,
and a run warns when integers take several tokens (the 2D study assumes one token per integer).
"""

from __future__ import annotations

import logging

import numpy as np

from iclsft.prompts import PromptBuilder, TokenizationError, builder_key, mismatch
from iclsft.spec import RunSpecBase, TaskSpec, TokenCounts
from iclsft.tasks import linear2d

logger = logging.getLogger(__name__)

SAMPLE_QUERIES = 16  # plus the four corners of the grid


def check_prompts(builder: PromptBuilder, task: TaskSpec, shots: int, seed: int = 0, order: str = "random",
                  n_queries: int = SAMPLE_QUERIES) -> int:
    """Check prefix (K = `shots`), prefix + query and prefix + query + label against the tokenizer
    on the whole text, after the K-shot prefix and after the start alone (K=0, SFT); in chat mode
    the text is rendered by the chat template itself. Returns the number of sequences checked."""
    ex = linear2d.exemplars(task, seed, shots, order)
    grid = linear2d.queries(task)
    rng = np.random.default_rng(seed)
    corners = [(grid.n1.min(), grid.n2.min()), (grid.n1.min(), grid.n2.max()), (grid.n1.max(), grid.n2.min()),
               (grid.n1.max(), grid.n2.max())]
    pick = rng.choice(len(grid), size=min(n_queries, len(grid)), replace=False)
    points = corners + list(zip(grid.n1.to_numpy()[pick], grid.n2.to_numpy()[pick]))
    checked = 0
    for n1, n2, label in ((ex.n1, ex.n2, ex.truth), ([], [], [])):
        prefix = builder.prefix(n1, n2, label)  # checks the prefix itself
        body = builder.prefix_text(n1, n2, label)[len(builder.head):]
        for (a, b), query in zip(points, builder.queries_after(prefix, [p[0] for p in points], [p[1] for p in points])):
            for y, label_ids in enumerate([[]] + builder.label_ids):
                got = prefix + query + label_ids
                text = _rendered(builder, body + builder.query_text(a, b)) + (builder.labels[y - 1] if y else "")
                want = builder.natural(text)
                if got != want:
                    what = "query" if not y else f"query + label {builder.labels[y - 1]!r}"
                    raise TokenizationError(
                        f"prompts cannot equal this tokenizer's tokenization of their text ({len(n1)} exemplars, "
                        f"{what} at ({a}, {b})): {mismatch(builder.tokenizer, got, want)}")
                checked += 1
    return checked


def _rendered(builder: PromptBuilder, user: str) -> str:
    """The full text before the label: header, exemplars and query, in chat mode as the user's turn."""
    if not builder.template.chat:
        return builder.head + user
    return builder.tokenizer.apply_chat_template(
        [{"role": "user", "content": builder.template.header + user}], add_generation_prompt=True, tokenize=False)


def token_counts(builder: PromptBuilder, task: TaskSpec) -> TokenCounts:
    """Tokens per integer 0..99 (written as x1 and as x2 of a query after an exemplar: the tokens whose
    characters overlap the value's) and per scored label."""
    tmpl, other = builder.template.query, builder.value(0)
    texts, spans = [], []
    for slot in ("x1", "x2"):
        for v in range(100):
            fields = {"x1": other, "x2": other, slot: builder.value(v)}
            start = len(builder.after) + len(tmpl[: tmpl.index("{" + slot + "}")].format(**fields))
            texts.append(builder.after + tmpl.format(**fields))
            spans.append((start, start + len(builder.value(v))))
    enc = builder.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    counts = [sum(1 for s, e in offsets if s < hi and e > lo and e > s)
              for offsets, (lo, hi) in zip(enc["offset_mapping"], spans)]
    return TokenCounts(labels=tuple(builder.labels), words=task.words, integer_min=min(counts),
                       integer_max=max(counts), integer_mean=round(float(np.mean(counts)), 3),
                       label_tokens=tuple(len(ids) for ids in builder.label_ids))


def split_warning(counts: TokenCounts) -> str | None:
    """A one-line warning when integers take more than one token, else None."""
    if counts.integer_max <= 1:
        return None
    what, each = (f"the {counts.words} words", "word") if counts.words else ("integers 0..99", "integer")
    return (f"this tokenizer splits {what} into {counts.integer_min}-{counts.integer_max} tokens "
            f"(mean {counts.integer_mean:g}); the 2D study assumes one token per {each}")


def check_run(spec: RunSpecBase, builders: dict) -> RunSpecBase:
    """Run start: check every builder's prompts (largest K, first seed and order) and return the spec
    with the token counts recorded; log a warning when integers are split."""
    seen, counts = set(), []
    for task in spec.tasks:
        key = builder_key(task)
        if key in seen:
            continue
        seen.add(key)
        builder = builders[key]
        check_prompts(builder, task, max(spec.shots), spec.seeds[0], spec.orders[0])
        counts.append(token_counts(builder, task))
        warning = split_warning(counts[-1])
        if warning:
            logger.warning("%s", warning)
    return spec.model_copy(update={"tokens": tuple(counts)})
