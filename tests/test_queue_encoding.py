"""Stream messages that are not valid UTF-8: another producer may write any bytes, and one
such message must not stop the group from reading the rest."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from tests.conftest import ROOT, TOKEN_A, by_kind, read_report, worker_command, worker_env
from tests.test_queue import options
from worker.config import Config
from worker.emulator import Emulator
from worker.queue.runner import run_stream


async def add_mixed(redis: Redis, stream: str) -> dict[str, str]:
    """Valid messages around three that are not UTF-8 (an email, a payload, a field
    name); the ids of those three."""
    await redis.xadd(stream, {"token": TOKEN_A, "email": "before@example.com"})
    bad = {
        "email": await redis.xadd(stream, {"token": TOKEN_A, "email": b"caf\xe9@example.com"}),
        "payload": await redis.xadd(stream, {"payload": b'{"token": "t", "email": "\xff"}'}),
        "name": await redis.xadd(stream, {b"tok\xffen": TOKEN_A, "email": "n@example.com"}),
    }
    await redis.xadd(stream, {"token": TOKEN_A, "email": "after@example.com"})
    return {name: str(mid) for name, mid in bad.items()}  # the client decodes replies


async def test_a_message_not_utf8_is_rejected_and_the_rest_are_sent(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """Messages whose bytes are not UTF-8 are rejected ``bad_encoding`` by stream id and
    acknowledged; the valid ones around them are sent once, and nothing stays pending."""
    bad = await add_mixed(redis, stream_name)
    config = make_config()
    result = await asyncio.wait_for(run_stream(config, options(redis_server, stream_name)), 60)
    rejected = {r["stream_id"]: r for r in by_kind(read_report(config.report_path), "rejected")}
    assert {mid: rejected[mid]["reason"] for mid in bad.values()} == dict.fromkeys(
        bad.values(), "bad_encoding"
    )
    assert rejected[bad["email"]]["email"] == "caf\\xe9@example.com"  # the bytes, escaped
    assert emulator.invited == Counter(
        {(TOKEN_A, "before@example.com"): 1, (TOKEN_A, "after@example.com"): 1}
    )
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0
    assert result.exit_code == 1  # rows were rejected


async def test_a_message_not_utf8_claimed_from_a_dead_worker_is_rejected(
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """The same messages left pending by a worker that died (claimed with XAUTOCLAIM)
    are rejected and sent alike, without a crash."""
    bad = await add_mixed(redis, stream_name)
    raw = Redis.from_url(redis_server)  # bytes: reads what the dead worker read
    try:
        await raw.xgroup_create(stream_name, "invite-worker", id="0")
        await raw.xreadgroup("invite-worker", "gone", {stream_name: ">"})
    finally:
        await raw.aclose()
    await asyncio.sleep(0.05)
    config = make_config()
    result = await asyncio.wait_for(
        run_stream(config, options(redis_server, stream_name, claim_idle=0.01)), 60
    )
    rejected = {r["stream_id"]: r["reason"] for r in by_kind(read_report(config.report_path),
                                                              "rejected")}  # fmt: skip
    assert {mid: rejected.get(mid) for mid in bad.values()} == dict.fromkeys(
        bad.values(), "bad_encoding"
    )
    assert emulator.invited == Counter(
        {(TOKEN_A, "before@example.com"): 1, (TOKEN_A, "after@example.com"): 1}
    )
    assert (await redis.xpending(stream_name, "invite-worker"))["pending"] == 0
    assert result.exit_code == 1


async def test_dead_letters_not_utf8_are_listed_escaped_and_requeued_as_they_are(
    tmp_path: Path, redis_server: str, redis: Redis, stream_name: str
) -> None:
    """``dead-letter list`` shows a dead letter whose bytes are not UTF-8 with those bytes
    escaped (no traceback), and ``requeue`` moves it back byte for byte."""
    dead = f"{stream_name}:dead"
    mid = await redis.xadd(dead, {"token": TOKEN_A, "email": b"\xff@example.com",
                                  "error_code": "server_error"})  # fmt: skip

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *worker_command("dead-letter", *args), env=worker_env(), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await cli("list", redis_server, "--stream", stream_name, "--json")
    assert code == 0, err
    assert "Traceback" not in err
    assert json.loads(out)["email"] == "\\xff@example.com"
    code, out, err = await cli("list", redis_server, "--stream", stream_name)
    assert code == 0, err
    assert "\\xff@example.com" in out
    code, out, err = await cli("requeue", redis_server, "--stream", stream_name, "--all")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["requeued"] == 1
    raw = Redis.from_url(redis_server)
    try:
        entries: Any = await raw.xrange(stream_name)
    finally:
        await raw.aclose()
    [(_, fields)] = entries
    assert fields[b"email"] == b"\xff@example.com"
    assert fields[b"requeued_from"] == str(mid).encode()
