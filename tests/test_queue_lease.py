"""One live process per --consumer name: the name's lease, on a private redis-server.

Two processes under one name would each take the other's pending messages for their own
and invite people twice; a process that starts under the name of one killed without
letting go must still take up its messages.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from tests.conftest import (
    Proc,
    by_kind,
    each_invited_once_nothing_left,
    emulator_invited,
    read_report,
    redis_cli,
)
from tests.test_queue_deliveries import HELD_UP, side_by_side
from tests.test_queue_refusals import GOOD, worker
from tests.test_queue_restart import RedisProcess
from worker.errors import ConsumerTakenOver
from worker.queue import lease as lease_module
from worker.queue.connect import connect
from worker.queue.failures import RedisFailures
from worker.queue.lease import ConsumerInUse, ConsumerLease
from worker.queue.stream import StreamQueue, enqueue_rows, intent_value


async def a_lease(redis: Redis, stream: str, consumer: str = "c1") -> ConsumerLease:
    """The lease of ``consumer`` in a fresh process's queue (not taken yet)."""
    queue = StreamQueue(redis, stream, "invite-worker", consumer, f"{stream}:dead")
    await queue.ensure_group()
    return ConsumerLease(queue)


async def test_a_name_a_live_process_renews_is_refused_at_the_start(
    redis: Redis, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second process under a name whose holder keeps renewing it is refused (a usage
    error naming the name and the fix) as soon as a renewal shows the holder alive."""
    monkeypatch.setattr(lease_module, "RENEW_EVERY", 0.05)
    first, second = await a_lease(redis, stream_name), await a_lease(redis, stream_name)
    await first.take()
    finished = asyncio.Event()
    renewing = asyncio.create_task(first.keep(finished))
    try:
        with (
            capture_logs() as logs,
            pytest.raises(ConsumerInUse, match="--consumer 'c1'") as refused,
        ):
            await asyncio.wait_for(second.take(), 5)
    finally:
        finished.set()
        await renewing
    assert "its own --consumer name" in str(refused.value)
    assert logs == []  # refused, without first saying it waits
    assert first.token in (await redis.get(first.key) or "")  # still the first's


async def test_a_silent_holders_name_is_taken_once_its_lease_lapses(
    redis: Redis, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that stopped renewing (killed, stalled) keeps its name for the lease's
    time, then a process starting under it takes it; the old holder then records no
    intent (nothing it held is sent) and its renewal halts it."""
    monkeypatch.setattr(lease_module, "LEASE_TTL", 0.4)
    monkeypatch.setattr(lease_module, "RENEW_EVERY", 0.05)
    monkeypatch.setattr(lease_module, "POLL", 0.05)
    await enqueue_rows(redis, stream_name, [("t", "a@example.com")])
    old, new = await a_lease(redis, stream_name), await a_lease(redis, stream_name)
    await old.take()
    ids = [mid for mid, _ in await old._queue.read_new(1, 0.1)]
    started = time.monotonic()
    with capture_logs() as logs:
        await asyncio.wait_for(new.take(), 5)
    assert time.monotonic() - started >= 0.3
    assert [e["event"] for e in logs] == ["queue.consumer_waiting", "queue.consumer_taken_over"]
    with pytest.raises(ConsumerTakenOver, match="took over --consumer 'c1'"):
        await old._queue.record_intents(ids, intent_value(time.time(), 3.0))
    assert await redis.hlen(old._queue.intents_key) == 0
    with pytest.raises(ConsumerTakenOver):
        await old.keep(asyncio.Event())
    assert await new._queue.record_intents(ids, intent_value(time.time(), 3.0)) == (set(), set())
    assert await redis.hlen(new._queue.intents_key) == 1


async def test_a_silent_holder_whose_clock_ran_ahead_is_waited_for_no_longer_than_the_lease(
    redis: Redis, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder killed with its clock an hour ahead of this one's looks freshly renewed by
    this clock: its renewal, seen unchanged for the lease's time, is taken over all the
    same, not waited for an hour."""
    monkeypatch.setattr(lease_module, "LEASE_TTL", 0.4)
    lease = await a_lease(redis, stream_name)
    await redis.set(lease.key, f"{'f' * 32} {int((time.time() + 3600) * 1000)}")
    started = time.monotonic()
    await asyncio.wait_for(lease.take(), 5)
    assert 0.4 <= time.monotonic() - started < 2
    assert str(await redis.get(lease.key)).startswith(lease.token)


async def test_a_worker_whose_names_key_is_gone_halts_saying_so(
    redis: Redis, stream_name: str
) -> None:
    """The key gone (a stall past its hour, or Redis losing it while the group was made
    again): a takeover cannot be ruled out, so nothing is recorded, and the halt says the
    hold is gone rather than that another process took it."""
    lease = await a_lease(redis, stream_name)
    await lease.take()
    await redis.delete(lease.key)
    with pytest.raises(ConsumerTakenOver, match="is gone from Redis"):
        await lease._queue.record_intents(["1-1"], intent_value(time.time(), 3.0))
    assert await redis.hlen(lease._queue.intents_key) == 0


async def test_a_name_let_go_is_taken_at_once_and_a_stale_one_stays_its_holders(
    redis: Redis, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that ended lets go of its name: the next under it starts without waiting
    (and the first, were it still running, would find the name another's).
    A holder that could not renew for longer than the lease (Redis down), with nobody
    starting under its name meanwhile, still holds it: it renews and sends."""
    monkeypatch.setattr(lease_module, "LEASE_TTL", 0.2)
    monkeypatch.setattr(lease_module, "RENEW_EVERY", 0.01)
    first = await a_lease(redis, stream_name)
    await first.take()
    await asyncio.sleep(0.3)  # past the lease, unrenewed
    finished = asyncio.Event()
    renewing = asyncio.create_task(first.keep(finished))
    await asyncio.sleep(0.05)
    finished.set()
    await renewing  # renewed without a halt
    assert await first._queue.record_intents([], intent_value(time.time(), 3.0)) == (set(), set())
    await first.let_go()
    assert await redis.get(first.key) == f"{first.token} 0"  # free, still naming its holder
    second = await a_lease(redis, stream_name)
    with capture_logs() as logs:
        await asyncio.wait_for(second.take(), 1)
    assert logs == []
    with pytest.raises(ConsumerTakenOver):
        await first._queue.record_intents([], intent_value(time.time(), 3.0))


def test_a_second_process_under_a_running_workers_name_is_refused(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """Two processes under one --consumer: the second exits 2 within seconds, saying why
    and reading nothing; the first finishes, and everyone is invited once."""
    api, pairs, first, _ = side_by_side(spawn, tmp_path, start_emulator, redis_server,
                                        stream_name, 0.5)  # fmt: skip
    twin = worker(spawn, tmp_path, redis_server, stream_name, api, "first", *HELD_UP,
                  "--report", str(tmp_path / "twin.jsonl"), env=GOOD)  # fmt: skip
    twin.expect(2, timeout=20)
    assert "another live process is consuming stream" in twin.stderr()
    assert "Traceback" not in twin.stderr()
    assert read_report(tmp_path / "twin.jsonl") == []  # nothing read, nothing recorded
    first.expect(0, timeout=90)
    each_invited_once_nothing_left(api, pairs, redis_server, stream_name)


@pytest.mark.timeout(150)
def test_a_stalled_workers_name_is_taken_over_and_it_sends_nothing_more(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """A worker stopped (SIGSTOP) with messages read, another process started under its
    name: that one waits out the lease and takes the name; the stalled worker, continued
    while the other sends, sends nothing more and halts (exit 3, consumer_taken_over).
    The other finishes the stream: nobody invited twice, nothing left pending."""
    api, pairs, first, _ = side_by_side(spawn, tmp_path, start_emulator, redis_server,
                                        stream_name, 0.5)  # fmt: skip
    first.popen.send_signal(signal.SIGSTOP)
    try:
        before = sum(emulator_invited(api).values())
        started = time.monotonic()
        again = worker(spawn, tmp_path, redis_server, stream_name, api, "first", *HELD_UP,
                       "--report", str(tmp_path / "again.jsonl"), env=GOOD)  # fmt: skip
        while sum(emulator_invited(api).values()) == before:  # it took over, and sends
            assert again.popen.poll() is None, again.stderr()
            time.sleep(0.05)
        assert time.monotonic() - started >= lease_module.LEASE_TTL - 1
        assert "queue.consumer_waiting" in again.stderr(60_000)
    finally:
        first.popen.send_signal(signal.SIGCONT)
    first.expect(3, timeout=30)
    halted = by_kind(read_report(tmp_path / "first.jsonl"), "summary")[-1]["halted"]
    assert halted["code"] == "consumer_taken_over"
    again.expect(0, timeout=120)
    each_invited_once_nothing_left(api, pairs, redis_server, stream_name)


def test_an_empty_consumer_name_is_refused_before_redis_is_asked(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    """--consumer "" (an unset "$HOSTNAME") is exit 2 naming the fix: a default name, new
    at each start, would leave the worker's pending messages to wait --claim-idle."""
    refused = spawn("run", "redis://127.0.0.1:1/0", "--stream", "s", "--consumer", "",
                    "--report", str(tmp_path / "r.jsonl"))  # fmt: skip
    refused.expect(2, timeout=30)
    assert "--consumer is empty (an unset variable?)" in refused.stderr()


def test_until_empty_says_it_waits_for_messages_a_killed_consumer_holds(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """Messages pending for another consumer (read, never settled: a worker killed) keep
    --until-empty waiting for --claim-idle: it says so once (queue.pending_elsewhere),
    then claims them and sends each once."""
    api = start_emulator()
    pairs = {(f"dash-{i % 2}", f"held{i}@example.com") for i in range(6)}
    source = tmp_path / "in.csv"
    source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))
    spawn("enqueue", str(source), redis_server, "--stream", stream_name).expect(0, timeout=60)
    redis_cli(redis_server, "XGROUP", "CREATE", stream_name, "invite-worker", "0")
    redis_cli(redis_server, "XREADGROUP", "GROUP", "invite-worker", "killed", "STREAMS",
              stream_name, ">")  # fmt: skip
    drain = worker(spawn, tmp_path, redis_server, stream_name, api, "drain", "--until-empty",
                   "--claim-idle", "2", "--log-format", "json", env=GOOD)  # fmt: skip
    drain.expect(0, timeout=60)
    said = [line for line in drain.stderr(60_000).splitlines() if "pending_elsewhere" in line]
    assert len(said) == 1, said
    assert '"messages":6' in said[0]
    each_invited_once_nothing_left(api, pairs, redis_server, stream_name)


async def test_letting_go_of_a_name_waits_two_seconds_at_most_for_a_frozen_redis(
    tmp_path: Path,
) -> None:
    """A worker ending while Redis does not answer (a real redis-server, SIGSTOPped) lets
    go of its name within LET_GO_WAIT, not after the client's reconnections (the name,
    not let go, then frees itself after the lease)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server on PATH")
    server = RedisProcess(binary, tmp_path, keep_data=False)
    server.start()
    redis = await connect(server.url, server.url, lambda r: RedisFailures(
        r, server.url, "s", "invite-worker", "s:dead"))  # fmt: skip
    try:
        lease = await a_lease(redis, "s")
        await lease.take()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            await lease.let_go()
            assert time.monotonic() - started < lease_module.LET_GO_WAIT + 1
        finally:
            server.proc.send_signal(signal.SIGCONT)
    finally:
        await redis.aclose()
        server.kill()
