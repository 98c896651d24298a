"""A spec file's fields (`iclsft-eval run SPEC`) as the spec builders take them: nested settings
(engine, executor, template) as their frozen models; the engine's `auto` resolved on this machine and its
options given flat, as on the command line (`{name: vllm, kv_cache_gib: 2}`, iclsft.engine_spec)."""

from __future__ import annotations

from iclsft.engine.base import resolve_engine
from iclsft.spec import EngineSpec, ExecutorSpec, TemplateSpec

MODELS = {"engine": EngineSpec, "executor": ExecutorSpec, "template": TemplateSpec}


def settings(fields: dict) -> dict:
    """`fields` with each nested mapping of MODELS built (validated) as its model."""
    out = dict(fields)
    for name, model in MODELS.items():
        value = out.get(name)
        if isinstance(value, str) and name == "engine":
            value = {"name": value}
        if isinstance(value, dict):
            value = dict(value)
            if name == "engine":  # flat, as the CLI's options: each read by its engine
                out[name] = EngineSpec.of(resolve_engine(value.pop("name", "auto")), **value)
            else:
                out[name] = model(**value)
    return out
