"""The HTTP client for the invitation endpoint: one pooled session, typed errors.

What a request that got no answer means (and when the service counts as unreachable) is
:mod:`worker.send.reach`'s.

aiohttp is imported by the first request that goes through it (a write, or any request
through a proxy), not with this module: its import costs a quarter of a second of CPU
(it builds TLS contexts from the CA bundle), and a run that sends nothing — a day after a
send, whose reads take :mod:`worker.send.gets`, or a dry run — never needs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import msgspec
import structlog
from yarl import URL

from worker.errors import (
    BadRequest,
    HeldUp,
    InviteWorkerError,
    RateLimitInfo,
    SendError,
    ServerError,
)
from worker.metrics import Metrics
from worker.send.answers import (
    created,
    error_for,
    error_message,
    read_body,
    read_ratelimit,
)
from worker.send.gets import Gets
from worker.send.listed import read_dashboard, read_listing
from worker.send.proxy import PROXY_AUTH_REQUIRED, Proxy, refused
from worker.send.reach import NO_ANSWER, Reach
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

if TYPE_CHECKING:
    import aiohttp

log = structlog.get_logger("worker.client")

USER_AGENT = "invite-worker/0.1"


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
        self._timeout = timeout
        self._headers = {
            "DD-API-KEY": api_key,
            "DD-APPLICATION-KEY": app_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
            # Answers are small; uncompressed ones spare us decompression on every response.
            "Accept-Encoding": "identity",
        }
        #: Requests go through it when set (resolved once: see worker.send.proxy).
        self.proxy = proxy
        self._proxy_url = URL(proxy.url) if proxy is not None else None
        self._proxy_headers = proxy.headers() if proxy is not None else None
        if proxy is not None and not self.api_url.startswith("https:"):
            self._headers.update(self._proxy_headers or {})  # plain HTTP: on every request
        #: Whether the service was ever reached; what a request without an answer means.
        self._reach = Reach(self.api_url, (api_key, app_key), proxy, timeout)
        self._pool_size = pool_size
        self._entered = False
        self._session: aiohttp.ClientSession | None = None  # made when first needed
        self._gets: Gets | None = None
        self._urls: dict[str, URL] = {}
        # An API URL with no path (a run's always is: see check_api_url): the URLs built
        # on it are the path after it, as sent.
        base = URL(self.api_url)
        self._bare_origin = base.raw_path in ("", "/") and not (
            base.raw_query_string or base.raw_fragment
        )
        self._bad_headers_logged = False
        self.metrics = metrics or Metrics()

    async def __aenter__(self) -> InvitationClient:
        # Not through a proxy, nor with credentials in the URL (aiohttp sends those as
        # Authorization, the GET path would not). First: it may refuse the headers.
        if self.proxy is None and URL(self.api_url).user is None:
            reads = {k: v for k, v in self._headers.items() if k != "Content-Type"}
            self._gets = Gets(URL(self.api_url), reads, pool_size=self._pool_size,
                              timeout=self._timeout)  # fmt: skip
        self._entered = True
        if self.proxy is not None:
            log.info("client.proxy", proxy=self.proxy.url, source=self.proxy.source,
                     api=self._reach.origin())  # fmt: skip
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
        self._entered = False
        if self._session is not None:
            await self._session.close()
            self._session = None

    def open_writes(self) -> None:
        """Make the session writes go through now (importing aiohttp the first time), not
        between a write's intent and its leaving, where a slow import would hold it up."""
        self._opened()

    def _opened(self) -> aiohttp.ClientSession:
        """The pooled session, made (and aiohttp imported) at the first request needing it."""
        if self._session is None:
            import aiohttp

            from worker.send.leaving import GatedConnector

            connector = GatedConnector(limit=self._pool_size)
            # No cookies: the API sets none we need, and the jar costs time on every
            # request. No trust_env: the proxy was read from the environment once, up front.
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    def invitation_url(self, token: str) -> str:
        """The POST URL for ``token``; refuses anything but a plain share token."""
        if not check_token(token):
            raise ValueError("refusing to build a URL from an invalid token")
        # quote() is belt and braces: a valid token has nothing to escape.
        return f"{self.api_url}/api/v1/dashboard/public/{quote(token, safe='')}/invitation"

    async def invite(
        self, token: str, emails: list[str], leaving: Callable[[], float | None] | None = None
    ) -> Sent:
        """Send one list-form request; return :class:`Sent` or raise a :class:`SendError`.

        ``leaving`` is asked as the request is made, once its connection is in hand, and
        as its body is written (see :mod:`worker.send.leaving`): the time limit left of
        ``--timeout`` (None: all of it), or it raises :class:`HeldUp` to keep the request
        from leaving."""
        body = list_form(emails)
        url = self._urls.get(token)
        if url is None:
            url = URL(self.invitation_url(token), encoded=True)
            if len(self._urls) < 10_000:  # parsed once per token, bounded
                self._urls[token] = url
        status, headers, raw = await self._request("invite", "POST", url, body, leaving)
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
        # A checked token and two integers: nothing to quote, and no URL object to build
        # for each of a day's 10,000 pages (see _exchange).
        query = f"page_size={int(page_size)}&page_number={int(page_number)}"
        url: str | URL = f"{self.invitation_url(token)}?{query}"
        if not self._bare_origin:  # taken as written, as the POSTs' URL is
            url = URL(url, encoded=True)
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
        self, kind: str, method: str, url: str | URL, body: bytes | None,
        leaving: Callable[[], float | None] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:  # fmt: skip
        """One request of ``kind`` (the metrics' name for it): status, headers and body;
        ``leaving``: see :meth:`invite`."""
        started = time.perf_counter()
        try:
            answer = await self._exchange(method, url, body, leaving)
        except HeldUp:  # kept from leaving: no request was made
            raise
        except InviteWorkerError:  # no answer: a timeout, a refused or broken connection
            self.metrics.request(kind, None, time.perf_counter() - started)
            raise
        self.metrics.request(kind, answer[0], time.perf_counter() - started)
        return answer

    async def _exchange(
        self, method: str, url: str | URL, body: bytes | None,
        leaving: Callable[[], float | None] | None,
    ) -> tuple[int, Mapping[str, str], bytes]:  # fmt: skip
        if not self._entered:
            raise RuntimeError("use InvitationClient as 'async with'")
        if method == "GET" and (gets := self._gets) is not None:
            target: URL | str = url
            if not isinstance(url, URL):  # one of ours, on a bare origin: its path as is
                bare = self._bare_origin and url.startswith(self.api_url + "/")
                target = url[len(self.api_url) :] if bare else URL(url)
            try:
                return await gets.get(target)
            except NO_ANSWER as exc:  # a timeout, a refused, failed or broken connection
                raise self._reach.no_answer(method, exc) from None
            finally:  # a head read is an answer, even if the body then broke
                self._reach.answered = self._reach.answered or gets.answered
        session = self._opened()
        import aiohttp  # imported by _opened: a name lookup

        from worker.send.leaving import LEAVING, Asking, GatedBody, OnceBody, held_back

        # Asked with nothing left to do but make the request: its time limit counts from
        # this reading, and the connection, once in hand, asks again.
        within = leaving() if leaving is not None else None
        # Not rounded up to a whole second past 5 s (aiohttp's default): whoever settles
        # an intent takes its request for over at exactly its time limit.
        limit = self._timeout if within is None else min(within, self._timeout)
        timeout = aiohttp.ClientTimeout(total=limit, ceil_threshold=math.inf)
        asking = Asking(leaving)
        asked = LEAVING.set(asking)
        # A PUT's body is made once (see OnceBody); a DELETE, which cannot go stale, may be
        # sent again by aiohttp on a dropped connection, as it always was.
        data: bytes | OnceBody | None = body
        if body is not None and leaving is not None:
            data = GatedBody(body, asking)
        elif body is not None and method == "PUT":
            data = OnceBody(body)
        try:
            async with session.request(
                method, url, data=data, timeout=timeout, allow_redirects=False,
                proxy=self._proxy_url, proxy_headers=self._proxy_headers,
            ) as resp:  # fmt: skip
                if resp.status == PROXY_AUTH_REQUIRED and self.proxy is not None:
                    raise refused(self.proxy)
                self._reach.answered = True
                return resp.status, resp.headers, await read_body(resp.content)
        except (*NO_ANSWER, aiohttp.ClientError) as exc:  # as above, or aiohttp's own
            if (kept := held_back(exc)) is not None:  # nothing left: see GatedBody
                raise kept from None
            raise self._reach.no_answer(method, exc, within) from None
        finally:
            asking.done()
            LEAVING.reset(asked)

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
        message = self._reach.scrub(error_message(raw) or f"HTTP {status}")
        return error_for(status, message, ratelimit)
