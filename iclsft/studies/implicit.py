"""The implicit-pattern suite (SPEC §8): ICL and fine-tuned arms on both variants of each task, circuit
states of its runs, the suite's claims and its report page. A sweep puts its run in OUT/<model>/implicit/."""

from __future__ import annotations

from iclsft.arms.implicit import ImplicitIclArm, ImplicitSftArm
from iclsft.claims import implicit as claims
from iclsft.claims import load_implicit
from iclsft.evaluate.runs import IMPLICIT_COLUMNS, IMPLICIT_KEY_COLUMNS, compare_implicit, implicit_metrics_row
from iclsft.graph.costs import EXAMPLE_TOKENS
from iclsft.implicit.evaluate import METRICS
from iclsft.implicit.spec import ImplicitCondition, ImplicitSpec
from iclsft.report.implicit import build_implicit_report
from iclsft.runspec import make_implicit_spec
from iclsft.sft.train import total_steps
from iclsft.studies.fields import settings
from iclsft.study import Claims, Study


def make_arm(spec, ref, *, progress: bool = True, scorer=None):
    return (ImplicitIclArm if spec.method == "icl" else ImplicitSftArm)(spec, ref, progress=progress, scorer=scorer)


def build_spec(**fields) -> tuple:
    """The fields as `make_implicit_spec` takes them (method, tasks, shots, seeds, train_size, sft, ...)."""
    return make_implicit_spec(**settings(fields))


def trainings(spec, todo: list) -> list[tuple[list, int]]:
    """One model per task (or mixture) and seed, on the arm's examples per model."""
    groups: dict[tuple, list] = {}
    for cond in todo:
        groups.setdefault(cond.training_group, []).append(cond)
    steps = total_steps(spec.examples_per_model, spec.training)
    return [(group, steps) for group in groups.values()]


STUDY = Study(
    name="implicit", kinds=("implicit",), title="implicit-pattern", make_arm=make_arm, build_spec=build_spec,
    metrics_row=implicit_metrics_row, key_columns=tuple(IMPLICIT_KEY_COLUMNS), metric_columns=tuple(METRICS),
    sort_by=("task", "variant", "method", "seed", "shots"),
    columns=lambda table: IMPLICIT_COLUMNS, compare=compare_implicit,
    claims=Claims(claims.CLAIMS, load_implicit, claims.evaluate,
                  "no implicit-pattern run in this directory (nor an implicit/ folder beside it)"),
    report=build_implicit_report, folder="implicit", circuits=True,
    spec_types={"implicit": ImplicitSpec}, condition_type=ImplicitCondition, migrates_from=("v2",), trainings=trainings,
    example_tokens=EXAMPLE_TOKENS["implicit"])
