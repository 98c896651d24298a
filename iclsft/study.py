"""The study registry: what the layers above need of a study, found by name, by an arm's spec, by a
condition's record or by a run directory, never by probing attributes or parsing ids.

    study = of_run(RunDir("runs/demo"))     # or of_spec(spec), get("implicit")
    row = study.metrics_row(scores, record)  # one metrics row of one of its conditions

A study is its spec and condition types (arms of some `kind`s, conditions whose record says
`suite`), its arms (`make_arm`), the builder of its spec from a spec file's fields (`build_spec`,
`iclsft-eval run`), its metrics rows, and optionally its claims, its report page and the graph's extra
works on its conditions (RSA, circuit states). The built-in studies (`linear2d`, `implicit`) are
registered by `iclsft.studies`, imported on the first lookup, as a plugin system loads its entry points;
the layers below it never import a study. A study of your own registers itself with `register` (a test
does, tests/test_study.py) or by an `iclsft.studies` entry point naming a `Study`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN = "iclsft.studies"  # the package that registers the built-in studies
DEFAULT_SUITE = "linear2d"  # the study of a condition record without `suite` (the 2D study's ids predate it)


@dataclass(frozen=True)
class Claims:
    """A study's claims (SPEC §11): `claims` (each with id and study), `evidence(run path)` read from
    stored results, `evaluate(evidence) -> [Result]`, and `missing`: why each is untestable without a run."""

    claims: Sequence[Any]
    evidence: Callable[[Path], Any]
    evaluate: Callable[[Any], list]
    missing: str


@dataclass(frozen=True, eq=False)  # one object per study: compared (and hashed) by identity
class Study:
    """What the driver, the metrics, the claims, the report and the CLI need of one study."""

    name: str  # also the `suite` its conditions' records carry (the 2D study's: none)
    kinds: tuple[str, ...]  # the `kind` of its arms' specs (RUN/spec.json)
    make_arm: Callable[..., Any]  # (spec, ref, *, progress, scorer) -> an `iclsft.arms.runner.Arm`
    build_spec: Callable[..., tuple]  # (**a spec file's fields) -> (checked spec, ModelRef); writes nothing
    metrics_row: Callable[[Any, dict], dict]  # (scores table, condition record) -> one metrics row
    key_columns: tuple[str, ...]  # the metrics table: these, then `metric_columns`, sorted by `sort_by`
    metric_columns: tuple[str, ...]
    sort_by: tuple[str, ...]
    # the terminal: (metrics table) -> the columns shown, -> one line per learning curve; (table, metrics) ->
    # the `compare` table of ICL against fine-tuning
    columns: Callable[[Any], Sequence[str]] | None = None
    summary: Callable[[Any], list[str]] | None = None
    compare: Callable[[Any, Sequence[str] | None], Any] | None = None
    claims: Claims | None = None
    report: Callable[[Path, Path | None], Path] | None = None  # (run dir, out dir) -> its index.html
    folder: str | None = None  # where a sweep puts this study's run inside a model's out folder
    rsa: bool = False  # the graph computes RSA on its conditions when a sweep asks (iclsft.rsa)
    circuits: bool = False  # the graph computes circuit states of its runs when a sweep asks
    example_tokens: float = 9.0  # tokens per prompt example and training example: the planner's costs
    # (arm spec, conditions left) -> [(conditions scored on one trained model, its optimizer steps)]: the
    # trainings the planner and the simulator count, without a tokenizer (None: the study trains nothing)
    trainings: Callable[[Any, list], list[tuple[list, int]]] | None = None
    # `iclsft-eval migrate` (iclsft.migrate): each arm kind's spec type, the condition type, and the earlier
    # versions (iclsft.versions) whose run directories it rewrites for this one
    spec_types: dict[str, type] = field(default_factory=dict)
    condition_type: type | None = None
    migrates_from: tuple[str, ...] = ()
    # (stored fields of a condition or an arm spec, the version that stored them) -> the fields as this
    # version reads them, where a missing field's default is not what that version used
    upgrade: Callable[[dict, str], dict] | None = None
    title: str = field(default="", compare=False)  # for messages; default: the name

    def owns(self, record: dict) -> bool:
        """Whether a condition's record (or condition.json) belongs to this study."""
        return record.get("suite", DEFAULT_SUITE) == self.name


_STUDIES: dict[str, Study] = {}
_loaded = False


def register(study: Study) -> Study:
    """Add `study` (a new name and arm kinds of its own); returns it. Registering the same object again is
    a no-op; another study under a taken name or kind is refused with one line."""
    _load()
    old = _STUDIES.get(study.name)
    if old is study:
        return study
    if old is not None:
        raise ValueError(f"a study named {study.name!r} is registered already; choose another name")
    taken = {k: s.name for s in _STUDIES.values() for k in s.kinds}
    clash = [k for k in study.kinds if k in taken]
    if clash:
        raise ValueError(f"arm kind {clash[0]!r} belongs to the study {taken[clash[0]]!r}; give {study.name!r} "
                         "kinds of its own")
    _STUDIES[study.name] = study
    return study


def unregister(name: str) -> None:
    """Remove the study `name` (tests register toy studies and take them away again)."""
    _STUDIES.pop(name, None)


def studies() -> tuple[Study, ...]:
    """Every registered study, the built-ins first, in registration order."""
    _load()
    return tuple(_STUDIES.values())


def get(name: str) -> Study:
    _load()
    if name not in _STUDIES:
        raise ValueError(f"unknown study {name!r}; registered: {', '.join(_STUDIES)}")
    return _STUDIES[name]


def of_kind(kind: str) -> Study:
    """The study whose arms have `kind` (an arm spec's `kind`, as RUN/spec.json stores it)."""
    for study in studies():
        if kind in study.kinds:
            return study
    raise ValueError(f"arm kind {kind!r} belongs to no registered study (kinds: "
                     f"{', '.join(k for s in _STUDIES.values() for k in s.kinds)})")


def of_spec(spec) -> Study:
    """The study of the arm spec `spec`."""
    return of_kind(spec.kind)


def of_arms(arms: dict) -> Study:
    """The study of the arms of one RUN/spec.json (every arm of a run belongs to one study)."""
    found = {of_kind(arm.get("kind", "")).name for arm in arms.values()}
    if len(found) != 1:
        raise ValueError(f"a run directory holds the arms of one study, this one of {sorted(found) or 'none'}")
    return get(found.pop())


def of_run(path: str | Path) -> Study | None:
    """The study of the run directory `path`; None when it is none (no readable spec.json with arms)."""
    try:
        arms = json.loads((Path(path) / "spec.json").read_text())["arms"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return of_arms(arms) if isinstance(arms, dict) and arms else None


def _load() -> None:
    """Register the built-in studies, then those of installed plugins (entry point group `iclsft.studies`)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(BUILTIN)
    for entry in importlib.metadata.entry_points(group="iclsft.studies"):
        register(entry.load())
