"""``invite-worker dead-letter list|requeue`` against a real Redis server."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from tests.conftest import ROOT, TOKEN_A, worker_command, worker_env
from worker.config import Config
from worker.emulator import Emulator
from worker.emulator.dashboards import Dashboard
from worker.queue.deadletters import Selection, requeue
from worker.queue.options import StreamOptions
from worker.queue.runner import run_stream
from worker.queue.stream import enqueue_rows

PAUSED = "pausedpausedpau-0123456789abcdef0123456789abcdef"


def dead_letter(*args: str) -> subprocess.CompletedProcess[str]:
    """``invite-worker dead-letter ARGS`` as a separate process."""
    return subprocess.run(worker_command("dead-letter", *args), env=worker_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


async def entries(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """A stream's entries (the client decodes replies)."""
    reply: Any = await redis.xrange(key)
    return [(mid, fields) for mid, fields in reply]


def drain(redis_server: str, stream: str) -> StreamOptions:
    return StreamOptions(url=redis_server, stream=stream, until_empty=True)


async def test_dead_letters_are_listed_then_requeued_once_fixed_and_invited_once(
    tmp_path: Path,
    emulator: Emulator,
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
) -> None:
    """A paused dashboard's messages are dead-lettered; `list` shows them with their code;
    once the dashboard is active, `requeue --code` moves them back (a second requeue moves
    nothing) and the next worker invites each address exactly once."""
    emulator.seed([Dashboard(PAUSED, status="paused")])
    paused = [(PAUSED, f"p{i}@example.com") for i in range(7)]
    fine = [(TOKEN_A, f"a{i}@example.com") for i in range(5)]
    await enqueue_rows(redis, stream_name, paused + fine)
    first = await run_stream(make_config(report_path=tmp_path / "1.jsonl"),
                             drain(redis_server, stream_name))  # fmt: skip
    assert first.summary.read.dead_lettered == 7

    listed = await asyncio.to_thread(dead_letter, "list", redis_server, "--stream", stream_name)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 8
    assert all("dashboard_paused" in line and PAUSED in line for line in lines[:7])
    assert lines[-1] == f"7 dead letter(s) in {stream_name}:dead: dashboard_paused 7"
    as_json = await asyncio.to_thread(
        dead_letter, "list", redis_server, "--stream", stream_name, "--json"
    )
    letters = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {(d["token"], d["email"]) for d in letters} == set(paused)
    assert {d["error_code"] for d in letters} == {"dashboard_paused"}

    emulator.dashboards[PAUSED].status = "active"  # the cause, fixed
    moved = await asyncio.to_thread(dead_letter, "requeue", redis_server, "--stream",
                                    stream_name, "--code", "dashboard_paused")  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["requeued"] == 7
    again = await asyncio.to_thread(dead_letter, "requeue", redis_server, "--stream",
                                    stream_name, "--code", "dashboard_paused")  # fmt: skip
    assert json.loads(again.stdout)["requeued"] == 0
    assert await redis.xlen(f"{stream_name}:dead") == 0

    second = await run_stream(make_config(report_path=tmp_path / "2.jsonl"),
                              drain(redis_server, stream_name))  # fmt: skip
    assert second.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(paused + fine, 1))


async def test_requeues_racing_each_other_put_each_dead_letter_back_once(
    redis: Redis, stream_name: str
) -> None:
    """Two requeues at once (two operators, a retried job): every dead letter is moved
    by exactly one of them, so the stream gets each message once."""
    dead = f"{stream_name}:dead"
    for i in range(1200):  # more than one page
        await redis.xadd(dead, {"token": TOKEN_A, "email": f"r{i}@example.com",
                                "error_code": "server_error"})  # fmt: skip
    results = await asyncio.gather(
        *(requeue(redis, dead, stream_name, Selection()) for _ in range(2))
    )
    assert sum(r["requeued"] for r in results) == 1200
    emails = Counter(fields["email"] for _, fields in await entries(redis, stream_name))
    assert len(emails) == 1200
    assert set(emails.values()) == {1}
    assert await redis.xlen(dead) == 0


async def test_requeue_takes_only_what_is_chosen_and_leaves_what_it_cannot_send(
    redis: Redis, redis_server: str, stream_name: str
) -> None:
    """--id picks one dead letter; one without token and address stays where it is (exit
    1, counted as not_requeueable); a --dry-run moves nothing; no choice at all is exit 2."""
    dead = f"{stream_name}:dead"
    one = str(await redis.xadd(dead, {"token": TOKEN_A, "email": "one@example.com",
                                      "error_code": "bad_request"}))  # fmt: skip
    await redis.xadd(dead, {"token": TOKEN_A, "email": "two@example.com",
                            "error_code": "bad_request"})  # fmt: skip
    junk = str(await redis.xadd(dead, {"note": "by hand", "error_code": "bad_request"}))

    refused = await asyncio.to_thread(dead_letter, "requeue", redis_server, "--stream",
                                      stream_name)  # fmt: skip
    assert refused.returncode == 2
    assert "--code CODE, --id ID, or --all" in refused.stderr

    dry = await asyncio.to_thread(dead_letter, "requeue", redis_server, "--stream",
                                  stream_name, "--all", "--dry-run")  # fmt: skip
    assert json.loads(dry.stdout)["would_requeue"] == 2  # a dry run says "would"
    assert await redis.xlen(stream_name) == 0

    picked = await asyncio.to_thread(dead_letter, "requeue", redis_server, "--stream",
                                     stream_name, "--id", one, "--id", junk)  # fmt: skip
    assert picked.returncode == 1
    assert {"requeued": 1, "not_requeueable": 1}.items() <= json.loads(picked.stdout).items()
    moved = [(f["email"], f["requeued_from"]) for _, f in await entries(redis, stream_name)]
    assert moved == [("one@example.com", one)]
    assert await redis.xlen(dead) == 2  # "two" (not chosen) and the junk entry


async def test_a_dead_letter_with_an_empty_token_or_address_stays(
    redis: Redis, redis_server: str, stream_name: str
) -> None:
    """A message that lacked its token or address is dead-lettered with that field empty:
    such a dead letter is not_requeueable (exit 1) and stays, in the script as in the
    count, rather than going back to be rejected again."""
    dead = f"{stream_name}:dead"
    for token, email in (("", "a@example.com"), (TOKEN_A, ""), ("", "")):
        await redis.xadd(dead, {"token": token, "email": email, "error_code": "max_deliveries"})
    done = await asyncio.to_thread(dead_letter, "requeue", redis_server, "--stream",
                                   stream_name, "--all")  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert {"requeued": 0, "not_requeueable": 3}.items() <= json.loads(done.stdout).items()
    assert await redis.xlen(stream_name) == 0
    assert await redis.xlen(dead) == 3
    # The script itself refuses them too, whoever asks it to move them.
    ids = [mid for mid, _ in await entries(redis, dead)]
    assert await redis.eval(_requeue_script(), 2, dead, stream_name, *ids) == 0


def _requeue_script() -> str:
    from worker.queue import deadletters

    return deadletters._REQUEUE


async def test_a_mistyped_code_moves_nothing_and_says_which_was_meant(
    redis: Redis, redis_server: str, stream_name: str
) -> None:
    """A --code that no dead letter has but one close to it does ("sever_error") is a
    slip of the keyboard: exit 2 naming the code meant, nothing moved, even beside a code
    that matches. A code that is simply absent now moves nothing, exit 0, and says so
    (unmatched_codes, dead_letter.no_match)."""
    dead = f"{stream_name}:dead"
    for code in ("server_error", "server_error", "not_on_share_list"):
        await redis.xadd(dead, {"token": TOKEN_A, "email": f"{code}@example.com",
                                "error_code": code})  # fmt: skip
    for command in ("requeue", "list"):
        slip = await asyncio.to_thread(dead_letter, command, redis_server, "--stream",
                                       stream_name, "--code", "sever_error", "--code",
                                       "not_on_share_list")  # fmt: skip
        assert slip.returncode == 2, slip.stderr
        assert "--code 'sever_error': did you mean 'server_error'?" in slip.stderr
        assert "server_error 2, not_on_share_list 1" in slip.stderr
    assert await redis.xlen(dead) == 3
    assert await redis.exists(stream_name) == 0

    absent = await asyncio.to_thread(dead_letter, "requeue", redis_server, "--stream",
                                     stream_name, "--code", "timeout")  # fmt: skip
    assert absent.returncode == 0, absent.stderr
    assert json.loads(absent.stdout)["unmatched_codes"] == ["timeout"]
    assert json.loads(absent.stdout)["requeued"] == 0
    assert "dead_letter.no_match" in absent.stderr
    assert await redis.xlen(dead) == 3
