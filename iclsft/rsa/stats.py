"""RSA statistics of one layer's activations (SPEC §7), without ever forming the N x N matrix.

- Histogram of cosine similarity over all pairs i < j, in fixed bins, computed a block of rows at a
  time against the rows after them (upper triangle only).
- The cosine matrix of a fixed label-balanced subset, sorted by label.
- Collapse index = mean within-class cosine - mean between-class cosine over off-boundary pairs
  (i != j), exactly from class sums of the unit vectors: sum over ordered pairs i != j in class c of
  u_i.u_j = ||sum u||^2 - sum ||u_i||^2, and between classes sum u_i.u_j = S_0.S_1.
"""

from __future__ import annotations

import numpy as np
import torch

N_BINS = 100
BINS = np.linspace(-1.0, 1.0, N_BINS + 1)  # bin k holds [BINS[k], BINS[k+1]); the last one includes 1
SUBSET_PER_CLASS = 200
SUBSET_SEED = 0  # the subset depends on the task's lattice only: all its conditions share it
BLOCK_ELEMENTS = 2**24  # one block of the similarity matrix: 64 MB in fp32


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def cosine_histogram(u: torch.Tensor, *, block_rows: int | None = None) -> np.ndarray:
    """Counts of cos(u_i, u_j) over all pairs i < j of the unit rows `u`, in the bins `BINS`.

    Similarities are clipped to [-1, 1] first (rounding can give 1 + 1e-7), so the counts always sum
    to N(N-1)/2. Computed in `u`'s dtype and on its device."""
    n = u.shape[0]
    block_rows = block_rows or max(1, BLOCK_ELEMENTS // max(n, 1))
    inner = torch.from_numpy(BINS[1:-1]).to(device=u.device, dtype=u.dtype)
    counts = torch.zeros(N_BINS, dtype=torch.int64, device=u.device)
    for a in range(0, n, block_rows):
        b = min(a + block_rows, n)
        sims = (u[a:b] @ u[a:].T).clamp_(-1.0, 1.0)  # rows i in [a, b), columns j >= a
        square = sims[:, : b - a]  # the diagonal block: keep j > i only; the columns after it all count
        upper = torch.ones(square.shape, dtype=torch.bool, device=u.device).triu_(1)
        for values in (square[upper], sims[:, b - a :].contiguous().reshape(-1)):
            counts += bin_counts(values, inner)
    return counts.cpu().numpy()


def bin_counts(values: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Counts of `values` (within [-1, 1]) per bin: BINS[k] <= v < BINS[k+1] -> k, the last bin closed."""
    if values.device.type == "cpu":  # numpy's uniform-bin fast path is about 4x torch.bucketize on a CPU, as exact
        return torch.from_numpy(np.histogram(values.numpy(), bins=BINS)[0])
    return torch.bincount(torch.bucketize(values, inner, right=True), minlength=N_BINS)


def collapse_index(u: torch.Tensor, truth: np.ndarray) -> tuple[float, float, float]:
    """(within - between, within, between): mean cosine over ordered pairs i != j of off-boundary points
    of the same class, and of different classes. `truth` is 0/1, or -1 on the boundary (left out)."""
    truth = torch.as_tensor(np.array(truth), device=u.device)  # a copy: pandas may hand out read-only views
    sums, selfs, counts = [], [], []
    for label in (0, 1):
        members = u[truth == label].double()
        sums.append(members.sum(0))
        selfs.append((members * members).sum())
        counts.append(members.shape[0])
    within_pairs = sum(n * (n - 1) for n in counts)
    within = sum(float(s @ s - q) for s, q in zip(sums, selfs)) / within_pairs if within_pairs else float("nan")
    between = float(sums[0] @ sums[1]) / (counts[0] * counts[1]) if counts[0] * counts[1] else float("nan")
    return within - between, within, between


def balanced_subset(truth: np.ndarray, per_class: int = SUBSET_PER_CLASS, seed: int = SUBSET_SEED) -> np.ndarray:
    """Indices of `per_class` off-boundary points of each class (fewer if a class is smaller), chosen
    with a fixed seed; class 0 first, then class 1, each in grid order."""
    truth = np.asarray(truth)
    rng = np.random.default_rng(seed)
    m = min(per_class, int((truth == 0).sum()), int((truth == 1).sum()))
    picks = []
    for label in (0, 1):
        members = np.flatnonzero(truth == label)
        # by sorting uniform keys, as the exemplar stream does: depends only on the PCG64 stream
        picks.append(np.sort(members[np.argsort(rng.random(len(members)), kind="stable")[:m]]))
    return np.concatenate(picks).astype(np.int64)


def layer_stats(acts: torch.Tensor, truth: np.ndarray, subset: np.ndarray) -> dict[str, np.ndarray]:
    """Histogram, subset matrix and collapse index of every layer of `acts` (layers, N, hidden)."""
    hist, sub, collapse, within, between = [], [], [], [], []
    index = torch.as_tensor(subset, device=acts.device)
    for layer in acts:
        u = unit_rows(layer.float())
        hist.append(cosine_histogram(u))
        s = u[index]
        sub.append((s @ s.T).clamp_(-1.0, 1.0).to(torch.float16).cpu().numpy())
        c, w, b = collapse_index(u, truth)
        collapse.append(c), within.append(w), between.append(b)
    return {"hist": np.stack(hist), "sub": np.stack(sub), "collapse": np.array(collapse),
            "within": np.array(within), "between": np.array(between)}
