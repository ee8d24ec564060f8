"""What the ``r2r-rewrite`` command reports as bad usage or input, and how it puts an exception in one line.

:class:`UsageError` is exit code 2 with a one-line message; every module of the command (``cli``, ``loading``,
``outputs``, ``estimate``) raises it for a refusal, and ``cli.main`` turns it into that line.
"""

from __future__ import annotations

__all__ = ["UsageError", "first_line", "one_line"]


class UsageError(Exception):
    """Bad usage or input: exit code 2 with a one-line message."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
