"""The HTTP client for the invitation endpoint: one pooled session, typed errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import structlog
from yarl import URL

from worker.errors import (
    BadRequest,
    ConnectionDropped,
    ConnectionFailed,
    InviteWorkerError,
    RateLimitInfo,
    RequestTimeout,
    SendError,
    ServerError,
    ServiceUnreachable,
)
from worker.metrics import Metrics
from worker.send.answers import (
    created,
    error_for,
    error_message,
    read_body,
    read_ratelimit,
)
from worker.send.framing import Dropped
from worker.send.gets import CannotConnect, Gets
from worker.send.listed import read_dashboard, read_listing
from worker.send.proxy import PROXY_AUTH_REQUIRED, Proxy, refused
from worker.send.refusals import named_addresses
from worker.send.replies import (
    Dashboard,
    Listing,
    Revoked,
    Sent,
    Validated,
    list_form,
)
from worker.validate import check_token

log = structlog.get_logger("worker.client")

USER_AGENT = "invite-worker/0.1"
#: Shorter "secrets" (the sandbox's, a test's) are not scrubbed: they would mangle words.
MIN_SECRET_LENGTH = 8
#: Connections that failed before the service ever answered, after which the run stops:
#: a wrong URL or port, DNS or TLS trouble will not heal by retrying batch after batch.
UNREACHABLE_AFTER = 3


class InvitationClient:
    """Posts list-form invitation requests for one organization.

    Use as an async context manager; it owns one pooled :class:`aiohttp.ClientSession`,
    and without a proxy a pool of its own for GETs (cheaper: see worker.send.gets).
    """

    def __init__(
        self,
        api_url: str,
        api_key: str,
        app_key: str,
        *,
        timeout: float,
        pool_size: int = 8,
        metrics: Metrics | None = None,
        proxy: Proxy | None = None,
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
        #: Requests go through it when set (resolved once: see worker.send.proxy).
        self.proxy = proxy
        self._proxy_url = URL(proxy.url) if proxy is not None else None
        self._via = f" through the proxy {proxy}" if proxy is not None else ""
        self._proxy_headers = proxy.headers() if proxy is not None else None
        if proxy is not None:
            self._secrets += proxy.secrets()
            if not self.api_url.startswith("https:"):  # plain HTTP: on every request
                self._headers.update(self._proxy_headers or {})
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._gets: Gets | None = None
        self._urls: dict[str, URL] = {}
        #: Whether the service ever answered (any HTTP status) on this client.
        self.answered = False
        self._failed_connects = 0
        self._bad_headers_logged = False
        self.metrics = metrics or Metrics()

    async def __aenter__(self) -> InvitationClient:
        # Not through a proxy, nor with credentials in the URL (aiohttp sends those as
        # Authorization, the GET path would not). First: it may refuse the headers.
        if self.proxy is None and URL(self.api_url).user is None:
            reads = {k: v for k, v in self._headers.items() if k != "Content-Type"}
            self._gets = Gets(URL(self.api_url), reads, pool_size=self._pool_size,
                              timeout=self._timeout.total)  # fmt: skip
        connector = aiohttp.TCPConnector(limit=self._pool_size)
        # No cookies: the API sets none we need, and the jar costs time on every request.
        # No trust_env: the proxy was read from the environment once, up front.
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, cookie_jar=aiohttp.DummyCookieJar()
        )
        if self.proxy is not None:
            log.info("client.proxy", proxy=self.proxy.url, source=self.proxy.source,
                     api=self._origin())  # fmt: skip
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._gets is not None:
            await self._gets.close()
            self._gets = None
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
        body = list_form(emails)
        url = self._urls.get(token)
        if url is None:
            url = URL(self.invitation_url(token), encoded=True)
            if len(self._urls) < 10_000:  # parsed once per token, bounded
                self._urls[token] = url
        status, headers, raw = await self._request("invite", "POST", url, body)
        ratelimit = self._ratelimit(headers)
        if 200 <= status < 300:
            return Sent(status, created(raw), ratelimit)
        error = self._error(status, raw, ratelimit)
        if isinstance(error, BadRequest):
            # Read the whole message, not the shortened one: it may name many addresses.
            error.named = named_addresses(error_message(raw, limit=None), emails)
        raise error

    async def revoke(self, token: str, emails: list[str]) -> Revoked:
        """Revoke the invitations of ``emails`` (list form; ends their sessions): 2xx, with
        an empty body (204, ``text/html``), or a :class:`SendError`."""
        url = self.invitation_url(token)
        status, headers, raw = await self._request("revoke", "DELETE", url, list_form(emails))
        ratelimit = self._ratelimit(headers)
        if 200 <= status < 300:
            return Revoked(status, ratelimit)
        raise self._error(status, raw, ratelimit)

    async def list_invitations(self, token: str, page_number: int, page_size: int = 100) -> Listing:
        """One page of the token's invitations (``page_number`` starts at 0)."""
        # Built already encoded (a checked token, two integers): yarl need not quote it.
        url = URL(f"{self.invitation_url(token)}?page_size={int(page_size)}"
                  f"&page_number={int(page_number)}", encoded=True)  # fmt: skip
        status, headers, raw = await self._request("list_invitations", "GET", url, None)
        ratelimit = self._ratelimit(headers)
        if status != 200:
            raise self._error(status, raw, ratelimit)
        page = read_listing(raw)
        if page is None:
            raise ServerError("the invitation list was not JSON", http_status=status)
        return Listing(page[0], page[1], ratelimit)

    async def get_dashboard(self, token: str) -> Dashboard:
        """The shared dashboard of ``token`` (``TokenNotFound`` when there is none)."""
        return await self._dashboard("GET", token, None)

    async def validate(self) -> Validated:
        """``GET /api/v1/validate`` (the API key check). A Datadog API answers 200 or 403
        there; a 404 says the base URL points at something else. Its rate-limit headers
        are not the invitations' (another endpoint, another limit): the pacer is told
        nothing of them."""
        status, _, _ = await self._request(
            "validate", "GET", f"{self.api_url}/api/v1/validate", None
        )
        return Validated(status, RateLimitInfo())

    async def put_dashboard(self, token: str, body: dict[str, Any]) -> Dashboard:
        """Replace the writable fields of ``token``'s shared dashboard; the object after."""
        return await self._dashboard("PUT", token, msgspec.json.encode(body))

    async def _dashboard(self, method: str, token: str, body: bytes | None) -> Dashboard:
        url = URL(self.invitation_url(token).removesuffix("/invitation"), encoded=True)
        status, headers, raw = await self._request("dashboard", method, url, body)
        ratelimit = self._ratelimit(headers)
        if status != 200:
            raise self._error(status, raw, ratelimit)
        return Dashboard(read_dashboard(raw), ratelimit, raw)

    async def _request(
        self, kind: str, method: str, url: str | URL, body: bytes | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request of ``kind`` (the metrics' name for it): status, headers and body."""
        started = time.perf_counter()
        try:
            answer = await self._exchange(method, url, body)
        except InviteWorkerError:  # no answer: a timeout, a refused or broken connection
            self.metrics.request(kind, None, time.perf_counter() - started)
            raise
        self.metrics.request(kind, answer[0], time.perf_counter() - started)
        return answer

    async def _exchange(
        self, method: str, url: str | URL, body: bytes | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        if self._session is None:
            raise RuntimeError("use InvitationClient as 'async with'")
        try:
            if method == "GET" and (gets := self._gets) is not None:
                try:
                    return await gets.get(url if isinstance(url, URL) else URL(url))
                finally:  # a head read is an answer, even if the body then broke
                    self.answered = self.answered or gets.answered
            async with self._session.request(
                method, url, data=body, timeout=self._timeout, allow_redirects=False,
                proxy=self._proxy_url, proxy_headers=self._proxy_headers,
            ) as resp:  # fmt: skip
                if resp.status == PROXY_AUTH_REQUIRED and self.proxy is not None:
                    raise refused(self.proxy)
                self.answered = True
                return resp.status, resp.headers, await read_body(resp.content)
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused the tunnel (CONNECT)
            if exc.status == PROXY_AUTH_REQUIRED and self.proxy is not None:
                raise refused(self.proxy) from None
            cause = self._scrub(f"the proxy answered {exc.status} {exc.message}")
            self._count_failed_connect(cause)
            raise ConnectionFailed(f"cannot connect{self._via}: {cause}") from None
        except TimeoutError:  # a slow service keeps its retries: not counted as unreachable
            raise RequestTimeout(
                f"no answer within {self._timeout.total:g}s (raise --timeout if the service "
                "is slow)"
            ) from None
        except (aiohttp.ClientConnectorError, CannotConnect) as exc:
            cause = self._scrub(str(exc.os_error) or str(exc))
            self._count_failed_connect(cause)
            raise ConnectionFailed(f"cannot connect{self._via}: {cause}") from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError) as exc:
            cause = self._scrub(f"connection broke: {type(exc).__name__}: {exc}")
            self._count_unanswered_read(method, cause)
            raise ConnectionDropped(cause) from None
        except Dropped as exc:  # the GET path's: already "type: text" or what was malformed
            cause = self._scrub(f"connection broke: {exc}")
            self._count_unanswered_read(method, cause)
            raise ConnectionDropped(cause) from None

    def _count_unanswered_read(self, method: str, cause: str) -> None:
        """A read answered by a hang-up or by something that is not HTTP counts as a failed
        connection until the service ever answered: a port where something else listens
        stops the run, as a refused one does. A read creates nothing; a write's fate stays
        unknown, and a timeout is a slow service's, retried as before."""
        if method == "GET":
            self._count_failed_connect(cause)

    def _count_failed_connect(self, cause: str) -> None:
        """A connection failed: past :data:`UNREACHABLE_AFTER` before any answer, stop."""
        if self.answered:
            return
        self._failed_connects += 1
        if self._failed_connects >= UNREACHABLE_AFTER:
            proxy = "the proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)" if self.proxy else "proxies"
            raise ServiceUnreachable(
                f"cannot reach the API at {self._origin()}{self._via}: {cause}. Nothing reached "
                f"the service. Check --api-url or --site (DD_SITE), DNS, {proxy} and TLS, then "
                "run the same command again (--resume for a file)"
            ) from None

    def _origin(self) -> str:
        """Scheme, host and port of the API: never a path or credentials."""
        url = URL(self.api_url)
        return f"{url.scheme}://{url.host}:{url.port}"

    def _ratelimit(self, headers: Mapping[str, str]) -> RateLimitInfo:
        info, bad = read_ratelimit(headers)
        if info.remaining is not None:
            self.metrics.budget(info.remaining)
        if bad and not self._bad_headers_logged:
            self._bad_headers_logged = True
            log.warning("ratelimit.bad_headers", headers=bad,
                        action="treated as unknown: pacing adapts without them")  # fmt: skip
        return info

    def _error(self, status: int, raw: bytes, ratelimit: RateLimitInfo) -> SendError:
        return error_for(status, self._scrub(error_message(raw) or f"HTTP {status}"), ratelimit)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text
