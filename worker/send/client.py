"""The HTTP client for the invitation endpoint: one pooled session, typed errors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
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
    TokenNotFound,
    UnexpectedResponse,
)
from worker.report import Invitation
from worker.validate import check_token

USER_AGENT = "invite-worker/0.1"
#: Largest response body read; 100 invitations are about 30 KB.
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_MESSAGE_CHARS = 500
#: Shorter "secrets" (the sandbox's, a test's) are not scrubbed: they would mangle words.
MIN_SECRET_LENGTH = 8
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
        ratelimit = parse_ratelimit(headers)
        if 200 <= status < 300:
            return Sent(status, _created(raw), ratelimit)
        raise self._error(status, raw, ratelimit)

    async def list_invitations(self, token: str, page_number: int, page_size: int = 100) -> Listing:
        """One page of the token's invitations (``page_number`` starts at 0)."""
        url = f"{self.invitation_url(token)}?page_size={page_size}&page_number={page_number}"
        status, headers, raw = await self._request("GET", url, None)
        ratelimit = parse_ratelimit(headers)
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
                return resp.status, resp.headers, await _read_body(resp.content)
        except TimeoutError:
            raise RequestTimeout(
                f"no answer within {self._timeout.total:g}s (raise --timeout if the service "
                "is slow)"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionFailed(self._scrub(f"cannot connect: {exc.os_error}")) from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ConnectionDropped(
                self._scrub(f"connection broke: {type(exc).__name__}: {exc}")
            ) from None

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


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimitInfo:
    """Read ``X-RateLimit-*``; a missing or garbled header becomes ``None``."""
    return RateLimitInfo(
        limit=_number(headers.get("X-RateLimit-Limit"), int),
        period=_number(headers.get("X-RateLimit-Period"), float),
        remaining=_number(headers.get("X-RateLimit-Remaining"), int),
        reset=_number(headers.get("X-RateLimit-Reset"), float),
        name=headers.get("X-RateLimit-Name"),
    )


def _number(value: str | None, kind: type[int] | type[float]) -> Any:
    if value is None:
        return None
    try:
        number = kind(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def error_message(raw: bytes) -> str:
    """The server's explanation: ``errors`` from a JSON body, else the text of whatever came."""
    doc = _json_or_none(raw)
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        text = "; ".join(str(e) for e in doc["errors"])
    else:
        text = _SPACE.sub(" ", _TAGS.sub(" ", raw.decode("utf-8", "replace"))).strip()
    return text[:MAX_MESSAGE_CHARS]


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
