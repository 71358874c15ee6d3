"""How a run stands: going on, stopping (a signal), halted (a fault) or aborted (refused keys).

The :class:`~worker.run.runner.Runner` owns one :class:`RunState` per run and is the one
place that turns a failure of any of its tasks into a halt. The parts that send and read
only look at it (is the run stopping? were the keys refused?) and tell it when the service
refuses the keys; each way a run ends is set here, once.
"""

from __future__ import annotations

import asyncio

import structlog

from worker.clock import Clock, sleep_unless
from worker.errors import AuthError, FatalError, InternalError

log = structlog.get_logger("worker.run")


class RunState:
    """Stop, halt and abort of one run.

    ``stop_on_abort``: refused keys also stop the run (a queue worker: what it has not
    settled stays pending, and reading more would only meet the same refusal). A file run
    instead records every remaining batch ``failed`` (``aborted``) without a request.
    """

    def __init__(self, stop: asyncio.Event | None = None, *, stop_on_abort: bool = False) -> None:
        #: Set by a signal, a halt, or (``stop_on_abort``) an abort: nothing more is read,
        #: requests in flight get ``--grace`` seconds.
        self.stop = stop or asyncio.Event()
        self.stop_on_abort = stop_on_abort
        #: The first fault that halted the run.
        self.fatal: FatalError | None = None
        #: The first 401/403: every later request is refused without being made.
        self.abort_error: AuthError | None = None

    @property
    def aborted(self) -> bool:
        """True once the service refused the keys; nothing more is sent."""
        return self.abort_error is not None

    @property
    def interrupted(self) -> bool:
        """Stopped by a signal (not by a fault, nor by refused keys)."""
        return self.stop.is_set() and self.fatal is None and self.abort_error is None

    def halt(self, error: BaseException, role: str = "run") -> None:
        """Stop the run for ``error``; anything but a :class:`FatalError` is a bug in ``role``.

        Nothing more is sent; requests in flight get the grace period; the run exits 3.
        """
        fatal = error if isinstance(error, FatalError) else InternalError(role, error)
        if self.fatal is None:
            self.fatal = fatal
            if isinstance(fatal, InternalError):
                log.error("run.halted", code=fatal.code, role=role, error=str(fatal),
                          exc_info=error)  # fmt: skip
            else:
                log.error("run.halted", code=fatal.code, error=str(fatal))
        self.stop.set()

    def abort(self, error: AuthError) -> None:
        """The service refused the keys: no request is made from here on."""
        if self.abort_error is None:
            self.abort_error = error
            log.error("run.aborting", reason=error.code, http_status=error.http_status,
                      error=error.message)  # fmt: skip
        if self.stop_on_abort:
            self.stop.set()

    async def sleep(self, clock: Clock, seconds: float) -> bool:
        """Wait ``seconds`` unless the run stops first; True if the wait ran its course."""
        return await sleep_unless(clock, seconds, self.stop)
