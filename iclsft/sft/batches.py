"""Which examples each training step takes, and in which order (`iclsft.sft.train` trains in it;
`iclsft.sft.adapters.training_key` hashes it)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def batch_indices(step: int, n_examples: int, batch_size: int) -> list[int]:
    """Examples of one step: consecutive in stream order, restarting at each epoch."""
    per_epoch = math.ceil(n_examples / batch_size)
    start = (step % per_epoch) * batch_size
    return list(range(start, min(start + batch_size, n_examples)))


def canonical_order(examples: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int) -> list:
    """`examples` (stream order) with each batch's examples sorted by (prompt ids, label ids): the order
    training takes them in. The loss is a mean over a batch, so only which examples a batch holds can
    change the gradient; but the padded batch's row order changes the summation order (loss total,
    weight gradients), hence the last bits of the weights. Sorting makes equal multisets train alike."""
    n = len(examples)
    ordered: list = []
    for step in range(math.ceil(n / batch_size)):  # one epoch: every later epoch repeats its batches
        batch = [examples[i] for i in batch_indices(step, n, batch_size)]
        ordered += sorted(batch, key=lambda e: (list(map(int, e[0])), list(map(int, e[1]))))
    return ordered
