"""The inputs and outputs of circuit scoring: prompt pairs and per-component scores (numpy only)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iclsft.artifacts import read_verified, write_checked


@dataclass(frozen=True)
class PromptPair:
    """One clean/corrupt pair of token ids.

    `clean` (the pattern holds) and `corrupt` (the pattern broken) are the query tokens and must have
    the same length; `prefix` (the ICL demonstrations, or nothing) is prepended to both. The answer
    position is the last query token; `target` is the clean answer, `foil` the answer the corrupt
    prompt implies (or the shortcut answer). Only the first token of each answer is used."""

    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    target: tuple[int, ...]
    foil: tuple[int, ...]
    prefix: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("clean", "corrupt", "target", "foil", "prefix"):
            object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))


def check_pairs(pairs: Sequence[PromptPair]) -> None:
    """Raise ValueError, naming the pair, for pairs that cannot be scored."""
    if len(pairs) == 0:
        raise ValueError("need at least one prompt pair")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PromptPair):
            raise ValueError(f"pair {i}: expected a PromptPair, got {type(pair).__name__}")
        if len(pair.clean) != len(pair.corrupt):
            raise ValueError(f"pair {i}: clean and corrupt must have the same length (components are compared "
                             f"position by position), got {len(pair.clean)} and {len(pair.corrupt)} tokens")
        if len(pair.clean) == 0:
            raise ValueError(f"pair {i}: clean and corrupt need at least one token")
        if not pair.target or not pair.foil:
            raise ValueError(f"pair {i}: target and foil need at least one token, got {len(pair.target)} "
                             f"and {len(pair.foil)}")
        if pair.target[0] == pair.foil[0]:
            raise ValueError(f"pair {i}: target and foil start with the same token {pair.target[0]}; the logit "
                             "difference is taken at their first tokens, so it would be 0")


@dataclass(frozen=True)
class ComponentScores:
    """Scores per component, averaged over `n_pairs` prompt pairs.

    heads: (layers, heads) float64, one score per attention head; mlps: (layers,) one per MLP block.
    ld_clean_mean / ld_corrupt_mean: the mean logit difference log p(target) - log p(foil) on the
    clean and on the corrupt prompts (unpatched)."""

    heads: np.ndarray
    mlps: np.ndarray
    n_pairs: int
    ld_clean_mean: float
    ld_corrupt_mean: float

    def __post_init__(self) -> None:
        heads, mlps = np.asarray(self.heads, dtype=np.float64), np.asarray(self.mlps, dtype=np.float64)
        if heads.ndim != 2 or mlps.ndim != 1 or heads.shape[0] != mlps.shape[0]:
            raise ValueError(f"heads must be (layers, heads) and mlps (layers,), got {heads.shape} and {mlps.shape}")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "mlps", mlps)

    def to_bytes(self) -> bytes:
        """The scores as .npz bytes (what `save` writes)."""
        buf = io.BytesIO()
        np.savez(buf, heads=self.heads, mlps=self.mlps, n_pairs=np.int64(self.n_pairs),
                 ld_clean_mean=np.float64(self.ld_clean_mean), ld_corrupt_mean=np.float64(self.ld_corrupt_mean))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ComponentScores:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(heads=z["heads"], mlps=z["mlps"], n_pairs=int(z["n_pairs"]),
                       ld_clean_mean=float(z["ld_clean_mean"]), ld_corrupt_mean=float(z["ld_corrupt_mean"]))

    def save(self, path: str | Path) -> dict:
        """Write an .npz atomically; returns its {"bytes", "sha256"} for the record that lists it."""
        return write_checked(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, info: dict | None = None) -> ComponentScores:
        """Read an .npz written by `save`; with `info` (what `save` returned) only if it still matches."""
        path = Path(path)
        return cls.from_bytes(read_verified(path, info) if info is not None else path.read_bytes())
