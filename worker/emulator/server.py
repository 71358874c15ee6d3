"""A local emulator of Datadog's shared-dashboard invitation API.

It behaves like the real endpoint as far as this worker can observe: keys checked (403),
unknown tokens (404), a share-list rule (400 for any address outside it, nothing created),
201 with the recorded response shape, calendar-aligned ``X-RateLimit-*`` headers and 429s,
and switchable faults: 5xx, slow answers and dropped connections, at random rates or
scripted for the next requests. Used by ``--sandbox``, ``invite-worker emulator`` and tests.

Sandbox rules apply to tokens not registered with :meth:`Emulator.add_dashboard`: every
token exists except those starting with ``gone``, and every address is on the share list
except those at ``@outside.example``.

The invitation endpoint's handlers (create, list, revoke) are in
:mod:`worker.emulator.invitations`; the plumbing any emulated service needs in
:mod:`worker.emulator.service`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from worker.emulator.dashboards import Dashboard
from worker.emulator.invitations import Invitations
from worker.emulator.model import FAULTS, INVITATION_PATH, Faults, Logged, RateWindow, RequestLog
from worker.emulator.responses import error, hang_up, json_response, no_dashboard
from worker.errors import UsageError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A handler of a request about one dashboard, once keys, limit and dashboard are checked.
BoardHandler = Callable[
    [web.Request, RequestLog, dict[str, str], Dashboard], Awaitable[web.StreamResponse]
]
#: What a hook run as a PUT arrives says of it: None, applied and answered; an HTTP status,
#: refused with it (not applied); :data:`DROP`, applied, then the connection closed with no
#: answer; :data:`CUT`, the connection closed before it is applied (as a server closes a
#: kept-alive connection).
WriteHook = Callable[[Dashboard], "int | str | None"]
DROP, CUT = "drop", "cut"


class Emulator(Invitations):
    """The emulated service. ``await start()`` serves it on 127.0.0.1; state is inspectable."""

    def __init__(
        self,
        *,
        api_key: str = "sandbox",
        app_key: str = "sandbox",
        limit: int | None = None,
        period: float = 10.0,
        faults: Faults | None = None,
        sandbox_rules: bool = True,
        seed: int | None = 0,
        clock: Callable[[], float] = time.time,
        ratelimit_headers: str = "standard",
        session_rate: float = 0.0,
        max_page_size: int = 100,
    ) -> None:
        self.window = RateWindow(limit, period, ratelimit_headers, clock)
        if not 0 <= session_rate <= 1:
            raise UsageError("--session-rate must be between 0 and 1")
        #: Share of new invitations whose link is opened at once (a session starts).
        self.session_rate = session_rate
        if max_page_size < 1:
            raise UsageError("--max-page-size must be at least 1")
        #: The largest page of invitations served, whatever page_size asks (undocumented
        #: for the real service: a worker must not take a short page for the end).
        self.max_page_size = max_page_size
        #: Whether a listing says ``meta.page.total_count`` (False: only an empty page
        #: tells the end).
        self.list_total = True
        #: Serve the first page whatever page_number asks (a broken service, for tests).
        self.ignore_page_number = False
        #: (page_size, page_number) of every listing request, as asked.
        self.pages_asked: list[tuple[int, int]] = []
        self.api_key, self.app_key = api_key, app_key
        self.faults = faults or Faults()
        self.sandbox_rules = sandbox_rules
        self.dashboards: dict[str, Dashboard] = {}
        self.requests: list[Logged] = []
        self.invited: Counter[tuple[str, str]] = Counter()
        self._scripted: deque[str] = deque()
        self.validate_script: list[str] = []
        self._created = asyncio.Event()
        self._rng = random.Random(seed)  # fault injection, not security
        self._clock = clock
        self._runner: web.AppRunner | None = None
        self.url = ""
        #: Per token, what happens to the dashboard before each of its next GETs (None:
        #: nothing): another person's edit, for tests of concurrent changes.
        self.before_read: dict[str, list[Callable[[Dashboard], None] | None]] = {}
        #: Per token, what happens as each of its next PUTs arrives (None: nothing), before
        #: the PUT is applied: another person's edit, and how the PUT is answered.
        self.before_write: dict[str, list[WriteHook | None]] = {}

    # -- set-up ---------------------------------------------------------------------------

    def add_dashboard(
        self,
        token: str,
        share_list: list[str] | None = None,
        *,
        invitees: list[str] | None = None,
        share_type: str = "invite",
        status: str = "active",
    ) -> Dashboard:
        """Register a dashboard.

        With neither ``share_list`` nor ``invitees`` it follows the sandbox rule (every
        address but ``@outside.example``, not listed); otherwise it allows exactly those.
        """
        now = self._clock()
        board = Dashboard(token, share_type=share_type, status=status)
        if share_list is not None or invitees is not None:
            board.update({"share_list": share_list or [],
                          "invitees": [{"email": e} for e in invitees or []]}, now)  # fmt: skip
        self.dashboards[token] = board
        return board

    def seed(self, boards: list[Dashboard]) -> None:
        """Register dashboards read from a file (see ``dashboards.load_dashboards``)."""
        for board in boards:
            self.dashboards[board.token] = board
            for email, _ in board.invitations:
                self.invited[(board.token, email.lower())] += 1

    def script(self, *faults: str) -> None:
        """Apply these faults, in order, to the next invitation POSTs (see :data:`FAULTS`)."""
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self._scripted.extend(faults)

    async def wait_for_invitations(self, count: int) -> None:
        """Return once at least ``count`` invitations exist (for tests that act mid-run)."""
        while sum(self.invited.values()) < count:
            await self._created.wait()
            self._created = asyncio.Event()

    def app(self) -> web.Application:
        """The aiohttp application (routes only; :meth:`start` serves it)."""
        app = web.Application()
        app.router.add_post(INVITATION_PATH, self._post)
        app.router.add_get(INVITATION_PATH, self._on_board(self._list))
        app.router.add_delete(INVITATION_PATH, self._on_board(self._delete))
        app.router.add_get("/api/v1/dashboard/public/{token}", self._on_board(self._dashboard))
        app.router.add_put("/api/v1/dashboard/public/{token}", self._on_board(self._update))
        app.router.add_get("/api/v1/validate", self._validate)
        app.router.add_get("/_emulator/stats", self._stats)
        app.router.add_get("/_emulator/invited", self._invited)
        app.router.add_route("*", "/{anything:.*}", self._unknown)
        return app

    # -- handlers -------------------------------------------------------------------------

    def _board(self, token: str) -> Dashboard | None:
        board = self.dashboards.get(token)
        if board is None and self.sandbox_rules and not token.startswith("gone"):
            board = self.add_dashboard(token)
        return board

    def _on_board(self, handler: BoardHandler) -> Handler:
        """The aiohttp handler: keys, rate limit and dashboard checked, then ``handler``."""

        async def handle(request: web.Request) -> web.StreamResponse:
            log = self._logger(request)
            refusal, headers = self._admit(request)
            if refusal is not None:
                return log(refusal)
            board = self._board(request.match_info["token"])
            if board is None:
                return log(no_dashboard(headers))
            return await handler(request, log, headers, board)

        return handle

    async def _dashboard(
        self, request: web.Request, log: RequestLog, headers: dict[str, str], board: Dashboard
    ) -> web.StreamResponse:
        edits = self.before_read.get(board.token)
        if edits:
            edit = edits.pop(0)
            if edit is not None:
                edit(board)
        return log(json_response(200, board.as_json(), headers))

    async def _update(
        self, request: web.Request, log: RequestLog, headers: dict[str, str], board: Dashboard
    ) -> web.StreamResponse:
        """PUT: the writable fields the body carries replace the dashboard's."""
        hooks = self.before_write.get(board.token)
        answer = hook(board) if hooks and (hook := hooks.pop(0)) is not None else None
        if isinstance(answer, int):
            return log(error(answer, "The service could not apply the update", headers))
        if answer == CUT:
            return log(hang_up(request))
        try:
            body = msgspec.json.decode(await request.read())
            if board.sandbox:
                # A sandbox-rule dashboard becomes an explicit one on its first edit.
                board.share_list, board.invitees = set(), {}
            board.update(body, self._clock())
        except ValueError as exc:  # not JSON, or a field of the wrong shape
            return log(error(400, f"Invalid shared dashboard update: {exc}", headers))
        if answer == DROP:
            return log(hang_up(request))
        return log(json_response(200, board.as_json(), headers))
