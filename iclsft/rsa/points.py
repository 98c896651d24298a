"""Which points the RSA similarity matrix holds, and in which order (SPEC §7).

`exemplars` (the default, as in the study): the condition's exemplars plus test inputs, 400 in all.

- Exemplars: the condition's 2K points (`linear2d.exemplars(task, seed, K, order)`, the same for ICL
  and every SFT method at that task, seed, K and order). When 2K > 200, a label-balanced sample of
  100 per class, drawn by sorting uniform keys from `default_rng(EXEMPLAR_SEED)` over each class's
  exemplars in prompt order, so ICL and SFT at the same K and seed get the same sample.
- Test inputs: hold-out lattice points (off the boundary, not one of the condition's exemplars),
  (400 − exemplars) / 2 per class (fewer when a class of a coarse lattice has fewer). All conditions
  of a task walk one fixed permutation of the query lattice (uniform keys from
  `default_rng(TEST_SEED)`, so it depends on the lattice only) and take each class's first hold-out
  points in it: they share their test points except those that are another condition's exemplars,
  and a condition with fewer test points takes a prefix of that walk.
- Order: exemplars first, then test points; within each kind class 0 then class 1; within each of
  these four blocks grid order (n1, then n2). Kind first, so the exemplar block sits in the
  top-left corner, where the study's "exemplars are more similar to each other" shows.

`grid`: the fixed label-balanced grid subset of earlier versions (200 per class of the query
lattice, `stats.balanced_subset`), class 0 first; a point is marked as an exemplar when it is one
of the condition's exemplars.

The exemplars' activations are read explicitly (the exemplar point as the query after the
condition's prompt prefix), because with grid_step > 1 they need not lie on the query lattice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from iclsft.rsa.stats import balanced_subset

SUBSETS = ("exemplars", "grid")
DEFAULT_SUBSET = "exemplars"
MATRIX_SIZE = 400
MAX_EXEMPLARS = 200
EXEMPLAR_SEED = 0
TEST_SEED = 1


@dataclass(frozen=True)
class MatrixPoints:
    """The matrix's points in matrix order, and where each one's activations are.

    `source[i]` is the activation row of point i: below len(lattice) a lattice point, from there
    on row len(lattice) + j of `extra` (points read beyond the lattice, appended after it)."""

    n1: np.ndarray
    n2: np.ndarray
    truth: np.ndarray
    is_exemplar: np.ndarray
    source: np.ndarray
    extra: pd.DataFrame


def check_subset(subset: str) -> str:
    if subset not in SUBSETS:
        raise ValueError(f"RSA matrix subset {subset!r} is not allowed: use one of {', '.join(SUBSETS)}")
    return subset


def _shuffled(n: int, seed: int) -> np.ndarray:
    # by sorting uniform keys, as the exemplar stream does: depends only on the PCG64 stream
    return np.argsort(np.random.default_rng(seed).random(n), kind="stable")


def exemplar_sample(exemplars: pd.DataFrame, max_exemplars: int = MAX_EXEMPLARS,
                    seed: int = EXEMPLAR_SEED) -> np.ndarray:
    """Row positions of the exemplars the matrix holds: all of them when there are at most
    `max_exemplars`, else max_exemplars / 2 of each class, drawn with a fixed seed."""
    truth = exemplars["truth"].to_numpy()
    if len(truth) <= max_exemplars:
        return np.arange(len(truth), dtype=np.int64)
    rng_seed = seed
    picks = []
    for label in (0, 1):
        members = np.flatnonzero(truth == label)
        picks.append(np.sort(members[_shuffled(len(members), rng_seed)[: max_exemplars // 2]]))
        rng_seed += 1  # a stream per class: class 1's draw does not depend on class 0's size
    return np.concatenate(picks).astype(np.int64)


def holdout_sample(lattice: pd.DataFrame, per_class: int, seed: int = TEST_SEED) -> np.ndarray:
    """Lattice indices of the test points: per class, the first `per_class` hold-out points (truth
    0/1, not an exemplar) in one fixed permutation of the lattice; fewer if a class has fewer.
    Class 0 first, each class in grid order."""
    truth = lattice["truth"].to_numpy()
    holdout = (truth >= 0) & ~lattice["is_exemplar"].to_numpy(dtype=bool)
    walk = _shuffled(len(lattice), seed)
    m = min(per_class, int((holdout & (truth == 0)).sum()), int((holdout & (truth == 1)).sum()))
    picks = []
    for label in (0, 1):
        members = walk[holdout[walk] & (truth[walk] == label)]
        picks.append(np.sort(members[:m]))
    return np.concatenate(picks).astype(np.int64)


def matrix_points(lattice: pd.DataFrame, exemplars: pd.DataFrame, subset: str = DEFAULT_SUBSET, *,
                  size: int = MATRIX_SIZE, max_exemplars: int = MAX_EXEMPLARS) -> MatrixPoints:
    """The matrix's points for one condition. `lattice`: `linear2d.queries(task, exemplars)` (the
    query lattice with truth and is_exemplar); `exemplars`: the condition's 2K points (n1, n2, truth)."""
    check_subset(subset)
    n1, n2 = lattice["n1"].to_numpy(), lattice["n2"].to_numpy()
    truth = lattice["truth"].to_numpy()
    if subset == "grid":
        rows = balanced_subset(truth, size // 2)
        return MatrixPoints(n1=n1[rows], n2=n2[rows], truth=truth[rows],
                            is_exemplar=lattice["is_exemplar"].to_numpy(dtype=bool)[rows], source=rows,
                            extra=pd.DataFrame({"n1": [], "n2": []}, dtype=np.int64))
    if size % 2 or max_exemplars % 2 or max_exemplars >= size:
        raise ValueError(f"matrix size {size} and exemplar cap {max_exemplars} must be even, the cap below the size")
    ex = exemplars.iloc[exemplar_sample(exemplars, max_exemplars)]
    ex = ex.sort_values(["truth", "n1", "n2"], kind="stable")  # class 0 first, grid order in each class
    tests = holdout_sample(lattice, (size - len(ex)) // 2)
    extra = pd.DataFrame({"n1": ex["n1"].to_numpy(dtype=np.int64), "n2": ex["n2"].to_numpy(dtype=np.int64)})
    return MatrixPoints(
        n1=np.concatenate([extra["n1"].to_numpy(), n1[tests]]),
        n2=np.concatenate([extra["n2"].to_numpy(), n2[tests]]),
        truth=np.concatenate([ex["truth"].to_numpy(dtype=np.int64), truth[tests]]),
        is_exemplar=np.repeat([True, False], [len(ex), len(tests)]),
        source=np.concatenate([len(lattice) + np.arange(len(ex)), tests]).astype(np.int64),
        extra=extra,
    )
