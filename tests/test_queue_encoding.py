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
    """Valid messages around four that are not UTF-8 (an email, a payload, a field name,
    an email given twice); the ids of those four."""
    await redis.xadd(stream, {"token": TOKEN_A, "email": "before@example.com"})
    bad = {
        "email": await redis.xadd(stream, {"token": TOKEN_A, "email": b"caf\xe9@example.com"}),
        "payload": await redis.xadd(stream, {"payload": b'{"token": "t", "email": "\xff"}'}),
        "name": await redis.xadd(stream, {b"tok\xffen": TOKEN_A, "email": "n@example.com"}),
        # A name given twice: a claim must not keep only the last, as a dict would.
        "repeated": await redis.execute_command(  # type: ignore[no-untyped-call]
            "XADD", stream, "*", "token", TOKEN_A, "email", b"\xff", "email", "r@example.com"
        ),
    }  # fmt: skip
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
    """``dead-letter list`` shows a dead letter whose bytes are not UTF-8 (an address, a
    code, a field's name) with those bytes escaped, even to a strict terminal (no
    traceback), and ``requeue`` moves it back byte for byte."""
    dead = f"{stream_name}:dead"
    mid = await redis.xadd(dead, {"token": TOKEN_A, "email": b"\xff@example.com",
                                  "error_code": b"server\xfferror", b"n\xffte": "x"})  # fmt: skip

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *worker_command("dead-letter", *args), cwd=ROOT,
            env={**worker_env(), "PYTHONIOENCODING": "utf-8:strict"},  # a strict terminal
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await cli("list", redis_server, "--stream", stream_name, "--json")
    assert code == 0, err
    assert "Traceback" not in err
    shown = json.loads(out)
    assert (shown["email"], shown["error_code"], shown["n\\xffte"]) == (
        "\\xff@example.com",
        "server\\xfferror",
        "x",
    )
    code, out, err = await cli("list", redis_server, "--stream", stream_name)
    assert code == 0, err
    assert "server\\xfferror" in out
    assert "\\xff@example.com" in out
    assert out.splitlines()[-1].endswith(": server\\xfferror 1")
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


async def test_a_name_given_not_utf8_is_refused_before_anything_is_read(
    redis_server: str, redis: Redis, stream_name: str
) -> None:
    """A --consumer (or --stream, --group) holding bytes that are not UTF-8 is exit 2, one
    line, before the stream is read: the run's summary could not be written after sends."""
    await redis.xadd(stream_name, {"token": TOKEN_A, "email": "a@example.com"})
    for option, value in (("--consumer", "w\udcff"), ("--group", "g\udcff")):
        proc = await asyncio.create_subprocess_exec(
            *worker_command("run", redis_server, "--stream", stream_name, "--until-empty",
                            "--sandbox", option, value, "--log-format", "console"),
            env=worker_env(), cwd=ROOT,  # (the argument goes out as the byte 0xff)
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, err.decode()
        assert f"{option} " in err.decode()
        assert "not UTF-8" in err.decode()
    assert await redis.xinfo_groups(stream_name) == []  # nothing read, no group made
