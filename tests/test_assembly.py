"""One assembly for both modes: a file run and a stream worker end through the same code,
with one typed summary whose record is what the report holds last."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import TOKEN_A, TOKEN_B, csv_source, read_report, rows_csv
from worker.config import Config, PruneMax
from worker.emulator import Emulator
from worker.queue.options import StreamOptions
from worker.queue.runner import run_stream
from worker.record.report import Report
from worker.run import assembly, run
from worker.run.counts import FileRead, QueueRead
from worker.run.summary import AnySummary, RunResult

PEOPLE = [f"p{i}@example.com" for i in range(12)]
#: The keys only one mode's summary record has.
FILE_ONLY = {"skipped", "tokens"}
QUEUE_ONLY = {"claimed", "dead_lettered", "group", "consumer"}


def stream_options(url: str, stream: str) -> StreamOptions:
    return StreamOptions(url=url, stream=stream, until_empty=True,
                         claim_idle=60.0, consumer="c1")  # fmt: skip


def finished(monkeypatch: pytest.MonkeyPatch) -> list[AnySummary]:
    """Every summary the assembly finishes a run with, from here on."""
    seen: list[AnySummary] = []
    original = assembly.finish

    def spy(report: Report, summary: Any, *, for_people: bool = False) -> RunResult[Any]:
        seen.append(summary)
        return original(report, summary, for_people=for_people)

    monkeypatch.setattr(assembly, "finish", spy)
    return seen


async def test_a_file_run_and_a_stream_worker_end_through_the_one_assembly(
    make_config: Callable[..., Config],
    redis_server: str,
    redis: Redis,
    stream_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Like rows from a file and from a stream (for another dashboard): both runs are
    finished by the one assembly, and their summary records have the same keys, in the
    same order, but for each mode's own (a file's skipped and tokens; a stream's claims,
    dead letters, group and consumer), and the same figures for what both did."""
    seen = finished(monkeypatch)
    rows = [*PEOPLE, "not-an-email"]
    from_file = await run(make_config(), csv_source(rows_csv([(TOKEN_A, e) for e in rows])))
    for email in rows:
        await redis.xadd(stream_name, {"token": TOKEN_B, "email": email})
    config = make_config(report_path=make_config().report_path.with_name("queue.jsonl"))
    from_stream = await run_stream(config, stream_options(redis_server, stream_name))
    assert [s.read for s in seen] == [from_file.summary.read, from_stream.summary.read]
    assert isinstance(from_file.summary.read, FileRead)
    assert isinstance(from_stream.summary.read, QueueRead)
    file_keys = [k for k in from_file.summary.record() if k not in FILE_ONLY]
    stream_keys = [k for k in from_stream.summary.record() if k not in QUEUE_ONLY]
    assert file_keys == stream_keys
    for key in ("rows", "valid", "rejected", "emails_sent", "exit_code", "requests_by_kind"):
        assert from_file.summary.record()[key] == from_stream.summary.record()[key], key
    assert (from_file.exit_code, from_stream.exit_code) == (1, 1)  # the rejected row


@pytest.mark.parametrize("kind", ["file", "resumed", "prune"])
async def test_the_summary_record_written_is_the_typed_summary(
    make_config: Callable[..., Config], emulator: Emulator, kind: str
) -> None:
    """The report's last record is the typed summary's record, key for key and in order:
    a plain file run, a resumed one (with the job's totals), a --prune one (with what it
    revoked)."""
    pairs = [(TOKEN_A, e) for e in PEOPLE[:9]]
    config = make_config()
    if kind == "resumed":
        await run(make_config(app_key="wrong-app-key"), csv_source(rows_csv(pairs)))
        config = make_config(resume=True)
    if kind == "prune":
        board = emulator.add_dashboard(TOKEN_A, invitees=PEOPLE)
        emulator.seed([board])
        board.invitations.extend((email, time.time() - 60) for email in PEOPLE)
        config = make_config(prune=True, prune_max=PruneMax(None, 100.0))
    result = await run(config, csv_source(rows_csv(pairs)))
    written = read_report(config.report_path)[-1]
    assert list(written.items()) == [("kind", "summary"), *result.summary.record().items()]
    assert written["exit_code"] == result.exit_code == 0
    assert (result.summary.job is not None) == (kind == "resumed")
    assert (result.summary.prune is not None) == (kind == "prune")


async def test_a_stream_workers_summary_record_written_is_its_typed_summary(
    make_config: Callable[..., Config], redis_server: str, redis: Redis, stream_name: str
) -> None:
    """A stream worker's last report record is its typed summary's record, its group and
    consumer last."""
    for email in PEOPLE:
        await redis.xadd(stream_name, {"token": TOKEN_A, "email": email})
    config = make_config()
    result = await run_stream(config, stream_options(redis_server, stream_name))
    written = read_report(config.report_path)[-1]
    assert list(written.items()) == [("kind", "summary"), *result.summary.record().items()]
    assert list(written)[-2:] == ["group", "consumer"]
    assert (written["group"], written["consumer"]) == ("invite-worker", "c1")
