"""Arms: how each study's conditions are planned and computed; the work graph runs them all.

    spec, ref = make_icl_spec(angles=[45], shots=[1, 2])   # or make_sft_spec, make_implicit_spec
    table = run_spec(spec, "runs/x", ref)                  # iclsft.graph.driver: run or resume

Modules: runner (the arm protocol, an arm's records and failures), scorer (engines for base and trained
models), trainings (planning SFT jobs), linear2d and implicit (each study's arms).
"""

from __future__ import annotations

from iclsft.models import ModelRef
from iclsft.runspec import make_icl_spec, make_implicit_spec, make_sft_spec
from iclsft.study import of_spec


def make_arm(spec, ref: ModelRef, *, progress: bool = True, scorer=None):
    """The arm that computes `spec`'s conditions (its inputs checked against the tokenizer), made by the
    spec's study (iclsft.study). `scorer`: the engines to score with (a `Scorer` shared by several arms,
    e.g. on a scorer actor); default: its own."""
    return of_spec(spec).make_arm(spec, ref, progress=progress, scorer=scorer)


__all__ = ["make_arm", "make_icl_spec", "make_implicit_spec", "make_sft_spec"]
