"""The 2D study's grid, its matched exemplar stream (SPEC §3), and the task `linear2d` (SPEC §2).
The variants are modules of their own (`xor`, `semantic`), registered like any task
(`iclsft.tasks.registry`); everything here works for every registered 2D task.

One object serves both arms: the same stream gives the ICL prompt at K and the SFT data at K.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from iclsft.tasks import registry

if TYPE_CHECKING:  # the spec layer sits above the tasks (it checks names against the registry)
    from iclsft.spec import TaskSpec

GRID = 100  # n1, n2 in 0..99
CENTER = 49.5
TIE_EPS = 1e-9
RANDOM_ORDER = "random"


def lattice(step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All lattice points (n1-major order): n1, n2 in {0, step, 2*step, ...} below 100."""
    values = np.arange(0, GRID, step)
    n1, n2 = np.meshgrid(values, values, indexing="ij")
    return n1.ravel(), n2.ravel()


def margin(n1: np.ndarray, n2: np.ndarray, angle: float) -> np.ndarray:
    """Signed distance to the boundary through (49.5, 49.5) at `angle` degrees from the n1 axis."""
    theta = np.deg2rad(angle)
    return -np.sin(theta) * (np.asarray(n1) - CENTER) + np.cos(theta) * (np.asarray(n2) - CENTER)


def truth(n1: np.ndarray, n2: np.ndarray, angle: float, swap_labels: bool = False) -> np.ndarray:
    """Index of the true label (0 = first label) or -1 on the boundary.

    margin > 0 gets the first label, margin < 0 the second; `swap_labels` exchanges them.
    """
    m = margin(n1, n2, angle)
    t = np.where(m > 0, 0, 1).astype(np.int8)
    if swap_labels:
        t = 1 - t
    t[np.abs(m) < TIE_EPS] = -1
    return t


def task_truth(task: TaskSpec, n1: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """The task's true label index per point (0 = first label), -1 on a boundary (the registered
    task's `truth`, labels exchanged where `swap_labels`)."""
    return registry.get(task.name, "linear2d").labels_of(n1, n2, task.angle, task.swap_labels)


def has_boundary_angle(task_name: str) -> bool:
    """Whether the task's classes are split by one line at its angle, so that an inferred boundary
    angle means something (`linear2d`, `semantic`: yes; `xor`, two perpendicular lines: no)."""
    return registry.get(task_name, "linear2d").boundary_angle


def values(task: TaskSpec) -> tuple[str, ...] | None:
    """How n1 and n2 are written in prompts: the task's word list (`semantic`), None for integers."""
    return registry.get(task.name, "linear2d").words(task.words)


def check_order(order: str) -> str:
    """Validate an order probe: "random" or a periodic label pattern over {1, 2} (1 = first label).

    The stream is built from pairs holding one exemplar of each class, so a pattern must consist of
    aligned pairs "12" or "21"; that keeps both classes balanced at every K.
    """
    if order == RANDOM_ORDER:
        return order
    pairs = [order[i : i + 2] for i in range(0, len(order), 2)]
    if not order or set(order) - {"1", "2"} or len(order) % 2 or any(p not in ("12", "21") for p in pairs):
        raise ValueError(
            f"order pattern {order!r} is not allowed: use 'random' or a pattern over {{1,2}} made of "
            "aligned pairs '12'/'21' (e.g. '12', '1221', '12121221'), one exemplar per class per pair"
        )
    return order


def class_pools(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """Full-grid points of each class (boundary points excluded), as (n, 2) arrays in n1-major order.

    Exemplars always come from the full 100x100 grid, whatever the query grid_step, so a quick run
    on a sub-lattice uses exactly the prompts of the full run.
    """
    n1, n2 = lattice(1)
    t = task_truth(task, n1, n2)
    points = np.stack([n1, n2], axis=1)
    return points[t == 0], points[t == 1]


def exemplar_stream(task: TaskSpec, seed: int, order: str = RANDOM_ORDER) -> pd.DataFrame:
    """The full ordered stream for `seed`: pair i holds one exemplar of each class.

    Columns: pair, n1, n2, truth; one row per exemplar in prompt order. Its length does not depend
    on the shot counts asked for, so the prompt at K is a prefix of the prompt at any K' > K.
    """
    check_order(order)
    pool0, pool1 = class_pools(task)
    n_pairs = min(len(pool0), len(pool1))
    rng = np.random.default_rng(seed)
    # Shuffle by sorting uniform keys: depends only on the PCG64 stream, not on numpy's shuffle code.
    pool0 = pool0[np.argsort(rng.random(len(pool0)), kind="stable")][:n_pairs]
    pool1 = pool1[np.argsort(rng.random(len(pool1)), kind="stable")][:n_pairs]
    if order == RANDOM_ORDER:
        first_is_0 = rng.random(n_pairs) < 0.5
    else:
        period = len(order)
        first_is_0 = np.array([order[(2 * i) % period] == "1" for i in range(n_pairs)])
    first = np.where(first_is_0[:, None], pool0, pool1)
    second = np.where(first_is_0[:, None], pool1, pool0)
    points = np.stack([first, second], axis=1).reshape(-1, 2)
    labels = np.stack([np.where(first_is_0, 0, 1), np.where(first_is_0, 1, 0)], axis=1).reshape(-1)
    return pd.DataFrame(
        {
            "pair": np.repeat(np.arange(n_pairs), 2),
            "n1": points[:, 0].astype(np.int64),
            "n2": points[:, 1].astype(np.int64),
            "truth": labels.astype(np.int64),
        }
    )


def max_shots(task: TaskSpec) -> int:
    pool0, pool1 = class_pools(task)
    return min(len(pool0), len(pool1))


def check_shots(tasks, shots) -> None:
    """Every shot count must fit the class pools of every task (before anything is written)."""
    for task in tasks:
        available = max_shots(task)
        too_many = [k for k in shots if k > available]
        if too_many:
            raise ValueError(
                f"shot count {too_many[0]} is not allowed at angle {task.angle:g}: each class has "
                f"{available} grid points off the boundary, so shots must be in 1..{available}"
            )


def exemplars(task: TaskSpec, seed: int, shots: int, order: str = RANDOM_ORDER) -> pd.DataFrame:
    """The 2K exemplars (K per class) used at shot count K, in prompt order."""
    stream = exemplar_stream(task, seed, order)
    available = stream["pair"].iloc[-1] + 1
    if not 1 <= shots <= available:
        raise ValueError(
            f"shot count {shots} is not allowed at angle {task.angle:g}: each class has {available} "
            f"grid points off the boundary, so K must be in 1..{available}"
        )
    return stream[stream["pair"] < shots].reset_index(drop=True)


def queries(task: TaskSpec, exemplar_points: pd.DataFrame | None = None) -> pd.DataFrame:
    """All query points of the task's lattice with truth and, if given, exemplar membership."""
    n1, n2 = lattice(task.grid_step)
    table = pd.DataFrame({"n1": n1.astype(np.int64), "n2": n2.astype(np.int64)})
    table["truth"] = task_truth(task, n1, n2).astype(np.int64)
    used = set()
    if exemplar_points is not None:
        used = set(zip(exemplar_points["n1"].tolist(), exemplar_points["n2"].tolist()))
    table["is_exemplar"] = [(a, b) in used for a, b in zip(n1.tolist(), n2.tolist())]
    holdout = (~table["is_exemplar"]) & (table["truth"] >= 0)
    # The hold-out set must be disjoint from the exemplars (STYLE 4): checked, not assumed.
    assert not set(zip(table.n1[holdout], table.n2[holdout])) & used
    return table


LINEAR2D = registry.register(registry.GridTask(name="linear2d", truth=truth, boundary_angle=True))
