"""RSA statistics of one layer's activations (SPEC §7), without ever forming the N x N matrix.

- Histogram of cosine similarity over all pairs i < j, in fixed bins, computed a block of rows at a
  time against the rows after them (upper triangle only).
- The cosine matrix of the matrix points (iclsft.rsa.points: the condition's exemplars plus test
  inputs, or a fixed label-balanced grid subset), in the order given, with the mean similarity
  within the exemplars, within the test points and between the two (off-diagonal pairs only).
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


def block_means(sims: torch.Tensor, is_exemplar: np.ndarray) -> tuple[float, float, float]:
    """(within exemplars, within test points, exemplar-test): mean of `sims` (M, M) over ordered pairs
    i != j with both rows exemplars, both not, and one of each. NaN where a block has no such pair."""
    ex = torch.as_tensor(np.array(is_exemplar, dtype=bool), device=sims.device)
    sims = sims.double()

    def mean(rows: torch.Tensor, cols: torch.Tensor, same: bool) -> float:
        block = sims[rows][:, cols]
        total, pairs = block.sum(), block.numel()
        if same:  # a square block of one kind: leave its diagonal (a point with itself) out
            total, pairs = total - block.diagonal().sum(), pairs - block.shape[0]
        return float(total) / pairs if pairs > 0 else float("nan")

    return mean(ex, ex, True), mean(~ex, ~ex, True), mean(ex, ~ex, False)


def layer_stats(acts: torch.Tensor, truth: np.ndarray, subset: np.ndarray,
                is_exemplar: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Histogram, collapse index, matrix and block means of every layer of `acts` (layers, rows, hidden).

    The first len(truth) rows are the query lattice (histogram and collapse index are over them);
    `subset` picks the matrix's rows, which may lie beyond the lattice (exemplars off the lattice);
    `is_exemplar` marks the matrix's exemplar rows (default: none)."""
    n = len(truth)
    if acts.shape[1] < n or (len(subset) and int(np.max(subset)) >= acts.shape[1]):
        raise ValueError(f"activations have {acts.shape[1]} rows; the lattice needs {n} and the matrix rows "
                         f"up to {int(np.max(subset, initial=-1))}")
    is_exemplar = np.zeros(len(subset), dtype=bool) if is_exemplar is None else np.asarray(is_exemplar, dtype=bool)
    if is_exemplar.shape != (len(subset),):
        raise ValueError(f"is_exemplar has shape {is_exemplar.shape}; the matrix has {len(subset)} rows")
    keys = ("hist", "sub", "collapse", "within", "between", "within_exemplar", "within_test", "exemplar_test")
    out: dict[str, list] = {k: [] for k in keys}
    index = torch.as_tensor(np.asarray(subset, dtype=np.int64), device=acts.device)
    for layer in acts:
        u = unit_rows(layer.float())
        lattice = u[:n]
        out["hist"].append(cosine_histogram(lattice))
        s = u[index]
        sims = (s @ s.T).clamp_(-1.0, 1.0)
        out["sub"].append(sims.to(torch.float16).cpu().numpy())
        for key, value in zip(keys[2:5], collapse_index(lattice, truth)):
            out[key].append(value)
        for key, value in zip(keys[5:], block_means(sims, is_exemplar)):
            out[key].append(value)
    return {k: np.stack(v) if k in ("hist", "sub") else np.array(v, dtype=np.float64) for k, v in out.items()}
