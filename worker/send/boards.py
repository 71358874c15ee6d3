"""Reading a token's shared dashboard for the check (see ``preflight``): whether it
refuses the token, and whom it allows.

Two answers change the whole run rather than the token. A first 404 asks whether the
base URL serves the API at all (:meth:`BoardReader.check_url`), and a key that cannot
read dashboards (a 403) turns the check off for the rest of the run, saying so once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import structlog

from worker.errors import AuthError, SendError, TokenNotFound, WrongUrl
from worker.outcome import DASHBOARD_PAUSED, NOT_INVITE_ONLY, Failure
from worker.send.client import InvitationClient
from worker.send.screening import TokenCheck, allowed_keys

log = structlog.get_logger("worker.preflight")


class BoardReader:
    """Reads dashboards through ``paced`` (the run's pacer and retry policy); ``refused``
    is called once, when the key proves unable to read them; ``plan``: for a dry run
    (what it advises after a wrong URL)."""

    def __init__(
        self,
        client: InvitationClient,
        paced: Callable[..., Awaitable[Any]],
        refused: Callable[[], None] | None = None,
        *,
        plan: bool = False,
    ) -> None:
        self._client = client
        self._plan = plan
        self._paced = paced
        self._refused = refused
        #: False once the key proved unable to read dashboards.
        self.readable = True
        # Whether the base URL is known to serve the API (checked on the first 404).
        self._url_checked = False
        self._url_lock = asyncio.Lock()
        self._wrong_url: WrongUrl | None = None

    async def read(self, token: str, check: TokenCheck) -> None:
        """Read ``token``'s dashboard into ``check``: refused, or who is allowed."""
        if not self.readable:
            return
        try:
            board = (
                await self._paced(functools.partial(self._client.get_dashboard, token))
            ).dashboard
        except TokenNotFound as exc:
            await self.check_url()
            check.refused = Failure(TokenNotFound.code, exc.message)
            return
        except AuthError as exc:
            self._url_checked = True  # the API answered
            self.unreadable(exc)
            return
        self._url_checked = True
        refusal = sharing_refusal(board.share_type, board.status)
        if refusal is not None:
            check.refused = refusal
        else:
            check.allowed, check.expired = allowed_keys(board, check.checked)
            allowed = None if check.allowed is None else len(check.allowed)
            log.info("preflight.dashboard", token=token, allowed=allowed)

    async def check_url(self) -> None:
        """A 404 before any other answer: is there an API at this base URL at all?

        A base URL with a path, or another service on the port, answers 404 to every
        token; refusing each as ``token_not_found`` would record them failed for good.
        One ``GET /api/v1/validate`` tells: a 404 there too halts the run (:class:`WrongUrl`,
        exit 3), leaving every row for ``--resume``. It is paced, retried and stopped as
        every read is; any other answer, or none after every try (a reverse proxy that
        does not forward the path, a timeout), is taken for an API: the check must never
        be what halts a run.
        """
        async with self._url_lock:
            if self._wrong_url is not None:
                raise self._wrong_url
            if self._url_checked:
                return
            try:
                answer = await self._paced(self._client.validate, validate=True)
            except SendError as exc:
                log.warning("preflight.url_unchecked", error=exc.code, message=exc.message,
                            action="taken for an API; the 404 refuses the token")  # fmt: skip
            else:
                if answer.http_status == 404:
                    url = urlsplit(self._client.api_url)  # never user-info: may hold secrets
                    origin = f"{url.scheme}://{url.netloc.rpartition('@')[2]}"
                    then = ("nothing was sent: run the dry run again once it points at the API"
                            if self._plan else "nothing was recorded as failed: run the same "
                            "command again with --resume")  # fmt: skip
                    self._wrong_url = WrongUrl(
                        f"{origin} answers 404 to every dashboard and to GET "
                        "/api/v1/validate: no Datadog API there. Check --api-url (the base "
                        f"URL only, e.g. https://api.datadoghq.com) or --site; {then}"
                    )
                    raise self._wrong_url
            self._url_checked = True

    def answered(self) -> None:
        """Something other than a 404 came back (a listing): the base URL serves the API."""
        self._url_checked = True

    def unreadable(self, error: AuthError) -> None:
        """The key cannot read dashboards: no allow-list check from now on, said once."""
        if self.readable:
            self.readable = False
            if self._refused is not None:
                self._refused()
            log.warning("preflight.unavailable", error=error.message,
                        consequence="sending without checking who is allowed (who was "
                        "invited is still listed): give the application key "
                        "dashboards_read")  # fmt: skip


def sharing_refusal(share_type: object, status: object) -> Failure | None:
    """Why nobody is sent to a dashboard shared so (None: they may be): invitations are
    for invite-only sharing, and not while it is paused. ``--prune`` adds nobody back to
    such a dashboard either."""
    if share_type is not None and share_type != "invite":
        return Failure(NOT_INVITE_ONLY, f"the shared dashboard is shared as {share_type!r}; "
                       "invitations are for invite-only sharing (share_type 'invite')")  # fmt: skip
    if status == "paused":
        return Failure(DASHBOARD_PAUSED, "the shared dashboard is paused; resume sharing it, "
                       "then run again")  # fmt: skip
    return None
