"""Reading the service's answers: bodies, rate-limit headers, errors, created invitations.

Every reader here tolerates any shape: a proxy's HTML page, a body cut short, headers that
make no sense. What cannot be read becomes ``None`` or is left out, never an exception.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from worker.errors import (
    AuthError,
    BadRequest,
    RateLimited,
    RateLimitInfo,
    SendError,
    ServerError,
    TokenNotFound,
    UnexpectedResponse,
)
from worker.outcome import Invitation

if TYPE_CHECKING:
    import aiohttp

MAX_MESSAGE_CHARS = 500
#: Largest response body read; 100 invitations are about 30 KB.
MAX_BODY_BYTES = 8 * 1024 * 1024
_TAGS = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_RATELIMIT_HEADERS = ("Limit", "Period", "Remaining", "Reset")


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimitInfo:
    """Read ``X-RateLimit-*``; see :func:`read_ratelimit`."""
    return read_ratelimit(headers)[0]


#: The shortest ``X-RateLimit-Period`` taken for a window, in seconds.
MIN_PERIOD = 0.001


def read_ratelimit(headers: Mapping[str, str]) -> tuple[RateLimitInfo, dict[str, str] | None]:
    """``X-RateLimit-*`` as evidence: ``(info, None)``, or ``(RateLimitInfo(), raw)``.

    Absent headers are ``None`` in the info. Headers that make no sense together — a limit
    of 0 or less, a period under a millisecond or not a number, a negative remaining or reset, a
    remaining above the limit or a reset longer than the period — make the whole set
    unknown, returned raw (for one warning) with an empty info.
    """
    raw = {name: headers.get(f"X-RateLimit-{name}") for name in _RATELIMIT_HEADERS}
    if all(value is None for value in raw.values()):
        return RateLimitInfo(name=headers.get("X-RateLimit-Name")), None
    limit, period = _number(raw["Limit"], int), _number(raw["Period"], float)
    remaining, reset = _number(raw["Remaining"], int), _number(raw["Reset"], float)
    bad = (
        (raw["Limit"] is not None and (limit is None or limit <= 0))
        # A period of a few femtoseconds is no window (and would overflow its arithmetic).
        or (raw["Period"] is not None and (period is None or period < MIN_PERIOD))
        or (raw["Remaining"] is not None and (remaining is None or remaining < 0))
        or (raw["Reset"] is not None and (reset is None or reset < 0))
        or (limit is not None and remaining is not None and remaining > limit)
        or (period is not None and reset is not None and reset > period)
    )
    if bad:
        return RateLimitInfo(), {k: v[:40] for k, v in raw.items() if v is not None}
    name = headers.get("X-RateLimit-Name")
    return RateLimitInfo(limit, period, remaining, reset, name), None


def _number(value: str | None, kind: type[int] | type[float]) -> Any:
    """The header's number, or None when absent, not a number, or not finite."""
    if value is None:
        return None
    try:
        number = kind(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def error_message(raw: bytes, limit: int | None = MAX_MESSAGE_CHARS) -> str:
    """The server's explanation: ``errors`` from a JSON body, else the text of whatever came.

    Shortened to ``limit`` characters (None: whole) for the report.
    """
    doc = json_or_none(raw)
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        text = "; ".join(str(e) for e in doc["errors"])
    else:
        text = _SPACE.sub(" ", _TAGS.sub(" ", raw.decode("utf-8", "replace"))).strip()
    return text[:limit]


class _Item(msgspec.Struct):
    attributes: Invitation


class _Answer(msgspec.Struct):
    data: list[_Item] | _Item | None = None


#: Decodes a well-formed answer straight into :class:`Invitation` objects, skipping the
#: fields the report does not keep (about twice as fast as building every dict).
_ANSWER = msgspec.json.Decoder(_Answer)


def json_or_none(raw: bytes) -> Any:
    """The parsed body, or None when it is not JSON."""
    try:
        return msgspec.json.decode(raw)
    except ValueError:  # msgspec.DecodeError, or a UnicodeError inside a string
        return None


def created(raw: bytes) -> list[Invitation]:
    """The invitations in a 2xx body; ``data`` may be one object or a list."""
    try:
        data = _ANSWER.decode(raw).data
    except ValueError:  # not JSON, or not the documented shape: pick what is there
        return invitations(json_or_none(raw))
    if data is None:
        return []
    return [item.attributes for item in data] if isinstance(data, list) else [data.attributes]


def invitations(doc: Any) -> list[Invitation]:
    """The invitations in a parsed body, tolerating any shape: what is malformed is left out."""
    data = doc.get("data") if isinstance(doc, dict) else None
    items = data if isinstance(data, list) else [data] if isinstance(data, dict) else []
    out: list[Invitation] = []
    for item in items:
        attributes = item.get("attributes") if isinstance(item, dict) else None
        if isinstance(attributes, dict) and isinstance(attributes.get("email"), str):
            created, expiry = attributes.get("created_at"), attributes.get("invitation_expiry")
            out.append(
                Invitation(
                    attributes["email"],
                    created if isinstance(created, str) else None,
                    expiry if isinstance(expiry, str) else None,
                )
            )
    return out


def error_for(status: int, message: str, ratelimit: RateLimitInfo) -> SendError:
    """The typed error for a non-2xx ``status``; ``message`` is the service's, scrubbed."""
    kwargs: dict[str, Any] = {"http_status": status, "ratelimit": ratelimit}
    if status == 429:
        return RateLimited(message, **kwargs)
    if status == 400:
        return BadRequest(message, **kwargs)
    if status in (401, 403):
        return AuthError(
            f"{message} — check DD_API_KEY / DD_APP_KEY, the site (--site), and that the "
            "application key has the dashboards_invite_share permission",
            **kwargs,
        )
    if status == 404:
        return TokenNotFound(f"{message} — no shared dashboard with this token", **kwargs)
    if status == 408 or status >= 500:
        return ServerError(message, **kwargs)
    return UnexpectedResponse(message, **kwargs)


async def read_body(content: aiohttp.StreamReader) -> bytes:
    """The whole body up to :data:`MAX_BODY_BYTES`.

    ``StreamReader.read(n)`` returns as soon as *some* bytes are there, so one call could
    cut a body that arrives in several segments short; read until the end instead.
    """
    parts: list[bytes] = []
    size = 0
    while size < MAX_BODY_BYTES:
        part = await content.read(MAX_BODY_BYTES - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)
