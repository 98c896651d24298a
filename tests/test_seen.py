"""The seen-feature measure (iclsft/evaluate/seen.py): exact values for predictors whose answer is known,
a brute-force loop over the definition, and the row/column copier it exists to detect."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from iclsft.evaluate.seen import DISTANCE_BIN, seen_feature_effect
from iclsft.spec import TaskSpec
from iclsft.tasks import linear2d


def scored(task: TaskSpec, exemplars: pd.DataFrame, first: np.ndarray) -> pd.DataFrame:
    """A scores table whose raw prediction is the first label exactly where `first` is True."""
    q = linear2d.queries(task, exemplars)
    d = np.where(first, 1.0, -1.0)
    return q.assign(lp_0=-1.0 + d / 2, lp_1=-1.0 - d / 2)


def copier(q: pd.DataFrame, ex: pd.DataFrame) -> np.ndarray:
    """Predicts the label of the nearest exemplar in the query's row or column; the truth elsewhere."""
    out = q["truth"].to_numpy() == 0
    for i, (a, b) in enumerate(zip(q["n1"], q["n2"])):
        aligned = ex[(ex["n1"] == a) | (ex["n2"] == b)]
        if len(aligned):
            j = int(np.argmin(np.hypot(aligned["n1"] - a, aligned["n2"] - b)))
            out[i] = aligned["truth"].iloc[j] == 0
    return out


def brute_force(scores: pd.DataFrame, ex: pd.DataFrame) -> float:
    """The definition, one (query, exemplar) pair at a time."""
    counts: dict[tuple, list[float]] = {}
    for q in scores.itertuples():
        if q.truth == -1 or q.is_exemplar:
            continue
        pred = 0 if q.lp_0 - q.lp_1 >= 0 else 1
        for e in ex.itertuples():
            if e.truth == q.truth:
                continue
            kind = "aligned" if (e.n1 == q.n1 or e.n2 == q.n2) else "other"
            stratum = (e.truth, min(int(math.hypot(q.n1 - e.n1, q.n2 - e.n2) // DISTANCE_BIN), 29))
            c = counts.setdefault((kind, stratum), [0.0, 0.0])
            c[0] += 1
            c[1] += pred == e.truth
    strata = [s for (kind, s) in counts if kind == "aligned" and ("other", s) in counts]
    total = sum(counts[("aligned", s)][0] for s in strata)
    rate = {key: errors / pairs for key, (pairs, errors) in counts.items()}
    return sum(counts[("aligned", s)][0] / total * (rate[("aligned", s)] - rate[("other", s)]) for s in strata)


@pytest.mark.parametrize("angle,shots", [(0.0, 2), (30.0, 10), (45.0, 50)])
def test_perfect_and_constant_predictors_give_exactly_zero(angle, shots):
    task = TaskSpec(angle=angle, grid_step=2)
    ex = linear2d.exemplars(task, 1, shots)
    q = linear2d.queries(task, ex)
    assert seen_feature_effect(scored(task, ex, q["truth"].to_numpy() == 0), ex) == 0.0
    for label in (True, False):  # whatever the exemplars' label mix: the label strata make this exact
        assert seen_feature_effect(scored(task, ex, np.full(len(q), label)), ex) == 0.0


def test_matches_a_loop_over_the_definition():
    task = TaskSpec(angle=60.0)
    ex = linear2d.exemplars(task, 3, 6)
    q = linear2d.queries(task, ex)
    first = np.random.default_rng(0).random(len(q)) < 0.4
    scores = scored(task, ex, first)
    assert not math.isnan(brute_force(scores, ex))
    assert seen_feature_effect(scores, ex) == pytest.approx(brute_force(scores, ex), abs=1e-12)


def test_row_and_column_copier_is_detected_and_random_is_not():
    task = TaskSpec(angle=30.0, grid_step=2)
    effects = {"copier": [], "random": []}
    rng = np.random.default_rng(5)
    for seed in range(3):
        ex = linear2d.exemplars(task, seed, 10)
        q = linear2d.queries(task, ex)
        effects["copier"].append(seen_feature_effect(scored(task, ex, copier(q, ex)), ex))
        effects["random"].append(seen_feature_effect(scored(task, ex, rng.random(len(q)) < 0.5), ex))
    assert min(effects["copier"]) > 0.4  # measured 0.55–0.82 on the full lattice
    assert abs(np.mean(effects["random"])) < 0.03


def test_no_aligned_pair_gives_nan_and_missing_columns_are_named():
    task = TaskSpec(angle=0.0, grid_step=50)  # queries at 0 and 50 only
    ex = pd.DataFrame({"n1": [1, 97], "n2": [3, 96], "truth": [1, 0]})
    q = linear2d.queries(task, ex)
    assert math.isnan(seen_feature_effect(scored(task, ex, q["truth"].to_numpy() == 0), ex))
    with pytest.raises(ValueError, match="exemplars.truth"):
        seen_feature_effect(scored(task, ex, q["truth"].to_numpy() == 0), ex.drop(columns="truth"))
