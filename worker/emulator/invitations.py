"""The invitation endpoint of the emulated service: create (POST, with its faults and the
share-list rule), list a page, revoke (DELETE).

The handlers with most to say, kept apart from :mod:`worker.emulator.server`, which holds
the emulator's state, its set-up, its routes and the dashboard endpoint.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Any

from aiohttp import web

from worker.emulator.dashboards import Dashboard
from worker.emulator.model import Faults, RequestLog, parse_body
from worker.emulator.responses import error, hang_up, json_response, no_dashboard
from worker.emulator.service import Service


class Invitations(Service):
    """The invitation handlers under :class:`~worker.emulator.server.Emulator`."""

    faults: Faults
    session_rate: float
    max_page_size: int
    list_total: bool
    ignore_page_number: bool
    pages_asked: list[tuple[int, int]]
    _scripted: deque[str]
    _created: asyncio.Event
    _rng: random.Random

    def _board(self, token: str) -> Dashboard | None:
        """The token's dashboard, or None for no dashboard (see ``Emulator``)."""
        raise NotImplementedError

    async def _post(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        log = self._logger(request)
        emails, list_form = parse_body(await request.read())
        log.emails, log.list_form = len(emails or []), list_form
        refusal, headers = self._admit(request)
        if refusal is not None:
            return log(refusal)
        fault = self._next_fault()
        if fault == "drop":
            return log(hang_up(request))
        if fault == "503":
            return log(error(503, "Service Unavailable", headers))
        if fault == "502-html":
            return log(error(502, "upstream connect error", headers, html=True))
        if fault == "429":
            return log(error(429, "Rate limit exceeded", headers))
        if fault == "slow":
            await asyncio.sleep(self.faults.slow_seconds)
        board = self._board(token)
        if board is None:
            return log(no_dashboard(headers))
        if not emails:
            return log(error(400, "Invalid request body", headers))
        if self.faults.max_batch is not None and len(emails) > self.faults.max_batch:
            message = "Too many invitations in one request"
            if self.faults.name_max_batch:
                message += f" (max {self.faults.max_batch})"
            return log(error(400, message, headers))
        now = self._clock()
        if board.share_type != "invite" or board.status != "active":
            state = "paused" if board.status != "active" else f"shared as {board.share_type!r}"
            return log(error(400, f"Invitations need an active invite-only shared dashboard; "
                             f"this one is {state}", headers))  # fmt: skip
        refused = [e for e in emails if not board.allows(e, now)]
        if refused:
            message = "Email(s) not in the shared dashboard's share list"
            if self.faults.name_refused:
                message += ": " + ", ".join(refused)
            return log(error(400, message, headers))
        items = []
        for email in emails:
            board.invitations.append((email, now))
            self.invited[(token, email.lower())] += 1
            if self.session_rate and self._rng.random() < self.session_rate:
                board.open_session(email, now)
            items.append(board.invitation(email, now, now))
        self._created.set()
        if fault == "502-after":
            return log(error(502, "Bad Gateway", headers, html=True))
        if fault == "drop-after":
            return log(hang_up(request))
        data: Any = items if list_form else items[0]
        return log(json_response(201, {"data": data}, headers))

    async def _list(
        self, request: web.Request, log: RequestLog, headers: dict[str, str], board: Dashboard
    ) -> web.StreamResponse:
        try:
            size = min(self.max_page_size, max(1, int(request.query.get("page_size", "50"))))
            number = max(0, int(request.query.get("page_number", "0")))
        except ValueError:
            return log(error(400, "page_size and page_number must be integers", headers))
        self.pages_asked.append((int(request.query.get("page_size", "50")), number))
        if self.ignore_page_number:
            number = 0
        page = board.invitations[number * size : (number + 1) * size]
        now = self._clock()
        body: dict[str, Any] = {"data": [board.invitation(e, t, now) for e, t in page]}
        if self.list_total:
            body["meta"] = {"page": {"total_count": len(board.invitations)}}
        return log(json_response(200, body, headers))

    async def _delete(
        self, request: web.Request, log: RequestLog, headers: dict[str, str], board: Dashboard
    ) -> web.StreamResponse:
        """Revoke invitations (object or list form): they leave the listing and their
        sessions end. 204 with an empty ``text/html`` body, as the service answers."""
        emails, list_form = parse_body(await request.read())
        log.emails, log.list_form = len(emails or []), list_form
        if not emails:
            return log(error(400, "Invalid request body", headers))
        if self.faults.max_batch is not None and len(emails) > self.faults.max_batch:
            return log(error(400, "Too many invitations in one request", headers))
        gone = {e.lower() for e in emails}
        board.invitations = [(e, t) for e, t in board.invitations if e.lower() not in gone]
        for email in gone:
            board.sessions.pop(email, None)
        return log(web.Response(status=204, content_type="text/html", headers=headers))

    # -- helpers --------------------------------------------------------------------------

    def _next_fault(self) -> str | None:
        if self._scripted:
            return self._scripted.popleft()
        return self.faults.pick(self._rng.random())
