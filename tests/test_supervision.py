"""One supervisor: whatever a task of a run raises halts it (exit 3), in bounded time."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from tests.conftest import (
    TOKEN_A,
    TOKEN_B,
    by_kind,
    csv_source,
    find_capture,
    read_report,
    rows_csv,
)
from worker.batching import Batch
from worker.config import Config
from worker.emulator import Emulator
from worker.outcome import Outcome
from worker.queue.options import StreamOptions
from worker.queue.runner import run_stream
from worker.queue.stream import StreamQueue
from worker.run import assembly
from worker.run import run as run_file
from worker.send.sender import Sender
from worker.sources import RawRow, Source

PAIRS = [(t, f"p{i}@example.com") for i in range(60) for t in (TOKEN_A, TOKEN_B)]


class BuggySender(Sender):
    """A sender with a bug that strikes on its third batch, after two went out."""

    calls = 0

    async def send(self, batch: Batch, out: list[Outcome] | None = None) -> list[Outcome]:
        BuggySender.calls += 1
        if BuggySender.calls > 2:
            raise RuntimeError("injected bug in the sender")
        return await super().send(batch, out)


async def test_a_sender_that_raises_halts_the_run_and_resume_sends_the_rest_once(
    emulator: Emulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in every sender ends the run: halted (internal_error), exit 3, within seconds;
    the reader does not wait on a full queue forever, and --resume invites the rest once."""
    BuggySender.calls = 0
    monkeypatch.setattr(assembly, "Sender", BuggySender)
    config = make_config(batch_size=5, concurrency=2)
    with capture_logs() as logs:
        result = await asyncio.wait_for(run_file(config, csv_source(rows_csv(PAIRS))), 20)
    assert result.exit_code == 3
    halted = result.summary.halted
    assert halted is not None
    assert halted.code == "internal_error"
    assert "RuntimeError" in halted.message
    assert "injected bug" in halted.message
    assert find_capture(logs, "run.halted")[0]["role"] == "sender"
    sent = sum(len(b["emails"]) for b in by_kind(read_report(config.report_path), "batch"))
    assert sent == 10  # the two batches sent before the bug
    assert result.summary.unsent == len(PAIRS) - 10
    monkeypatch.setattr(assembly, "Sender", Sender)
    again = await run_file(dataclasses.replace(config, resume=True),
                           csv_source(rows_csv(PAIRS)))  # fmt: skip
    assert again.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(PAIRS, 1))


class BrokenSource(Source):
    """A source whose reading raises something unexpected after its first chunk."""

    description = "broken"

    async def chunks(self) -> AsyncIterator[Sequence[RawRow]]:
        yield [(i + 2, t, e, None) for i, (t, e) in enumerate(PAIRS[:20])]
        raise ValueError("injected bug in the reader")

    def close(self) -> None:
        pass


async def test_a_reader_that_raises_halts_the_run_instead_of_crashing(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A bug while reading: what was read is sent, the run halts with exit 3, no traceback
    escapes, and nobody is invited twice."""
    config = make_config(batch_size=5, concurrency=2)
    result = await asyncio.wait_for(run_file(config, BrokenSource()), 20)
    assert result.exit_code == 3
    halted = result.summary.halted
    assert halted is not None
    assert halted.code == "internal_error"
    assert "injected bug in the reader" in halted.message
    assert max(emulator.invited.values(), default=0) <= 1
    assert set(emulator.invited) <= set(PAIRS[:20])


async def test_a_queue_flusher_that_raises_halts_the_worker_leaving_messages_pending(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the queue's flusher ends the worker (exit 3) instead of leaving it alive and
    silent; what it did not acknowledge stays pending, and a second worker sends only that."""
    async with redis.pipeline(transaction=False) as pipe:
        for token, email in PAIRS:
            pipe.xadd(stream_name, {"token": token, "email": email})
        await pipe.execute()
    opts = StreamOptions(url=redis_server, stream=stream_name, until_empty=True,
                         claim_idle=0.5, consumer="w1")  # fmt: skip
    real_settle: Any = StreamQueue.settle

    async def broken_settle(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected bug in the flusher")

    monkeypatch.setattr(StreamQueue, "settle", broken_settle)
    first = make_config(batch_size=5, report_path=Path(str(make_config().report_path) + ".1"))
    result = await asyncio.wait_for(run_stream(first, opts), 20)
    assert result.exit_code == 3
    halted = result.summary.halted
    assert halted is not None
    assert halted.code == "internal_error"
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == len(PAIRS)
    monkeypatch.setattr(StreamQueue, "settle", real_settle)
    second = make_config(batch_size=5, report_path=Path(str(make_config().report_path) + ".2"))
    done = await asyncio.wait_for(run_stream(second, dataclasses.replace(opts, consumer="w2")),
                                  60)  # fmt: skip
    assert done.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(PAIRS, 1))
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0
