"""The engine contract: what every engine (hf, vllm, vllm-server) does.

An engine holds one base model and scores or continues token-id prompts that share a prefix:
`score` (the exact log-probability of each label after prefix + query), `generate` (greedy
continuations), `release` (free what an adapter holds), `check_model` (prove it holds the run's
model) and `close`; engines that can (`can_load_weights`) also swap a full fine-tune's weights into their
live model (`load_weights`). Callers use these only; everything else is an engine's own business.
The engines build on this module; `iclsft.engine.base` opens them (and re-exports the contract).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iclsft.models import fingerprint as model_fingerprint


class Engine(ABC):
    """Scores label continuations and generates greedy ones, for the base model or a LoRA adapter.

    `adapter` names a fine-tuned adapter directory (peft), or None for the base model."""

    name: str  # the engine's name in ENGINES, for messages

    @abstractmethod
    def score(self, prefix: Sequence[int], queries: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
              adapter: str | None = None) -> np.ndarray:
        """Array of shape (len(queries), len(labels)): for each query, the full-vocabulary
        log-probability of each label's token sequence after prefix + query (the exact sum over the
        label's tokens)."""

    @abstractmethod
    def generate(self, prefix: Sequence[int], queries: Sequence[Sequence[int]], *, stop_ids: Sequence[int],
                 max_new_tokens: int, adapter: str | None = None) -> list[list[int]]:
        """Greedy continuation of prefix + each query: the new tokens up to the first token in
        `stop_ids` (left out) or `max_new_tokens` tokens, in the order of `queries`. The model's own
        end-of-sequence token stops it only when it is in `stop_ids`."""

    @abstractmethod
    def release(self, adapter: str | None) -> None:
        """Free what the engine holds for `adapter` once its conditions are scored."""

    @abstractmethod
    def check_model(self, path: str | Path, fingerprint: str) -> None:
        """Raise ValueError unless the engine holds the model at `path` (same directory, or the same
        content `fingerprint`: iclsft.models.fingerprint)."""

    @abstractmethod
    def close(self) -> None:
        """Free the model and everything the engine started; the engine is not used afterwards."""

    # Full fine-tunes: an engine that can swap a checkpoint's weights into its live model scores every
    # checkpoint of a full fine-tune arm with one engine start (iclsft.arms.scorer); the others open a new
    # engine per checkpoint.
    can_load_weights = False

    def load_weights(self, path: str | Path) -> None:
        """Replace the model's weights with those of the full fine-tune in the model directory `path`
        (same architecture), dropping every cache; afterwards `check_model` is against `path`."""
        raise ValueError(f"the {self.name} engine cannot swap weights into its model; open an engine on {path}")


def check_generate_args(engine: str, queries: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """The checks every engine's `generate` makes on its input, with one message for all."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r} ({engine} engine)")
    empty = [i for i, q in enumerate(queries) if len(q) == 0]
    if empty:
        raise ValueError(f"query {empty[0]} has no tokens: every query needs at least one token ({engine} engine)")


def check_model_dir(engine: str, source: str | Path | None, path: str | Path, fingerprint: str) -> None:
    """`check_model` for an engine that loaded its model from the directory `source`."""
    if source is None or not Path(source).is_dir():
        raise ValueError(f"the {engine} engine cannot tell which model it holds: it was not loaded from a model "
                         f"directory ({source!r}); open it with open_engine(spec, model_path) to check it")
    if Path(source).resolve() == Path(path).resolve():
        return
    found = model_fingerprint(Path(source))
    if found != fingerprint:
        raise ValueError(f"the {engine} engine holds the model at {source} (fingerprint {found}), not the run's "
                         f"model {path} (fingerprint {fingerprint})")
