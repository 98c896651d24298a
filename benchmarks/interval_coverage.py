"""Coverage and false-positive rate of across-seed intervals at n = 2, 3, 5, 10 seeds: the 95%
percentile bootstrap the report used before issue 18 (reimplemented here for comparison) against the
Student-t intervals and paired t-test of iclsft.evaluate.stats. Seconds on one CPU core:

    python benchmarks/interval_coverage.py [--experiments 4000] [--out coverage.json]

Per-seed values are simulated, so the truth is known:
- accuracies: a seed-level random effect (sd 0.04 around 0.70) plus binomial noise over 2,500 points;
- skewed: Beta(8, 2) values (skewness −1.05), mean 0.8;
- heavy skew: 0.7 + 0.02·(LogNormal(0, 1) − e^½), mean 0.7 (skewness 6.2), a stress case;
- paired null: ICL and SFT share a seed effect, each adds an arm-by-seed effect (normal; "skewed": a
  centred exponential for ICL) and binomial noise; no true difference, so every rejection is false.
Coverage is the share of experiments whose interval contains the true mean; the false-positive rate
is the share whose interval for ICL − SFT excludes 0 (bootstrap) or whose paired-t p < 0.05.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from iclsft.artifacts import atomic_write_json
from iclsft.evaluate.stats import paired_t_test, t_interval

SEEDS = (2, 3, 5, 10)
N_BOOT = 2000  # as the old report
N_POINTS = 2500


def bootstrap_bounds(values: np.ndarray, rng: np.random.Generator, chunk: int = 250) -> np.ndarray:
    """(R, 2) 95% percentile-bootstrap intervals of the row means of an (R, n) array (the old method)."""
    r, n = values.shape
    out = np.empty((r, 2))
    for start in range(0, r, chunk):
        v = values[start:start + chunk]
        idx = rng.integers(0, n, size=(len(v), N_BOOT, n))
        means = np.take_along_axis(v[:, None, :], idx, axis=2).mean(axis=2)
        out[start:start + chunk] = np.quantile(means, [0.025, 0.975], axis=1).T
    return out


def accuracies(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    return rng.binomial(N_POINTS, np.clip(p, 0.0, 1.0)) / N_POINTS


Draw = Callable[[np.random.Generator, int, int], np.ndarray]
VALUES: dict[str, tuple[Draw, float]] = {
    "accuracies": (lambda g, r, n: accuracies(g, 0.7 + g.normal(0, 0.04, (r, n))), 0.7),
    "skewed (Beta(8,2))": (lambda g, r, n: g.beta(8, 2, (r, n)), 0.8),
    "heavy skew (lognormal)": (lambda g, r, n: 0.7 + 0.02 * (g.lognormal(0, 1, (r, n)) - np.exp(0.5)), 0.7),
}


def paired_null(rng: np.random.Generator, r: int, n: int, skewed: bool) -> tuple[np.ndarray, np.ndarray]:
    shared = 0.75 + rng.normal(0, 0.04, (r, n))
    arm = rng.exponential(0.03, (r, n)) - 0.03 if skewed else rng.normal(0, 0.03, (r, n))
    return accuracies(rng, shared + arm), accuracies(rng, shared + rng.normal(0, 0.03, (r, n)))


def measure(experiments: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for name, (draw, truth) in VALUES.items():
        for n in SEEDS:
            v = draw(rng, experiments, n)
            boot = bootstrap_bounds(v, rng)
            t = np.array([[iv.lo, iv.hi] for iv in map(t_interval, v)])
            rows.append({"kind": "coverage", "values": name, "n": n, "experiments": experiments,
                         "bootstrap": float(np.mean((boot[:, 0] <= truth) & (truth <= boot[:, 1]))),
                         "t": float(np.mean((t[:, 0] <= truth) & (truth <= t[:, 1])))})
    for skewed in (False, True):
        for n in SEEDS:
            icl, sft = paired_null(rng, experiments, n, skewed)
            boot = bootstrap_bounds(icl - sft, rng)
            p = np.array([paired_t_test(a, b).p for a, b in zip(icl, sft)])
            rows.append({"kind": "false positives", "values": "paired null" + (", skewed" if skewed else ""),
                         "n": n, "experiments": experiments,
                         "bootstrap": float(np.mean((boot[:, 0] > 0) | (boot[:, 1] < 0))),
                         "t": float(np.mean(p < 0.05))})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| measure | values | n seeds | percentile bootstrap | t over seeds |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} (nominal {'95' if r['kind'] == 'coverage' else '5'}%) | {r['values']} | "
                     f"{r['n']} | {100 * r['bootstrap']:.1f}% | {100 * r['t']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=4000, help="simulated experiments per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = parser.parse_args()
    if args.experiments < 100:
        raise ValueError(f"--experiments must be >= 100 for a meaningful rate, got {args.experiments}")
    rows = measure(args.experiments, args.seed)
    print(f"{args.experiments} simulated experiments per cell; bootstrap with {N_BOOT} resamples")
    print(markdown(rows))
    if args.out is not None:
        atomic_write_json(args.out, rows)


if __name__ == "__main__":
    main()
