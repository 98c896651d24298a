"""The `iclsft-eval` command group and what every command shares: one-line user errors, number-list
and label options, and where progress goes (standard logging to stderr)."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Sequence

import click

from iclsft import __version__
from iclsft.engine.vllm_server import ServerError
from iclsft.engine_spec import flag_at
from iclsft.errors import ConditionsFailed, RunLockedError, first_error
from iclsft.evaluate.runs import format_table

USER_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, ImportError, OSError, MemoryError)


def user_errors(fn):
    """Turn bad input (and failed conditions) into one clear line and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except ValidationError as e:  # a subclass of ValueError: give it the option name and value
            raise click.ClickException(_validation_message(e)) from e
        except (*USER_ERRORS, ConditionsFailed, ServerError, RunLockedError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def _validation_message(error) -> str:
    """One line: which setting, what value, what is allowed (pydantic's own text)."""
    kind, field, value, message = first_error(error)
    if kind == "value_error" or not field:
        return message  # our own validators already name the value and the allowed range
    option = flag_at(field) or "--" + field.split(".")[-1].replace("_", "-")
    return f"{option} {value!r} is not allowed: {message}"


class LiveChoice(click.Choice):
    """A choice of names read when the command runs, not when the CLI is imported (engines registered by
    a plugin or a test count)."""

    def __init__(self, names: Callable[[], Sequence[str]]):
        self._names = names
        super().__init__(tuple(names()))

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, value) -> None:  # click's __init__ sets them; they are always read from `names`
        pass


def _number_list(kind: type, name: str):
    def parse(ctx, param, value: str):
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError as e:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__}s") from e

    return parse


def _labels(ctx, param, value: str) -> tuple[str, str]:
    """`Baz,Rud` means the words with a leading space (SPEC §2); a JSON list gives exact strings."""
    if value.lstrip().startswith("["):
        try:
            labels = json.loads(value)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{value!r} is not a JSON list of two strings") from e
    else:
        labels = [" " + v.strip() for v in value.split(",")]
    if len(labels) != 2 or not all(isinstance(v, str) and v.strip() for v in labels):
        raise click.BadParameter(f"{value!r} must name exactly two labels, e.g. Baz,Rud or '[\" Baz\", \" Rud\"]'")
    return tuple(labels)


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _escapes(ctx, param, value: str | None) -> str | None:
    """Template text as typed on a command line: `\\n`, `\\t` and `\\\\` are a newline, a tab and a
    backslash (as `--help` shows the defaults); any other backslash stays as it is."""
    if value is None:
        return None
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), value)


def shown(text: str) -> str:
    """A template default as `--help` shows it: newlines and tabs as `\\n` and `\\t`, so that copying it
    gives the same template."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


class _EchoHandler(logging.Handler):
    """Progress on stderr: INFO lines as they are, warnings with a "warning:" prefix."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        click.echo(f"warning: {message}" if record.levelno >= logging.WARNING else message, err=True)


def setup_logging(quiet: bool) -> None:
    """Where the library's `logging` goes: the `iclsft` logger to stderr (warnings only with --quiet)."""
    logger = logging.getLogger("iclsft")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _EchoHandler)] + [_EchoHandler()]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    # transformers' own bars ("Loading weights: 100%|...") on every model load say nothing a user needs;
    # our scoring bars (--quiet turns them off) stay
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def echo_table(table, study, columns: list[str] | None = None) -> None:
    """A run's metrics table (the columns its `study` shows) and, after a blank line, one line per learning
    curve saying what it shows (the same for a run, its recomputed metrics and each model of a sweep)."""
    click.echo(format_table(table, columns, study))
    summary = study.summary(table) if study.summary is not None else []
    if summary:
        click.echo("\n" + "\n".join(summary))


@click.group()
@click.version_option(__version__, prog_name="iclsft-eval")
def main() -> None:
    """Compare in-context learning and supervised fine-tuning, shot by shot."""


def run() -> None:
    """The `iclsft-eval` program: `main` with SIGTERM and SIGHUP (what a supervisor, container runtime or
    job scheduler sends, or a closed terminal) stopping a command as Ctrl-C does: the stack unwinds, so
    finished work stays, a run records that it was interrupted, in-process engines and Ray shut down,
    and the exit status is 128 + the signal. A second such signal ends the process at once."""
    import signal

    def stop(signum, _frame) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    main()
