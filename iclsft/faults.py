"""Faults: named kill points for the fault-injection tests (docs/reliability.md).

`fault_point("adapter-save")` does nothing unless $ICLSFT_FAULT_AT names that point; then the process
sends itself SIGKILL there (no cleanup, no `finally`, exactly like the OOM killer or a pulled plug):

    ICLSFT_FAULT_AT=adapter-save            die at the first hit of that point in this process
    ICLSFT_FAULT_AT=write:scores.parquet:2  die at the second hit (`write:NAME` is inside every atomic
                                            write of a file NAME, after its bytes reach the disk under
                                            a temporary name and before the rename)
    ICLSFT_FAULT_SIGNAL=STOP                stop instead of dying (the process keeps its locks)
    ICLSFT_FAULT_ONCE=DIR                   fire only if DIR/<point> does not exist yet, and create it
                                            first: a retried worker then gets past the point

Points: model-prepare, train-step, adapter-save, score, condition-record, metrics, rsa, circuits (after a
circuit state's .npz, before circuits.json), report, checkpoint-delete (a deleted checkpoint's marker
rewritten, its files not yet deleted), checkpoint-delete-file (after each of them), and write:<file name>.
With the variable unset a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "ICLSFT_FAULT_AT"
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill (or stop) this process here if $ICLSFT_FAULT_AT names this point and hit count."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, n = parse(wanted)
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != n:
        return
    once = os.environ.get("ICLSFT_FAULT_ONCE")
    if once:
        Path(once).mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(Path(once) / name.replace("/", "_"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    sig = getattr(signal, "SIG" + os.environ.get("ICLSFT_FAULT_SIGNAL", "KILL").upper())
    os.write(2, f"\niclsft fault injection: {signal.Signals(sig).name} at {name} (hit {n})\n".encode())
    os.kill(os.getpid(), sig)


def parse(wanted: str) -> tuple[str, int]:
    """`point` or `point:n` -> (point, n); a point name may itself hold colons (write:NAME)."""
    head, sep, tail = wanted.strip().rpartition(":")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return wanted.strip(), 1
