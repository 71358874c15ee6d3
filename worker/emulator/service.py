"""What any emulated HTTP service needs: serving on loopback, keys, the rate window, and a
log of every request (for people, tests and the benchmark)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Self

from aiohttp import web

from worker.emulator.model import Logged, RateWindow, RequestLog, summarize
from worker.emulator.responses import error, hang_up, json_response
from worker.urls import bracketed


class Service:
    """The plumbing under :class:`~worker.emulator.server.Emulator`."""

    api_key: str
    app_key: str
    window: RateWindow
    requests: list[Logged]
    invited: Counter[tuple[str, str]]
    url: str
    _clock: Callable[[], float]
    _runner: web.AppRunner | None
    #: How the next ``GET /api/v1/validate`` requests are answered, in order: ``"drop"``
    #: (the connection is closed, no answer) or an HTTP status such as ``"502"`` (a
    #: reverse proxy in front of the API that does not forward the path). Then as usual.
    validate_script: list[str]

    def app(self) -> web.Application:
        """The aiohttp application (routes only; :meth:`start` serves it)."""
        raise NotImplementedError

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 picks a free port); returns the base URL."""
        # A short shutdown: slow handlers must not hold a test or a sandbox run's exit.
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        bound = server.sockets[0].getsockname()
        self.url = f"http://{bracketed(bound[0])}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        """Counts for people and benchmarks: requests by status, emails created, largest list,
        and the CPU seconds of the process serving them (under ``--sandbox``, the run's too)."""
        return {**summarize(self.requests, self.invited),
                "cpu_seconds": round(time.process_time(), 3)}  # fmt: skip

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return json_response(200, self.stats(), {})

    async def _invited(self, request: web.Request) -> web.StreamResponse:
        """Every (token, email) invited and how often: for checks from another process."""
        rows = [[t, e, n] for (t, e), n in sorted(self.invited.items())]
        return json_response(200, rows, {})

    def _admit(self, request: web.Request) -> tuple[web.Response | None, dict[str, str]]:
        """Keys, then the rate limit: (a refusal or None, the rate-limit headers)."""
        if not self._authorized(request):
            return error(403, "Forbidden", {}), {}
        over, headers = self.window.count()
        if over:
            html = self.window.headers == "none"  # as a proxy in front would answer
            return error(429, "Rate limit exceeded", headers, html=html), headers
        return None, headers

    def _authorized(self, request: web.Request) -> bool:
        return (
            request.headers.get("DD-API-KEY") == self.api_key
            and request.headers.get("DD-APPLICATION-KEY") == self.app_key
        )

    def _logger(self, request: web.Request) -> RequestLog:
        token = request.match_info.get("token", "")
        return RequestLog(self.requests, request.method, token, self._clock, request.path)

    async def _validate(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/validate``: the API key check (200, or 403 for a wrong key)."""
        log = self._logger(request)
        if self.validate_script:
            answer = self.validate_script.pop(0)
            if answer == "drop":
                return log(hang_up(request))
            return log(error(int(answer), "scripted answer", {}))
        if request.headers.get("DD-API-KEY") != self.api_key:
            return log(error(403, "Forbidden", {}))
        return log(json_response(200, {"valid": True}, {}))

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        """Anything the real API would not serve here: 404, and remembered."""
        log = self._logger(request)
        return log(error(404, "Not found", {}))
