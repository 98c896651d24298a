"""`--engine` and every engine's options, generated from the engine spec's models (iclsft.engine_spec):
the flag, its type and its help come from each option's declaration, so a new option is one field."""

from __future__ import annotations

import types
import typing
from typing import Literal

import click
from click.core import ParameterSource

from iclsft.cli.app import LiveChoice
from iclsft.engine.base import resolve_engine
from iclsft.engine_spec import OPTIONS, EngineSpec, flag
from iclsft.names import engine_choices


def _param(field: str) -> str:
    return "engine_" + field  # apart from the commands' own names (sft's --workers are Ray Train's)


def _click_type(annotation) -> tuple[object, bool]:
    """(click type, is a flag) of an option's annotation: bool, int, float, str or a Literal, maybe | None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return None, True
    if typing.get_origin(annotation) is Literal:
        return click.Choice(typing.get_args(annotation)), False
    return annotation, False


def _options(engines: tuple[str, ...]) -> list:
    out = []
    for engine in engines:
        _, model, _ = OPTIONS[engine]
        for field, info in model.model_fields.items():
            name = flag(engine, field)
            if name is None:
                continue
            kind, is_flag = _click_type(info.annotation)
            shown = "" if info.default in (None, False) else f"  [default: {info.default}]"
            extra = info.json_schema_extra or {}
            out.append(click.option(name, _param(field), type=kind, is_flag=is_flag, default=None,
                                    envvar=extra.get("envvar"), help=info.description + shown))
    return out


def engine_options(engines: tuple[str, ...] = tuple(OPTIONS)):
    """`--engine` (auto or any engine of `engines()` but the built-ins left out of `engines`) and the
    options of the built-in `engines`; the command reads them with `engine_spec`."""
    left_out = set(OPTIONS) - set(engines)

    def decorate(fn):
        for option in reversed(_options(engines)):
            fn = option(fn)
        return click.option("--engine", type=LiveChoice(lambda: [e for e in engine_choices() if e not in left_out]),
                            default="auto", show_default=True,
                            help="auto: vllm on a GPU when vLLM is installed, else hf (the faster one on CPUs).")(fn)

    return decorate


def engine_spec(o: dict) -> EngineSpec:
    """The engine spec of a command's options: each given option into its engine's model; one the
    engine does not read is refused (one set in the environment, the API key, is left out instead)."""
    name = resolve_engine(o["engine"])
    ctx = click.get_current_context(silent=True)
    given = {}
    for engine, (_, model, _) in OPTIONS.items():
        for field in model.model_fields:
            value = o.get(_param(field))
            if value is None or value is False:  # not given (a flag left off is False)
                continue
            from_env = ctx is not None and ctx.get_parameter_source(_param(field)) is ParameterSource.ENVIRONMENT
            if engine != name and from_env:
                continue
            given[field] = value
    return EngineSpec.of(name, **given)
