"""The naive reference: one full forward pass per (query, label), no caching, no packing.

Slow by design. It is what the fast engines are checked against, and the baseline in benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


@torch.inference_mode()
def naive_score(
    model, prefix: Sequence[int], queries: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]
) -> np.ndarray:
    """Log-prob of each label's tokens after prefix + query, from a plain forward of the whole text."""
    device = next(model.parameters()).device
    out = np.zeros((len(queries), len(labels)))
    for i, query in enumerate(queries):
        for j, label in enumerate(labels):
            ids = list(prefix) + list(query) + list(label)
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            start = len(ids) - len(label)  # position of the first label token
            out[i, j] = sum(logprobs[start - 1 + t, tok].item() for t, tok in enumerate(label))
    return out
