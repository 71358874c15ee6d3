"""The HTTP client for the invitation endpoint: one pooled session, typed errors."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import structlog
from yarl import URL

from worker.errors import (
    AuthError,
    BadRequest,
    ConnectionDropped,
    ConnectionFailed,
    RateLimited,
    RateLimitInfo,
    RequestTimeout,
    SendError,
    ServerError,
    ServiceUnreachable,
    TokenNotFound,
    UnexpectedResponse,
)
from worker.outcome import Invitation
from worker.send.refusals import named_addresses
from worker.validate import check_token

log = structlog.get_logger("worker.client")

USER_AGENT = "invite-worker/0.1"
#: Largest response body read; 100 invitations are about 30 KB.
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_MESSAGE_CHARS = 500
#: Shorter "secrets" (the sandbox's, a test's) are not scrubbed: they would mangle words.
MIN_SECRET_LENGTH = 8
#: Connections that failed before the service ever answered, after which the run stops:
#: a wrong URL or port, DNS or TLS trouble will not heal by retrying batch after batch.
UNREACHABLE_AFTER = 3
_TAGS = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Sent:
    """A 2xx answer: which invitations the service says it created."""

    http_status: int
    invitations: list[Invitation]
    ratelimit: RateLimitInfo


@dataclass(frozen=True, slots=True)
class Listing:
    """One page of a token's invitations."""

    invitations: list[Invitation]
    total_count: int | None
    ratelimit: RateLimitInfo


class InvitationClient:
    """Posts list-form invitation requests for one organization.

    Use as an async context manager; it owns one pooled :class:`aiohttp.ClientSession`.
    """

    def __init__(
        self,
        api_url: str,
        api_key: str,
        app_key: str,
        *,
        timeout: float,
        pool_size: int = 8,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {
            "DD-API-KEY": api_key,
            "DD-APPLICATION-KEY": app_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
            # Answers are small; uncompressed ones spare us decompression on every response.
            "Accept-Encoding": "identity",
        }
        self._secrets = tuple(s for s in (api_key, app_key) if len(s) >= MIN_SECRET_LENGTH)
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        #: Whether the service ever answered (any HTTP status) on this client.
        self.answered = False
        self._failed_connects = 0
        self._bad_headers_logged = False

    async def __aenter__(self) -> InvitationClient:
        connector = aiohttp.TCPConnector(limit=self._pool_size)
        # No cookies: the API sets none we need, and the jar costs time on every request.
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, cookie_jar=aiohttp.DummyCookieJar()
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def invitation_url(self, token: str) -> str:
        """The POST URL for ``token``; refuses anything but a plain share token."""
        if not check_token(token):
            raise ValueError("refusing to build a URL from an invalid token")
        # quote() is belt and braces: a valid token has nothing to escape.
        return f"{self.api_url}/api/v1/dashboard/public/{quote(token, safe='')}/invitation"

    async def invite(self, token: str, emails: list[str]) -> Sent:
        """Send one list-form request; return :class:`Sent` or raise a :class:`SendError`."""
        body = _encode(
            {
                "data": [
                    {"type": "public_dashboard_invitation", "attributes": {"email": e}}
                    for e in emails
                ]
            }
        )
        url = self._urls.get(token)
        if url is None:
            url = URL(self.invitation_url(token), encoded=True)
            if len(self._urls) < 10_000:  # parsed once per token, bounded
                self._urls[token] = url
        status, headers, raw = await self._request("POST", url, body)
        ratelimit = self._ratelimit(headers)
        if 200 <= status < 300:
            return Sent(status, _created(raw), ratelimit)
        error = self._error(status, raw, ratelimit)
        if isinstance(error, BadRequest):
            # Read the whole message, not the shortened one: it may name many addresses.
            error.named = named_addresses(error_message(raw, limit=None), emails)
        raise error

    async def list_invitations(self, token: str, page_number: int, page_size: int = 100) -> Listing:
        """One page of the token's invitations (``page_number`` starts at 0)."""
        url = f"{self.invitation_url(token)}?page_size={page_size}&page_number={page_number}"
        status, headers, raw = await self._request("GET", url, None)
        ratelimit = self._ratelimit(headers)
        if status != 200:
            raise self._error(status, raw, ratelimit)
        doc = _json_or_none(raw)
        if doc is None:
            raise ServerError("the invitation list was not JSON", http_status=status)
        # meta.page.total_count, tolerating any shape: a malformed answer must not crash.
        total: Any = doc
        for key in ("meta", "page", "total_count"):
            total = total.get(key) if isinstance(total, dict) else None
        return Listing(_invitations(doc), total if isinstance(total, int) else None, ratelimit)

    async def _request(
        self, method: str, url: str | URL, body: bytes | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        if self._session is None:
            raise RuntimeError("use InvitationClient as 'async with'")
        try:
            async with self._session.request(
                method, url, data=body, timeout=self._timeout, allow_redirects=False
            ) as resp:
                self.answered = True
                return resp.status, resp.headers, await _read_body(resp.content)
        except TimeoutError:
            raise RequestTimeout(
                f"no answer within {self._timeout.total:g}s (raise --timeout if the service "
                "is slow)"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            cause = self._scrub(str(exc.os_error) or str(exc))
            if not self.answered:
                self._failed_connects += 1
                if self._failed_connects >= UNREACHABLE_AFTER:
                    raise ServiceUnreachable(
                        f"cannot reach the API at {self._origin()}: {cause}. Nothing reached "
                        "the service. Check --api-url or --site (DD_SITE), DNS, proxies and "
                        "TLS, then run the same command again (--resume for a file)"
                    ) from None
            raise ConnectionFailed(f"cannot connect: {cause}") from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ConnectionDropped(
                self._scrub(f"connection broke: {type(exc).__name__}: {exc}")
            ) from None

    def _origin(self) -> str:
        """Scheme, host and port of the API: never a path or credentials."""
        url = URL(self.api_url)
        return f"{url.scheme}://{url.host}:{url.port}"

    def _ratelimit(self, headers: Mapping[str, str]) -> RateLimitInfo:
        info, bad = read_ratelimit(headers)
        if bad and not self._bad_headers_logged:
            self._bad_headers_logged = True
            log.warning("ratelimit.bad_headers", headers=bad,
                        action="treated as unknown: pacing adapts without them")  # fmt: skip
        return info

    def _error(self, status: int, raw: bytes, ratelimit: RateLimitInfo) -> SendError:
        message = self._scrub(error_message(raw) or f"HTTP {status}")
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

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


async def _read_body(content: aiohttp.StreamReader) -> bytes:
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


_RATELIMIT_HEADERS = ("Limit", "Period", "Remaining", "Reset")


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimitInfo:
    """Read ``X-RateLimit-*``; see :func:`read_ratelimit`."""
    return read_ratelimit(headers)[0]


def read_ratelimit(headers: Mapping[str, str]) -> tuple[RateLimitInfo, dict[str, str] | None]:
    """``X-RateLimit-*`` as evidence: ``(info, None)``, or ``(RateLimitInfo(), raw)``.

    Absent headers are ``None`` in the info. Headers that make no sense together — a limit
    of 0 or less, a period of 0 or less or not a number, a negative remaining or reset, a
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
        or (raw["Period"] is not None and (period is None or period <= 0))
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
    doc = _json_or_none(raw)
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        text = "; ".join(str(e) for e in doc["errors"])
    else:
        text = _SPACE.sub(" ", _TAGS.sub(" ", raw.decode("utf-8", "replace"))).strip()
    return text[:limit]


_encode = msgspec.json.encode


class _Item(msgspec.Struct):
    attributes: Invitation


class _Answer(msgspec.Struct):
    data: list[_Item] | _Item | None = None


#: Decodes a well-formed answer straight into :class:`Invitation` objects, skipping the
#: fields the report does not keep (about twice as fast as building every dict).
_ANSWER = msgspec.json.Decoder(_Answer)


def _json_or_none(raw: bytes) -> Any:
    """The parsed body, or None when it is not JSON."""
    try:
        return msgspec.json.decode(raw)
    except ValueError:  # msgspec.DecodeError, or a UnicodeError inside a string
        return None


def _created(raw: bytes) -> list[Invitation]:
    """The invitations in a 2xx body; ``data`` may be one object or a list."""
    try:
        data = _ANSWER.decode(raw).data
    except ValueError:  # not JSON, or not the documented shape: pick what is there
        return _invitations(_json_or_none(raw))
    if data is None:
        return []
    return [item.attributes for item in data] if isinstance(data, list) else [data.attributes]


def _invitations(doc: Any) -> list[Invitation]:
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
