"""Collect the library's log messages (the `iclsft` logger) in a list, for tests that check progress lines."""

from __future__ import annotations

import logging
from contextlib import contextmanager


class _ListHandler(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.INFO)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:  # as the CLI prints them (iclsft.cli.app)
        message = record.getMessage()
        self.messages.append(f"warning: {message}" if record.levelno >= logging.WARNING else message)


@contextmanager
def capture(messages: list[str]):
    """Append every INFO-or-higher message of the `iclsft` loggers to `messages` while inside (warnings
    prefixed "warning: ", as the CLI prints them)."""
    logger = logging.getLogger("iclsft")
    handler, level = _ListHandler(messages), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
