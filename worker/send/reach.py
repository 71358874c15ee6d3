"""Whether the API can be reached: what a request that got no answer means.

A request that got no answer (a timeout, a refused, failed or broken connection) becomes
one typed error here, its cause scrubbed of the keys and the proxy's credentials. A wrong
URL or port, DNS, TLS or proxy trouble will not heal by retrying batch after batch: the
connections that fail before the service ever answered are counted, and past
:data:`UNREACHABLE_AFTER` the run stops with :class:`ServiceUnreachable`. Kept apart from
:mod:`worker.send.client`, which makes the requests and reads their answers, because
telling an unreachable service from a slow or failing one is a question of its own.
"""

from __future__ import annotations

import asyncio
import sys

from yarl import URL

from worker.errors import (
    RUN_AGAIN,
    ConnectionDropped,
    ConnectionFailed,
    InviteWorkerError,
    RequestTimeout,
    ServiceUnreachable,
)
from worker.send.framing import Dropped
from worker.send.gets import CannotConnect
from worker.send.proxy import PROXY_AUTH_REQUIRED, Proxy, refused
from worker.urls import bracketed

#: Shorter "secrets" (the sandbox's, a test's) are not scrubbed: they would mangle words.
MIN_SECRET_LENGTH = 8
#: Connections that failed before the service ever answered, after which the run stops:
#: a wrong URL or port, DNS or TLS trouble will not heal by retrying batch after batch.
UNREACHABLE_AFTER = 3

#: What a request that got no answer may raise (see :meth:`Reach.no_answer`), besides
#: ``aiohttp.ClientError`` on a request through aiohttp (imported by that request).
NO_ANSWER = (TimeoutError, asyncio.IncompleteReadError, ConnectionError, CannotConnect, Dropped)


class Reach:
    """One client's view of whether its API can be reached, and its secrets to scrub."""

    def __init__(
        self, api_url: str, keys: tuple[str, ...], proxy: Proxy | None, timeout: float
    ) -> None:
        self._api_url = api_url
        self._proxy = proxy
        self._timeout = timeout
        self._secrets = tuple(s for s in keys if len(s) >= MIN_SECRET_LENGTH)
        if proxy is not None:
            self._secrets += proxy.secrets()
        self._via = f" through the proxy {proxy}" if proxy is not None else ""
        #: Whether the service ever answered (any HTTP status) on this client.
        self.answered = False
        self._failed_connects = 0

    def no_answer(
        self, method: str, exc: Exception, within: float | None = None
    ) -> InviteWorkerError:
        """The error for a ``method`` request that got no answer, ``exc`` (one of
        :data:`NO_ANSWER`) being what ended it (``within``: its time limit, when shorter
        than ``--timeout``); raises :class:`ServiceUnreachable` when that was one failed
        connection too many."""
        failed_connect: tuple[type[Exception], ...] = (CannotConnect,)
        broke: tuple[type[Exception], ...] = (asyncio.IncompleteReadError, ConnectionError)
        if "aiohttp" in sys.modules:  # only then can an error be aiohttp's
            import aiohttp

            if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy refused the tunnel
                if exc.status == PROXY_AUTH_REQUIRED and self._proxy is not None:
                    return refused(self._proxy)
                cause = self.scrub(f"the proxy answered {exc.status} {exc.message}")
                self._count_failed_connect(cause)
                return ConnectionFailed(f"cannot connect{self._via}: {cause}")
            failed_connect += (aiohttp.ClientConnectorError,)
            broke += (aiohttp.ClientError,)
        if isinstance(exc, TimeoutError):  # a slow service keeps its retries: not counted
            # Every request's limit counts from its intent, a few milliseconds before it
            # leaves: only one that left noticeably late is told apart.
            if within is not None and within < self._timeout - 0.1:
                return RequestTimeout(f"no answer within {within:.3g}s (what was left of "
                                      "--timeout: it left late, a stalled process?)")  # fmt: skip
            return RequestTimeout(
                f"no answer within {self._timeout:g}s (raise --timeout if the service is slow)"
            )
        if isinstance(exc, failed_connect):
            cause = self.scrub(str(getattr(exc, "os_error", "")) or str(exc))
            self._count_failed_connect(cause)
            return ConnectionFailed(f"cannot connect{self._via}: {cause}")
        if isinstance(exc, broke):
            cause = self.scrub(f"connection broke: {type(exc).__name__}: {exc}")
        else:  # Dropped, the GET path's: already "type: text" or what was malformed
            cause = self.scrub(f"connection broke: {exc}")
        self._count_unanswered_read(method, cause)
        return ConnectionDropped(cause)

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
            proxy = "the proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)" if self._proxy else "proxies"
            raise ServiceUnreachable(
                f"cannot reach the API at {self.origin()}{self._via}: {cause}. Nothing reached "
                f"the service. Check --api-url or --site (DD_SITE), DNS, {proxy} and TLS, then "
                f"{RUN_AGAIN}"
            ) from None

    def origin(self) -> str:
        """Scheme, host and port of the API: never a path or credentials."""
        url = URL(self._api_url)
        return f"{url.scheme}://{bracketed(url.host or '')}:{url.port}"

    def scrub(self, text: str) -> str:
        """``text`` with the keys and the proxy's credentials redacted."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text
