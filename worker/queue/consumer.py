"""Stream mode: drain a Redis Stream through a consumer group.

Messages are validated and batched per token as rows from a file are, with ``--linger``
so a trickle still flows. A message is acknowledged only once its outcome is written and
``fdatasync``\\ ed in the report. Messages that failed for good are copied to the
dead-letter stream with the error; those refused for lack of permission or whose outcome
could not be settled stay pending, to be delivered again. Messages claimed back from
another worker are screened first (:mod:`worker.queue.reclaim`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable

import structlog
from redis.exceptions import RedisError

from worker.batching import Batch, Batcher
from worker.clock import Clock
from worker.config import Config
from worker.outcome import Outcome
from worker.queue.deliveries import HeldDeliveries
from worker.queue.messages import MessageIndex, RecentlySettled, parse_message, unset_record
from worker.queue.options import StreamOptions
from worker.queue.reclaim import screen_reclaimed
from worker.queue.settling import Settling
from worker.queue.stream import Message, StreamQueue, hold_period
from worker.queue.text import escaped, is_text
from worker.record.report import Report
from worker.run.counts import QueueCounts
from worker.send.sender import Sender
from worker.validate import REASONS, Reason, Validator
from worker.validate.dedupe import PairIndex

#: Message ids settled here that are remembered, so a claim racing with their
#: acknowledgement does not take them for new work (see ``Consumer._take``).
RECENTLY_SETTLED = 100_000

log = structlog.get_logger("worker.queue")


class Consumer(Settling):
    """Reads, claims, batches and settles; the senders do the HTTP side."""

    def __init__(
        self,
        config: Config,
        options: StreamOptions,
        queue: StreamQueue,
        report: Report,
        sender: Sender,
        index: MessageIndex,
        clock: Clock,
    ) -> None:
        self.config, self.options, self.queue = config, options, queue
        self.report, self.sender, self.index = report, sender, index
        self.clock, self.state, self.stop = clock, sender.state, sender.state.stop
        self.validator = Validator()
        self.batcher = Batcher(config.batch_size, config.max_buffered_rows, clock.time)
        self.acks: list[str] = []
        self.dead: list[tuple[str, dict[str, str]]] = []
        self.counts = QueueCounts()
        self.settled = RecentlySettled(RECENTLY_SETTLED)
        #: Deliveries this run added to the messages it holds: given back if the run ends
        #: for a reason that is not the messages' (see :mod:`worker.queue.deliveries`).
        self.held = HeldDeliveries()
        #: Messages being acknowledged or dead-lettered right now (by a flush).
        self.settling: set[str] = set()
        #: Records an outcome (the runner's): set before :meth:`batches` is iterated.
        self.record: Callable[[Outcome], None] = unset_record
        #: Tokens whose dashboard answered 404, and when. The sender refuses such a token
        #: from then on; a worker that runs for days asks again once the dashboard check
        #: has aged (``preflight_ttl``): the dashboard may have been shared since.
        self.gone: dict[str, float] = {}
        self._gone_swept = clock.time()
        self.holds_period = hold_period(clock.time())
        #: Whether --until-empty said it waits for messages other consumers hold.
        self.told_pending = False

    async def batches(self) -> AsyncGenerator[Batch, None]:
        """Batches to send, until stopped or, with ``--until-empty``, the group is drained.

        Settled messages are acknowledged meanwhile by :meth:`flush_until`, which the
        runner runs beside. Redis failing for good ends the iteration with the failure its
        error means (see :mod:`worker.queue.failures`).
        """
        try:
            async for batch in self._consume():
                yield batch
        except RedisError as exc:
            raise await self.queue.failure(exc) from None

    async def _consume(self) -> AsyncIterator[Batch]:
        for batch in await self._take(await self.queue.read_own_pending(), reclaimed=True):
            yield batch
        next_claim = 0.0
        while not self.stop.is_set():
            if self.clock.time() >= next_claim:
                claimed = await self.queue.claim_idle(self.options.claim_idle)
                for batch in await self._take(claimed, reclaimed=True, claimed=True):
                    yield batch
                next_claim = self.clock.time() + min(max(self.options.claim_idle / 2, 0.5), 30)
            block = min(self.config.linger or 0.5, 0.5)
            messages = await self.queue.read_new(self.options.read_count, block)
            for batch in await self._take(messages, reclaimed=False):
                yield batch
            # Partial batches go after --linger only once the stream is caught up: while a
            # backlog is read, waiting costs nothing and fills them, and half-full requests
            # would spend the rate limit's budget (and CPU) on half the emails.
            if len(messages) < self.options.read_count:
                for batch in self.batcher.expired(self.config.linger):
                    yield batch
            if self.options.until_empty and not messages and await self._drained():
                break
        if not self.stop.is_set():
            for batch in self.batcher.drain():
                yield batch

    async def _drained(self) -> bool:
        # Every valid message is in the index until its outcome is recorded, so an empty
        # index means nothing is buffered, queued or being sent.
        if self.batcher.buffered or self.index:
            return False
        await self.flush()
        pending = await self.queue.group_pending()
        if pending and not self.told_pending:  # said once: a wait of --claim-idle is silent
            self.told_pending = True
            log.info("queue.pending_elsewhere", messages=pending,
                     claim_idle=self.options.claim_idle, action="other consumers hold "
                     "these: --until-empty ends once they are settled, and claims those "
                     "left idle for --claim-idle (a worker that was killed)")  # fmt: skip
        return pending == 0

    async def _take(
        self, messages: list[Message], *, reclaimed: bool, claimed: bool = False
    ) -> list[Batch]:
        """Validate, reconcile (for reclaimed messages) and batch a set of messages
        (``claimed``: from other consumers, counted once each in the summary)."""
        # Only a claimed message can be one of ours still in flight (claimed back because it
        # was slow); new messages cannot, so skip building the set for them.
        in_flight = set(self.index.values()) if reclaimed else set()
        fresh: list[tuple[str, str, str]] = []
        append = fresh.append
        recheck: set[str] = set()  # tokens to check afresh
        trimmed = 0
        for mid, fields in messages:
            if reclaimed and (mid in in_flight or mid in self.settled):
                # Ours: still being sent, or settled with its acknowledgement under way;
                # claimed back only because it took longer than --claim-idle.
                self.held.claimed_again(mid)
                continue
            self.counts.claimed += claimed  # not this worker's own, claimed back
            self.held.taken(mid)
            self.counts.rows += 1
            if fields is None:  # deleted from the stream meanwhile: its pair is gone
                self.report.rejected(mid, Reason.MESSAGE_TRIMMED)
                self.acknowledge([mid])
                trimmed += 1
                continue
            if not all(map(is_text, fields)):  # bytes another producer wrote, not UTF-8
                named = dict(zip(fields[::2], fields[1::2], strict=True))
                token, email = (named.get(name) for name in ("token", "email"))
                self.report.rejected(mid, Reason.BAD_ENCODING, token and escaped(token),
                                     email and escaped(email))  # fmt: skip
                self.acknowledge([mid])
                continue
            if len(fields) == 4 and fields[0] == "token" and fields[2] == "email":
                append((mid, fields[1].strip(), fields[3].strip()))  # as enqueue writes it
                continue
            named = dict(zip(fields[::2], fields[1::2], strict=True))
            token, email, reason = parse_message(named)
            if reason is None:
                append((mid, (token or "").strip(), (email or "").strip()))
                if "requeued_from" in named:  # put back once its cause was fixed
                    recheck.add((token or "").strip())
                continue
            self.report.rejected(mid, reason, token, email)
            self.acknowledge([mid])
        if trimmed:
            log.warning("queue.message_trimmed", messages=trimmed, error=REASONS[
                Reason.MESSAGE_TRIMMED], action="recorded rejected; keep the stream longer "
                "than its backlog: trim with MAXLEN above the pending count, or MINID below "
                "the oldest pending id")  # fmt: skip
        if self.gone:
            recheck.update(self._aged_gone({token for _, token, _ in fresh}))
        for token in recheck:  # what this worker learnt of the token may be what was fixed
            self.sender.forget(token)
        if reclaimed and fresh:
            fresh = await screen_reclaimed(self, fresh)
        # Repeats are dropped within this read only. Across reads (and workers) Redis's hold
        # on the pair is the check: it lets go of a dead-lettered pair, so a requeued message
        # is sent, and a pair kept here for the worker's life would grow with it.
        self.validator.seen = PairIndex()
        # Checked as one chunk (a read's worth); each row not rejected is one valid pair,
        # in order, so the message ids line up with the pairs again.
        valid, rejections, _ = self.validator.check_rows([(m, t, e, None) for m, t, e in fresh])
        for where, why, bad_token, bad_email in rejections:
            self.report.rejected(where, why, bad_token, bad_email)
            self.acknowledge([str(where)])
        refused = {where for where, _, _, _ in rejections}
        kept = [mid for mid, _, _ in fresh if mid not in refused] if refused else [
            mid for mid, _, _ in fresh]  # fmt: skip
        if kept and (taken := await self.queue.hold_pairs(kept, valid, self.clock.time())):
            # The same pair from another message, which another worker holds: not twice.
            held: list[tuple[str, tuple[str, str]]] = []
            for mid, pair in zip(kept, valid, strict=True):
                if mid in taken:
                    self.report.rejected(mid, Reason.DUPLICATE, *pair)
                    self.acknowledge([mid])
                else:
                    held.append((mid, pair))
            kept, valid = [mid for mid, _ in held], [pair for _, pair in held]
        self.counts.valid += len(valid)
        self.index.add_pairs(valid, kept)
        full = self.batcher.add_many(valid)
        self.report.flush()
        return full

    def _aged_gone(self, tokens: set[str]) -> list[str]:
        """Of ``tokens``, those that answered 404 longer ago than a dashboard check lasts;
        once per check's life, every such token, whether it came again or not: a worker
        that runs for days meets many deleted dashboards, and keeps none past its check."""
        now, ttl = self.clock.time(), self.config.preflight_ttl or 0.0
        if now - self._gone_swept > ttl:
            self._gone_swept = now
            tokens = set(self.gone)
        aged = [token for token in tokens.intersection(self.gone) if now - self.gone[token] > ttl]
        for token in aged:
            del self.gone[token]
        return aged
