"""The `xor` variant (SPEC §2): the XOR of the linear labels at `angle` and at `angle + 90°` (same
centre, margins taken with the normals of the two lines), so a point gets the first label where
both agree; a point on either line is on the boundary. Two perpendicular lines: no single
boundary angle."""

from __future__ import annotations

import numpy as np

from iclsft.tasks import registry
from iclsft.tasks.linear2d import TIE_EPS, margin


def xor_truth(n1: np.ndarray, n2: np.ndarray, angle: float) -> np.ndarray:
    m1, m2 = margin(n1, n2, angle), margin(n1, n2, angle + 90.0)
    t = ((m1 < 0) ^ (m2 < 0)).astype(np.int8)
    t[(np.abs(m1) < TIE_EPS) | (np.abs(m2) < TIE_EPS)] = -1
    return t


XOR = registry.register(registry.GridTask(name="xor", truth=xor_truth, boundary_angle=False))
