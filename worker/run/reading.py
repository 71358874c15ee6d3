"""Reading a file run's input: source -> validation -> batching.

:func:`read_batches` is the input's async iterator of batches; rejected rows go to a sink.
A run sends the batches (:mod:`worker.run.files`), a dry run plans them
(:mod:`worker.run.plan`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from operator import itemgetter

from worker.batching import Batch, Batcher, lingered
from worker.config import Config
from worker.record.records import rejected_row
from worker.run.counts import FileCounts
from worker.run.prune import ListedInput
from worker.run.resume import History
from worker.sources import RawRow, Source
from worker.validate import Validator
from worker.validate.dedupe import PairIndex

#: Where a rejected row goes: (line or stream id, reason, token, email).
RejectSink = Callable[[int | str, str, str | None, str | None], None]


_TOKEN = itemgetter(0)


async def read_batches(
    config: Config,
    source: Source,
    reject: RejectSink,
    counts: FileCounts,
    history: History | None = None,
    stop: asyncio.Event | None = None,
    listed: ListedInput | None = None,
    whole: bool = False,
    named: Callable[[PairIndex], object] | None = None,
) -> AsyncGenerator[Batch, None]:
    """Read, validate and batch ``source``: the batches to send; rejections to ``reject``.

    Updates ``counts`` as it goes; on ``--resume`` skips settled pairs and does not record
    rows an earlier run recorded as rejected again (they are counted all the same).
    ``listed`` (``--prune``) learns what the list names. From a pipe, a FIFO or a
    terminal, partial batches go out after ``--linger`` (see
    :func:`~worker.batching.lingered`), unless ``whole`` (a plan: nothing is sent, the
    list is planned as a whole).
    """
    validator = Validator()
    if listed is not None:
        listed.index = validator.seen
    if named is not None:  # every valid pair the list names, as it is read
        named(validator.seen)
    linger = config.linger if source.may_wait and not whole else None
    batcher = Batcher(config.batch_size, config.max_buffered_rows,
                      time.monotonic if linger is not None else None)  # fmt: skip
    known_rejected = history.rejected_rows if history is not None else set()
    settled = history.settled if history is not None else None
    tokens: set[str] = set()
    chunks = source.chunks()
    ahead: asyncio.Future[Sequence[RawRow] | None] | None = None

    def known_total(read: asyncio.Future[Sequence[RawRow] | None]) -> None:
        if not read.cancelled() and read.exception() is None and read.result() is None:
            counts.read_all = True  # the last chunk is counted: the total is known

    try:
        chunk = await anext(chunks, None)
        while chunk is not None:
            valid, rejections, skipped = validator.check_rows(chunk, settled)
            if history is not None and (ours := history.take_settled_now()):
                # Settled as this run began (an earlier run's open intent): this run's.
                skipped -= len(ours)
                counts.valid += len(ours)
                counts.settled_first += len(ours)
                tokens.update(ours)
            counts.rows += len(chunk)
            counts.valid += len(valid)
            tokens.update(map(_TOKEN, valid))  # read, whether or not a batch of it went out
            counts.skipped += skipped
            if listed is not None:
                listed.chunk(chunk, rejections)
            # The next chunk is read while this one's batches go out, so the total (and the
            # ETA) shows as soon as every row is read, and a pipe is never waited on early.
            ahead = asyncio.ensure_future(anext(chunks, None))
            ahead.add_done_callback(known_total)
            for line, reason, token, email in rejections:
                counts.rejected += 1
                counts.rejected_by_reason[str(reason)] += 1
                row = rejected_row(line, reason, token, email)
                if row not in known_rejected:
                    reject(line, reason, token, email)
                    if history is not None:  # the job's totals count it from here on
                        known_rejected.add(row)
            for batch in batcher.add_many(valid):
                yield batch
            if stop is not None and stop.is_set():
                return
            if linger is not None:
                async for batch in lingered(batcher, ahead, linger):
                    yield batch
            chunk = await ahead
        counts.read_all = True
        for batch in batcher.drain():
            yield batch
    finally:
        if ahead is not None and not ahead.done():
            ahead.cancel()
        counts.tokens = len(tokens)
