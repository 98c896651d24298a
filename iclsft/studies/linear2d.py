"""The 2D linear study (SPEC §2-§7): ICL and SFT arms over a grid of queries, RSA on their conditions,
the study's claims and its report page."""

from __future__ import annotations

from iclsft.arms.linear2d import IclArm, SftArm, training_groups
from iclsft.claims import linear2d as claims
from iclsft.claims import load_linear2d
from iclsft.evaluate.metrics import METRIC_NAMES
from iclsft.evaluate.runs import KEY_COLUMNS, compare_linear2d, condition_metrics, learning_summary, linear2d_columns
from iclsft.graph.costs import EXAMPLE_TOKENS
from iclsft.report.build import build_linear2d_report
from iclsft.runspec import make_icl_spec, make_sft_spec
from iclsft.sft.train import total_steps
from iclsft.spec import Condition, IclRunSpec, SftRunSpec, sft_spec
from iclsft.studies.fields import settings
from iclsft.study import Claims, Study


def make_arm(spec, ref, *, progress: bool = True, scorer=None):
    return (IclArm if spec.kind == "icl" else SftArm)(spec, ref, progress=progress, scorer=scorer)


def build_spec(*, method: str = "icl", sft: dict | None = None, **fields) -> tuple:
    """`method` icl, or an SFT method with its `sft` settings (docs/sft.md) and the SFT arm's fields
    (checkpoints, executor, checkpoints_keep, retrain_deleted); the rest as `make_icl_spec` takes them."""
    fields = settings(fields)
    if method == "icl":
        if sft:
            raise ValueError("method icl takes no sft settings")
        return make_icl_spec(**fields)
    return make_sft_spec(sft=sft_spec(method, **(sft or {})), **fields)


def trainings(spec, todo: list) -> list[tuple[list, int]]:
    """One model per distinct training (conditions whose batches hold the same exemplars share it), on 2K
    examples."""
    groups = training_groups(todo, spec.training)
    return [(group, total_steps(2 * shots, spec.training)) for (_, _, shots, _), group in groups.items()]


def upgrade(fields: dict, version: str) -> dict:
    """A stored condition or arm spec of v1 as v3 reads it: a semantic task stored without `words` (before the
    field existed) was written with the size list, not today's default; an arm of 0.1 held one `order`."""
    def task(t: dict) -> dict:
        return {**t, "words": "size"} if t.get("name") == "semantic" and "words" not in t else t

    out = dict(fields)
    if "task" in out:
        out["task"] = task(out["task"])
    if "tasks" in out:
        out["tasks"] = [task(t) for t in out["tasks"]]
    if "order" in out and "orders" not in out and "kind" in out:
        out["orders"] = [out.pop("order")]
    return out


STUDY = Study(
    name="linear2d", kinds=("icl", "sft"), title="2D linear", make_arm=make_arm, build_spec=build_spec,
    metrics_row=condition_metrics, key_columns=tuple(KEY_COLUMNS), metric_columns=tuple(METRIC_NAMES),
    sort_by=("task", "angle", "method", "order", "seed", "shots", "checkpoint"),
    columns=linear2d_columns, summary=learning_summary, compare=compare_linear2d,
    claims=Claims(claims.CLAIMS, load_linear2d, claims.evaluate,
                  "no 2D run (linear2d/xor/semantic arms) in this directory"),
    report=build_linear2d_report, rsa=True,
    spec_types={"icl": IclRunSpec, "sft": SftRunSpec}, condition_type=Condition, migrates_from=("v1",),
    upgrade=upgrade, trainings=trainings,
    example_tokens=EXAMPLE_TOKENS["linear2d"])
