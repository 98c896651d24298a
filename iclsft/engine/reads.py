"""What engines that read next-token log-probs (vLLM in-process and over HTTP) share.

A label of several tokens is read token by token: the prompt `prefix + query` gives the first
token's log-prob, `prefix + query + label[:i]` gives token i. Reads with the same prompt are merged
(labels that start alike share them), so single-token labels cost exactly one read per query.

Adapters are named by the content of their files, so that two different adapters never share a
name (vLLM keys its prefix cache by adapter name: notes/vllm-facts.md §2) and one adapter scored
twice is recognised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# vLLM accepts only these LoRA ranks as max_lora_rank
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class ReadPlan:
    """Unique prompts to read after, the token ids to read at each, and how reads sum to labels."""

    prompts: list[list[int]] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    parts: list[tuple[int, int, int, int]] = field(default_factory=list)  # (query, label, read, token)

    def assemble(self, values: Sequence[dict[int, float]], n_queries: int, n_labels: int) -> np.ndarray:
        """Sum the read log-probs into the (queries, labels) array; a missing read is an error."""
        out = np.zeros((n_queries, n_labels))
        for q, j, read, token in self.parts:
            got = values[read].get(token)
            if got is None:
                raise RuntimeError(f"the engine returned no log-prob for token {token} (read {read} of query {q})")
            out[q, j] += got
        return out


def plan_reads(prefix: Sequence[int], queries: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> ReadPlan:
    if not labels:
        raise ValueError("no labels to score: give at least one label")
    empty = [j for j, label in enumerate(labels) if len(label) == 0]
    if empty:
        raise ValueError(f"label {empty[0]} has no tokens: every label needs at least one token")
    plan = ReadPlan()
    index: dict[tuple[int, ...], int] = {}
    prefix = list(prefix)
    for q, query in enumerate(queries):
        for j, label in enumerate(labels):
            for i, token in enumerate(label):
                tail = tuple(query) + tuple(label[:i])
                read = index.get(tail)
                if read is None:
                    read = index[tail] = len(plan.prompts)
                    plan.prompts.append(prefix + list(tail))
                    plan.token_ids.append([])
                if token not in plan.token_ids[read]:
                    plan.token_ids[read].append(int(token))
                plan.parts.append((q, j, read, int(token)))
    return plan


def adapter_digest(path: str | Path) -> str:
    """sha256 of an adapter's config and weights (not of its path)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():  # weights alone are no adapter vLLM can load
        raise FileNotFoundError(f"{str(path)!r} is not a peft adapter directory (no adapter_config.json)")
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def adapter_name(path: str | Path) -> str:
    return "iclsft-" + adapter_digest(path)[:24]


def adapter_rank(path: str | Path) -> int:
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    return int(config.get("r", 8))


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
