"""A toy study, registered by tests/test_study.py the way `iclsft.studies` registers the built-in ones:
parity of a number, learned in context. A condition is (K, seed): a prompt of K examples per class
("7 is odd", "4 is even", ...) from one seeded stream, then QUERIES numbers, each scored with both labels.
Everything a study has lives in this file plus its `Study` (no layer of iclsft names it)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import pandas as pd

from iclsft.arms.runner import ArmBase, Outcome
from iclsft.arms.scorer import Scorer
from iclsft.artifacts import parquet_bytes
from iclsft.models import resolve_model
from iclsft.spec import ArmSpec, ConditionBase, EngineSpec, ModelSpec
from iclsft.study import Study

LABELS = (" even", " odd")
QUERIES = 12


class ParityCondition(ConditionBase):
    HASH: ClassVar[str] = "toy1"
    STUDY: ClassVar[str] = "parity"
    suite: Literal["parity"] = "parity"
    model: ModelSpec
    shots: int
    seed: int
    dtype: str

    @property
    def queries(self) -> int:
        return QUERIES

    @property
    def prompt_examples(self) -> int:
        return 2 * self.shots

    @property
    def chain(self) -> tuple:
        return (self.seed,)

    @property
    def chain_rank(self) -> tuple:
        return (self.shots,)

    @property
    def label(self) -> str:
        return f"parity K={self.shots} seed {self.seed}"

    @property
    def dirname(self) -> str:
        return f"parity-K{self.shots}-s{self.seed}-{self.id[-8:]}"

    def row(self) -> dict:
        return {"condition": self.id, "method": "icl", "shots": self.shots, "seed": self.seed,
                "model": self.model.name, "dtype": self.dtype}


class ParitySpec(ArmSpec):
    kind: Literal["parity"] = "parity"
    shots: tuple[int, ...] = (1, 2)

    @property
    def arm(self) -> str:
        return "parity-icl"

    def conditions(self) -> list[ParityCondition]:
        return [ParityCondition(model=self.model, shots=k, seed=s, dtype=self.dtype)
                for s in self.seeds for k in self.shots]


def stream(seed: int, n: int) -> list[int]:
    """The seed's numbers: the prompt at K is the first K even and K odd ones, alternating."""
    rng = np.random.default_rng(seed)
    return [int(v) for v in rng.integers(0, 100, size=n)]


def examples(seed: int, shots: int) -> list[int]:
    evens = [v for v in stream(seed, 400) if v % 2 == 0][:shots]
    odds = [v for v in stream(seed, 400) if v % 2 == 1][:shots]
    return [v for pair in zip(evens, odds) for v in pair]


def query_numbers(seed: int) -> list[int]:
    return [int(v) for v in np.random.default_rng(1000 + seed).integers(0, 100, size=QUERIES)]


def texts(seed: int, shots: int) -> tuple[str, list[str]]:
    """(the prompt's text, each query's text): what the test's reference tokenizes on its own."""
    prompt = "".join(f"{v} is{LABELS[v % 2]}.\n" for v in examples(seed, shots))
    return prompt, [f"{q} is" for q in query_numbers(seed)]


class ParityArm(ArmBase):
    def __init__(self, spec: ParitySpec, ref, *, progress: bool = True, scorer=None):
        from transformers import AutoTokenizer

        self.spec, self.ref = spec, ref
        self.tokenizer = AutoTokenizer.from_pretrained(ref.path)
        self.scorer = scorer or Scorer(spec.engine, ref, spec.dtype, progress=progress)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(self, cond: ParityCondition, engine, adapter, record: dict) -> Outcome:
        t0 = time.time()
        prompt, queries = texts(cond.seed, cond.shots)
        lp = engine.score(self.ids(prompt), [self.ids(q) for q in queries], [self.ids(x) for x in LABELS],
                          adapter=adapter)
        truth = np.array(query_numbers(cond.seed)) % 2
        table = pd.DataFrame({"number": query_numbers(cond.seed), "truth": truth, "lp_0": lp[:, 0], "lp_1": lp[:, 1]})
        return Outcome({"scores.parquet": parquet_bytes(table)},
                       dict(seconds=round(time.time() - t0, 2), metrics=parity_metrics(table), **record))

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"accuracy {metrics['accuracy']:.3f}"


def parity_metrics(scores: pd.DataFrame) -> dict:
    guess = (scores["lp_1"] > scores["lp_0"]).astype(int)
    margin = scores["lp_1"] - scores["lp_0"]
    return {"accuracy": float((guess == scores["truth"]).mean()), "margin": float(margin.mean())}


def build_spec(*, model: str, shots: Sequence[int] = (1, 2), seeds: Sequence[int] = (0,), engine=None, **fields):
    ref = resolve_model(model)
    spec = ParitySpec(model=ModelSpec(name=model, fingerprint=ref.fingerprint), shots=tuple(shots),
                      seeds=tuple(seeds), engine=EngineSpec.of(**(engine or {})), **fields)
    return spec, ref


KEYS = ("method", "shots", "seed", "model", "dtype", "condition")

STUDY = Study(
    name="parity", kinds=("parity",), make_arm=ParityArm, build_spec=build_spec,
    metrics_row=lambda scores, record: {**{k: record[k] for k in KEYS}, **parity_metrics(scores)},
    key_columns=KEYS, metric_columns=("accuracy", "margin"), sort_by=("seed", "shots"), example_tokens=5.0)
