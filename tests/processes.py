"""Find every process a test started, however it was started: each inherits an environment variable
(ICLSFT_TEST_MARK) that the test sets, read back from /proc. Independent of process groups and
parents, which the code under test uses to stop them."""

from __future__ import annotations

from pathlib import Path

MARK = "ICLSFT_TEST_MARK"


def marked(mark: str) -> list[int]:
    """Live processes whose environment holds ICLSFT_TEST_MARK=mark (a zombie's environment is empty)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{MARK}={mark}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
