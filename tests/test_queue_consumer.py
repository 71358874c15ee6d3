"""The queue consumer's own state: what it remembers between reads, and its report writes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from redis.asyncio import Redis

from tests.conftest import (
    ROOT,
    TOKEN_A,
    Proc,
    by_kind,
    read_report,
    worker_command,
    worker_env,
)
from worker.clock import SystemClock
from worker.config import Config
from worker.emulator import Emulator
from worker.queue.consumer import Consumer
from worker.queue.messages import MessageIndex
from worker.queue.options import StreamOptions
from worker.queue.runner import run_stream
from worker.queue.stream import StreamQueue, enqueue_rows
from worker.record.journal import Journal
from worker.record.report import Report
from worker.send import client_for, pacer_for
from worker.send.sender import Sender
from worker.validate import Reason

#: A token the emulator has no dashboard for (404) until the test registers one.
GONE = "gone-dashboard-0123456789abcdef0123456789abcdef"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``invite-worker ARGS`` as a separate process (no keys needed)."""
    return subprocess.run(worker_command(*args), env=worker_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


async def until(check: Callable[[], object], what: str, proc: Proc) -> None:
    """Poll ``check`` (a test on loopback state) for up to 15 s; fail naming ``what``."""
    deadline = time.monotonic() + 15
    while not check():
        assert proc.popen.poll() is None, f"the worker exited; stderr:\n{proc.stderr()}"
        assert time.monotonic() < deadline, f"{what} never happened; stderr:\n{proc.stderr()}"
        await asyncio.sleep(0.05)


async def test_the_running_worker_sends_messages_requeued_from_its_dead_letters(
    tmp_path: Path,
    emulator: Emulator,
    redis_server: str,
    redis: Redis,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """Two messages for a dashboard that 404s are dead-lettered; once it exists, `dead-letter
    requeue --all` puts them back and the SAME worker, still running, sends each once."""
    pairs = [(GONE, "ann@example.com"), (GONE, "bob@example.com")]
    await enqueue_rows(redis, stream_name, [*pairs, (TOKEN_A, "cy@example.com")])
    report = tmp_path / "worker.jsonl"
    worker = spawn("run", redis_server, "--stream", stream_name, "--api-url", emulator.url,
                   "--report", str(report), "--linger", "0.05", "--log-format", "json")  # fmt: skip
    dead = f"{stream_name}:dead"
    deadline = time.monotonic() + 15
    while await redis.xlen(dead) < 2:
        assert worker.popen.poll() is None, worker.stderr()
        assert time.monotonic() < deadline, f"nothing dead-lettered; stderr:\n{worker.stderr()}"
        await asyncio.sleep(0.05)
    await until(lambda: emulator.invited[(TOKEN_A, "cy@example.com")] == 1, "cy's invite", worker)

    emulator.add_dashboard(GONE)  # the cause, fixed
    moved = await asyncio.to_thread(cli, "dead-letter", "requeue", redis_server, "--stream",
                                    stream_name, "--all")  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["requeued"] == 2
    await until(lambda: all(emulator.invited[p] for p in pairs), "the requeued invites", worker)

    worker.popen.send_signal(signal.SIGTERM)
    await asyncio.to_thread(worker.expect, 3, 30)  # 3: stopped by a signal, as every run
    assert {p: emulator.invited[p] for p in pairs} == dict.fromkeys(pairs, 1)
    records = read_report(report)
    assert not [r for r in by_kind(records, "rejected") if r["reason"] == "duplicate"]
    sent = {(b["token"], e) for b in by_kind(records, "batch") if b["status"] == "sent"
            for e in b["emails"]}  # fmt: skip
    assert set(pairs) <= sent
    assert await redis.xlen(dead) == 0
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0
    assert "Traceback" not in worker.stderr()


async def test_report_records_written_while_the_consumer_makes_it_durable_are_all_kept(
    tmp_path: Path,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """With a thread switch forced every microsecond, records added on the loop while the
    consumer syncs the report (its flush) are all written: none is lost between threads."""
    config = make_config()
    options = StreamOptions(url=redis_server, stream=stream_name)
    queue = StreamQueue(redis, stream_name, options.group, "c1", options.dead_letter)
    await queue.ensure_group()
    report = Report(config.report_path)
    index, clock = MessageIndex(), SystemClock()
    records = 200_000
    async with client_for(config) as client:
        journal = Journal(tmp_path / "unused.journal")  # nothing is sent here
        sender = Sender(client, pacer_for(config, clock), journal, config, clock)
        consumer = Consumer(config, options, queue, report, sender, index, clock)
        writing, flushes = True, 0

        async def flush_while_writing() -> None:
            nonlocal flushes
            while writing:
                consumer.acks.append("0-1")  # an id never delivered: acknowledging it is a no-op
                await consumer.flush()
                flushes += 1

        before = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            flusher = asyncio.create_task(flush_while_writing())
            i = 0
            # At least `records`, and on until the syncs overlapped the writing (a loaded
            # machine syncs slowly), within a bound.
            while i < records or (flushes <= 10 and i < 10 * records):
                report.rejected(f"{i}-1", Reason.INVALID_EMAIL, "tok", f"bad{i}")
                i += 1
                if i % 50 == 0:
                    await asyncio.sleep(0)
            records = i
            writing = False
            await flusher
        finally:
            sys.setswitchinterval(before)
        consumer.acks.append("0-1")
        await consumer.flush()
    report.close()
    journal.close()
    assert flushes > 10  # the syncs did overlap the writing
    assert sender.state.fatal is None
    written = [r["stream_id"] for r in by_kind(read_report(config.report_path), "rejected")]
    assert len(written) == records
    assert len(set(written)) == records


async def test_a_dashboard_shared_after_a_404_gets_the_messages_that_come_later(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """A worker that runs on: a token that answered 404 is asked again once the dashboard
    check has aged, so a message for it that arrives after the dashboard was shared is
    sent, not refused for the rest of the worker's life."""
    stop = asyncio.Event()
    options = StreamOptions(url=redis_server, stream=stream_name)
    await enqueue_rows(redis, stream_name, [(GONE, "ann@example.com")])
    run = asyncio.create_task(run_stream(make_config(preflight_ttl=0.3), options, stop=stop))
    try:
        for _ in range(300):
            if await redis.xlen(options.dead_letter):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("ann's message was never dead-lettered")
        emulator.add_dashboard(GONE)  # shared since
        await asyncio.sleep(0.4)
        await enqueue_rows(redis, stream_name, [(GONE, "bob@example.com")])
        async with asyncio.timeout(15):
            await emulator.wait_for_invitations(1)  # ann was never invited: this is bob
    finally:
        stop.set()
        result = await run
    assert result.summary.emails_sent == 1
    assert emulator.invited[(GONE, "bob@example.com")] == 1
    assert await redis.xlen(options.dead_letter) == 1  # ann's, from before
