"""Errors a user sees as one line: failed conditions, locked or mismatched run directories, and
out-of-memory errors that name the setting to lower (docs/reliability.md)."""

from __future__ import annotations


class ConditionsFailed(RuntimeError):
    """Some conditions of a run failed; each has an error record, the others finished."""


class RunLockedError(RuntimeError):
    """Another process is computing into the same run directory."""


class SpecMismatchError(ValueError):
    """The run directory holds results of a different spec."""


class DeletedCheckpointError(ValueError):
    """Work needs a checkpoint that its run deleted on purpose (`checkpoints_keep`)."""


OOM_SCORING = ("lower --token-budget (tokens per forward pass of the hf engine; sweep: engine_options.token_budget), "
               "or for vllm --gpu-memory-utilization / --kv-cache-gib")


def first_error(error) -> tuple[str, str, object, str]:
    """A pydantic ValidationError's first problem: (its type, the dotted field, the value, pydantic's message)."""
    first = error.errors()[0]
    message = first.get("msg", str(error)).removeprefix("Value error, ")
    field = ".".join(str(part) for part in first.get("loc", ()) if not isinstance(part, int))
    return first.get("type", ""), field, first.get("input"), message


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (CUDA), or torch's CPU allocator failing."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory(what: str, knobs: str, e: BaseException) -> MemoryError:
    """A MemoryError whose first line says what ran out of memory and which setting to lower."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return MemoryError(f"out of memory {what} ({type(e).__name__}: {first}); {knobs}")
