"""Queries packed as token trees for the hf engine: one forward pass per tree (engine/hf.py).

Queries are sorted and inserted into a trie: queries that start with the same tokens share those
nodes, and each label's tokens but its last hang below the query's last node. A node sees the
prefix and its own ancestors only; its position is the prefix length plus its depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedBatch:
    """One forward pass worth of queries, as a token tree."""

    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)
    # per query (its index in the caller's list): per label, the (row node, target token) pairs
    reads: list[tuple[int, list[list[tuple[int, int]]]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def new_nodes(self, paths: Sequence[Sequence[int]]) -> int:
        """How many nodes inserting these root-to-leaf token paths would add."""
        seen: set[tuple[int, ...]] = set()
        count = 0
        for path in paths:
            node = -1
            for i, tok in enumerate(path):
                nxt = self.children.get((node, tok)) if node is not None else None
                if nxt is None:
                    key = tuple(path[: i + 1])
                    if key not in seen:
                        seen.add(key)
                        count += 1
                node = nxt
        return count

    def insert(self, path: Sequence[int]) -> int:
        node = -1
        for tok in path:
            nxt = self.children.get((node, tok))
            if nxt is None:
                nxt = len(self.tokens)
                self.children[(node, tok)] = nxt
                self.tokens.append(int(tok))
                self.parent.append(node)
                self.depth.append(self.depth[node] + 1 if node >= 0 else 0)
            node = nxt
        return node

    def add_query(self, index: int, query: Sequence[int], labels: Sequence[Sequence[int]]) -> None:
        last = self.insert(query)
        per_label = []
        for label in labels:
            # rows: the query's last node predicts label[0]; the node of label[i] predicts label[i+1]
            nodes = [last] + [self.insert(list(query) + list(label[: i + 1])) for i in range(len(label) - 1)]
            per_label.append(list(zip(nodes, label)))
        self.reads.append((index, per_label))

    def ancestor_mask(self) -> np.ndarray:
        """mask[i, j] = node j is node i or one of its ancestors."""
        n = len(self.tokens)
        mask = np.zeros((n, n), dtype=bool)
        for i, p in enumerate(self.parent):  # parents come before children
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask


def query_paths(query: Sequence[int], labels: Sequence[Sequence[int]]) -> list[list[int]]:
    """The root-to-leaf token paths one query adds to the tree."""
    return [list(query) + list(label[:-1]) for label in labels]


def pack(
    queries: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], token_budget: int
) -> list[PackedBatch]:
    """Split queries into token-tree batches of at most `token_budget` nodes (a lone query may exceed it)."""
    order = sorted(range(len(queries)), key=lambda i: queries[i])
    batches: list[PackedBatch] = []
    current = PackedBatch()
    for i in order:
        cost = current.new_nodes(query_paths(queries[i], labels))
        if current.reads and len(current) + cost > token_budget:
            batches.append(current)
            current = PackedBatch()
        current.add_query(i, queries[i], labels)
    if current.reads:
        batches.append(current)
    return batches
