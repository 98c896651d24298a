"""The boundary angle a prediction implies (SPEC §5): an L2-regularised logistic regression of the
predicted label on the centred lattice inputs, fitted by damped Newton; the fitted normal gives the
angle. Pure numpy."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

CENTRE: float = 49.5
"""Centre of the 0..99 lattice; also the scale used to normalise inputs for the fit."""

LOGREG_C: float = 1.0
"""Inverse L2 strength of the angle-probing logistic regression (sklearn's ``C``)."""

_FIT_GTOL = 1e-10
_FIT_MAX_ITER = 100


def log_sigmoid(x: FloatArray) -> FloatArray:
    """Return log(sigmoid(x)) without overflow for large |x|."""
    return -np.logaddexp(0.0, -x)


def _neg_log_lik(beta: FloatArray, x: FloatArray, y: FloatArray, penalty: FloatArray) -> float:
    """Penalised objective: sum of log-losses + 0.5 * sum(penalty * beta**2)."""
    eta = x @ beta
    return float(np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * np.dot(penalty, beta * beta))


def fit_logistic(z: npt.ArrayLike, y: npt.ArrayLike, C: float = LOGREG_C) -> tuple[float, FloatArray]:
    """Fit L2-regularised logistic regression with an unpenalised intercept by damped Newton.

    Minimises sum_k logloss(y_k, b + z_k.w) + ||w||^2 / (2C) and returns
    ``(b, w)``. ``z`` is (n, p), ``y`` is 0/1 of length n.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(y) != len(z):
        raise ValueError(f"z has {len(z)} rows but y has {len(y)} entries")
    if not C > 0:
        raise ValueError(f"C must be positive, got {C}")
    x = np.hstack([np.ones((len(z), 1)), z])
    penalty = np.r_[0.0, np.full(z.shape[1], 1.0 / C)]
    beta = np.zeros(x.shape[1])
    obj = _neg_log_lik(beta, x, y, penalty)
    for _ in range(_FIT_MAX_ITER):
        eta = x @ beta
        p = np.exp(log_sigmoid(eta))
        grad = x.T @ (p - y) + penalty * beta
        if np.linalg.norm(grad) < _FIT_GTOL:
            break
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + np.diag(penalty)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = grad
        if not np.all(np.isfinite(step)) or np.dot(step, grad) <= 0.0:
            # Hessian numerically singular: fall back to (scaled) gradient descent.
            step = grad / max(1.0, float(np.trace(hess)))
        # Backtracking (Armijo) keeps the objective monotone so Newton cannot diverge;
        # the small slack lets steps through once changes are at rounding level.
        slack = 1e-13 * max(1.0, abs(obj))
        t = 1.0
        accepted = False
        for _ in range(60):
            cand = beta - t * step
            cand_obj = _neg_log_lik(cand, x, y, penalty)
            if cand_obj <= obj - 1e-4 * t * float(np.dot(step, grad)) + slack:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break  # no descent possible at floating-point resolution: converged
        beta, obj = cand, cand_obj
    return float(beta[0]), beta[1:]


def fit_angle(n1: npt.ArrayLike, n2: npt.ArrayLike, y: npt.ArrayLike, C: float = LOGREG_C) -> float:
    """Infer the boundary angle (degrees in [0, 180)) from binary labels on lattice points.

    ``y`` is 1 where the first label is predicted. Fits logistic regression on
    z = (x - 49.5) / 49.5 (see ``fit_logistic``); the fitted normal (w1, w2)
    gives atan2(-w1, w2) mod 180. Returns NaN if ``y`` contains one class only.
    """
    y = np.asarray(y).astype(bool).reshape(-1)
    if y.all() or not y.any():
        return math.nan
    z = (
        np.column_stack([np.asarray(n1, dtype=np.float64), np.asarray(n2, dtype=np.float64)]) - CENTRE
    ) / CENTRE
    _, w = fit_logistic(z, y, C=C)
    # The truth's normal for angle theta is (-sin, cos) pointing into class 0,
    # so invert that parametrisation.
    angle = math.degrees(math.atan2(-w[0], w[1])) % 180.0
    # A tiny negative atan2 result can round to exactly 180.0 after the modulo.
    return 0.0 if angle >= 180.0 else angle


def wrap_error(x: npt.ArrayLike) -> np.ndarray:
    """Signed angle differences wrapped to (−90°, 90°] (angles are axial, period 180°)."""
    x = np.asarray(x, dtype=np.float64)
    return 90.0 - np.mod(90.0 - x, 180.0)


def angle_error(estimated: float, true: float) -> float:
    """Return estimated - true wrapped into (-90, 90] degrees (angles are axial, period 180)."""
    return float(wrap_error(estimated - true))
