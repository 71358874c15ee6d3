"""Text that came from Redis, where any bytes may be: told apart, and shown.

The connection decodes replies with ``surrogateescape`` (see :mod:`worker.queue.connect`):
a byte that is not UTF-8 arrives as a lone surrogate, which no real text holds, and goes
back to Redis as the very byte it was.
"""

from __future__ import annotations

from typing import Any


def is_text(value: str) -> bool:
    """Whether ``value`` is UTF-8 text (not a byte escaped as a surrogate)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped(value: str) -> str:
    """``value`` with each byte that was not UTF-8 written ``\\xNN``, to be shown."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def escaped_all(value: Any) -> Any:
    """:func:`escaped` through dicts, lists and tuples (keys too); other values as they are."""
    if isinstance(value, str):
        return escaped(value)
    if isinstance(value, dict):
        return {escaped_all(k): escaped_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escaped_all(v) for v in value]
    return value
