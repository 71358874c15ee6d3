"""Nothing lost, nobody emailed twice: the journal, reconciliation and --resume (in-process)."""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from structlog.testing import capture_logs

from tests.conftest import (
    TOKEN_A,
    TOKEN_B,
    by_kind,
    csv_source,
    find_capture,
    invitation_traffic,
    read_report,
    rows_csv,
)
from worker.config import Config
from worker.emulator import Emulator, Faults
from worker.record.journal import Intent, Journal, journal_path, read_journal
from worker.record.replay import Replay
from worker.run import run
from worker.run.resume import load_history
from worker.run.summary import JobTotals
from worker.validate import pair_key


def sent_pairs(path: Path) -> Counter[tuple[str, str]]:
    """(token, email) -> how many 'sent' records name it, across the whole report."""
    return Counter(
        (b["token"], e.lower())
        for b in by_kind(read_report(path), "batch")
        if b["status"] == "sent"
        for e in b["emails"]
    )


async def test_concurrent_durable_intents_share_syncs_and_all_complete(tmp_path: Path) -> None:
    """Many senders journaling at once all return, each intent on disk, ids distinct."""
    journal = Journal(tmp_path / "j", durable=True)
    ids = await asyncio.gather(
        *(journal.intent("t", [f"u{i}@example.com"], 1.0) for i in range(50))
    )
    journal.clear(ids[0])
    journal.close()
    assert len(set(ids)) == 50
    assert set(read_journal(tmp_path / "j")) == set(ids[1:])


def test_a_torn_last_journal_line_is_ignored_and_appends_start_fresh(tmp_path: Path) -> None:
    """A line cut short by a crash neither breaks reading nor glues onto the next record."""
    path = tmp_path / "j"
    path.write_bytes(
        b'{"i": "a-1", "token": "t", "emails": ["x@example.com"], "at": 5}\n{"i": "a-2", "tok'
    )
    journal = Journal(path, durable=False)
    journal.clear("a-1")
    journal.close()
    assert read_journal(path) == {}
    assert path.read_bytes().endswith(b'\n{"c":"a-1"}\n')


async def test_resume_holds_only_the_open_part_of_each_journal_intent(tmp_path: Path) -> None:
    """Intents whose pairs all have a sent record are dropped as the journal is read."""
    journal = Journal(tmp_path / "j", durable=False)
    done = await journal.intent(TOKEN_A, ["a@example.com", "b@example.com"], 1.0)
    half = await journal.intent(TOKEN_A, ["c@example.com", "d@example.com"], 2.0)
    journal.close()
    sent = {"a@example.com", "b@example.com", "c@example.com"}

    def unsent(intent: Intent) -> Intent | None:
        left = [e for e in intent.emails if e not in sent]
        return Intent(intent.id, intent.token, left, intent.at) if left else None

    still_open = read_journal(tmp_path / "j", unsent)
    assert still_open == {half: Intent(half, TOKEN_A, ["d@example.com"], 2.0)}
    assert set(read_journal(tmp_path / "j")) == {done, half}


async def test_a_502_after_commit_is_reconciled_not_resent(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The invitations were created before the 502: listing finds them; no second POST."""
    emulator.script("502-after")
    config = make_config(concurrency=1)
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(5)]
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv(pairs)))
    assert [r.method for r in invitation_traffic(emulator)] == ["POST", "GET"]
    [batch] = by_kind(read_report(config.report_path), "batch")
    assert batch["status"] == "sent"
    assert batch["reconciled"] is True
    assert len(batch["invitations"]) == 5
    assert result.exit_code == 0
    assert result.summary.reconciled_sent == 5
    assert find_capture(logs, "batch.outcome_unknown")[0]["http_status"] == 502
    assert max(emulator.invited.values()) == 1


async def test_a_dropped_connection_after_commit_is_reconciled(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Same for a connection that dropped after the service created the invitations."""
    emulator.script("drop-after")
    config = make_config(concurrency=1)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    assert result.exit_code == 0
    assert [r.method for r in invitation_traffic(emulator)] == ["POST", "GET"]
    assert emulator.invited[(TOKEN_A, "a@example.com")] == 1


async def test_a_slow_answer_that_lands_after_the_timeout_is_found_not_duplicated(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The client gives up at --timeout; the server still creates; the delay lets it land."""
    emulator.faults.slow_seconds = 0.3
    emulator.script("slow")
    config = make_config(concurrency=1, timeout=0.1, reconcile_delay=0.5)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    assert result.exit_code == 0
    assert emulator.invited[(TOKEN_A, "a@example.com")] == 1
    [batch] = by_kind(read_report(config.report_path), "batch")
    assert batch["reconciled"] is True


async def test_a_failure_before_commit_is_checked_then_resent(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A 503 that created nothing: the listing shows nothing new, so the batch goes again."""
    emulator.script("503")
    config = make_config(concurrency=1)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    assert [r.method for r in invitation_traffic(emulator)] == ["POST", "GET", "POST"]
    [batch] = by_kind(read_report(config.report_path), "batch")
    assert batch["status"] == "sent"
    assert "reconciled" not in batch
    assert batch["attempts"] == 2
    assert result.exit_code == 0


async def test_reconciliation_reads_every_page_and_ignores_older_invitations(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Across 4 pages; an invitation from before the send time does not count as ours.

    (--resend: "again@" was invited long ago, and the test is about reconciliation.)"""
    board = emulator.add_dashboard(TOKEN_A)
    board.invitations.extend((f"old{i}@example.com", 1_000.0) for i in range(340))
    board.invitations.append(("again@example.com", 1_000.0))  # invited long ago
    emulator.script("502-after")
    config = make_config(concurrency=1, resend=True)
    pairs = [(TOKEN_A, "again@example.com"), (TOKEN_A, "new@example.com")]
    await run(config, csv_source(rows_csv(pairs)))
    gets = [r for r in invitation_traffic(emulator) if r.method == "GET"]
    assert len(gets) == 4  # 342 invitations at 100 a page
    # Both were created by the faulted POST (the newest invitation of each is ours).
    assert emulator.invited[(TOKEN_A, "again@example.com")] == 1
    assert [r.method for r in emulator.requests].count("POST") == 1


async def test_an_old_invitation_alone_does_not_stop_a_resend(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Only invitations created at or after the send time settle an unknown outcome
    (--resend: the old invitation alone would otherwise skip the address)."""
    board = emulator.add_dashboard(TOKEN_A)
    board.invitations.append(("again@example.com", 1_000.0))
    emulator.script("503")
    config = make_config(concurrency=1, resend=True)
    await run(config, csv_source(rows_csv([(TOKEN_A, "again@example.com")])))
    assert [r.method for r in invitation_traffic(emulator)] == ["POST", "GET", "POST"]


async def test_a_fault_heavy_service_still_gets_everyone_exactly_once(
    make_config: Callable[..., Config],
) -> None:
    """~22% of POSTs fail before or after commit, slowly or by dropping: exit 0, once each."""
    faults = Faults(error_rate=0.05, drop_rate=0.04, slow_rate=0.03, slow_seconds=0.25,
                    error_after_rate=0.05, drop_after_rate=0.05)  # fmt: skip
    async with Emulator(api_key="k" * 8, app_key="a" * 8, faults=faults, seed=11) as emu:
        config = make_config(api_url=emu.url, api_key="k" * 8, app_key="a" * 8, batch_size=25,
                             timeout=0.15, reconcile_delay=0.2, max_attempts=10)  # fmt: skip
        tokens = [TOKEN_A, TOKEN_B, "third-token"]
        pairs = [(tokens[i % 3], f"user{i}@example.com") for i in range(4000)]
        result = await run(config, csv_source(rows_csv(pairs)))
        assert result.exit_code == 0, result.summary
        assert emu.invited == Counter(dict.fromkeys(pairs, 1))
        assert sent_pairs(config.report_path) == emu.invited
        assert result.summary.unknown_outcomes > 10
        assert result.summary.reconciled_sent > 0


async def test_crash_between_sent_and_recorded_is_settled_on_resume(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Simulated crash: intent journaled, invitations created, no report record. Resume
    records them as sent (reconciled) and sends only what was never created."""
    config = make_config(concurrency=1)
    created = [f"done{i}@example.com" for i in range(3)]
    lost = [f"lost{i}@example.com" for i in range(2)]
    report = config.report_path
    report.write_text('{"kind": "rejected", "line": 9, "reason": "invalid_email"}\n')
    journal = Journal(journal_path(report), durable=True)
    at = emulator._clock() - 10  # long enough ago that no request can be in progress
    await journal.intent(TOKEN_A, created, at)  # the POST that succeeded, then the crash
    await journal.intent(TOKEN_B, lost, at)  # journaled, but the process died before sending
    journal.close()
    board = emulator.add_dashboard(TOKEN_A)
    board.invitations.extend((e, at + 0.5) for e in created)
    for e in created:
        emulator.invited[(TOKEN_A, e)] += 1
    pairs = [(TOKEN_A, e) for e in created] + [(TOKEN_B, e) for e in lost]
    resumed = make_config(concurrency=1, resume=True)
    result = await run(resumed, csv_source(rows_csv(pairs)))
    posts = [r for r in emulator.requests if r.method == "POST"]
    assert [(r.token, r.emails) for r in posts] == [(TOKEN_B, 2)]
    assert max(emulator.invited.values()) == 1
    records = read_report(report)
    reconciled = [b for b in by_kind(records, "batch") if b.get("reconciled")]
    assert [sorted(b["emails"]) for b in reconciled] == [sorted(created)]
    # Settled by this run as it began: its own rows (valid), not settled before (skipped).
    assert (result.summary.valid, result.summary.read.skipped) == (5, 0)
    assert result.summary.read.tokens == 2  # the settled rows' token counts too
    assert (result.summary.emails_sent, result.summary.unsent) == (5, 0)
    assert result.summary.resumed is True
    assert load_history(report, journal_path(report)).unknown == []  # nothing left to check


async def test_resume_skips_sent_and_final_failures_but_retries_aborted_batches(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """After a run refused by wrong keys, --resume with the right keys sends the rest once."""
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(40)] + [
        (TOKEN_A, "who@outside.example"), (TOKEN_A, "bad-address")
    ]  # fmt: skip
    first = await run(make_config(batch_size=10, app_key="wrong-app-key"),
                      csv_source(rows_csv(pairs)))  # fmt: skip
    assert first.exit_code == 3
    second = await run(make_config(batch_size=10, resume=True), csv_source(rows_csv(pairs)))
    assert second.summary.job == JobTotals(emails_sent=40, emails_failed=1, emails_skipped=0,
                                           rejected=1, unknown=0)  # fmt: skip
    assert second.exit_code == 1
    third = await run(make_config(batch_size=10, resume=True), csv_source(rows_csv(pairs)))
    assert third.summary.read.skipped == 41
    assert third.summary.requests == 0
    assert max(emulator.invited.values()) == 1
    records = read_report(make_config().report_path)
    assert len(by_kind(records, "rejected")) == 1  # not written again on each resume
    assert len(by_kind(records, "summary")) == 3
    assert records[-1]["kind"] == "summary"


async def test_stop_leaves_unsent_batches_for_resume(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A stop mid-run: exit 3, summary marked interrupted, every created invitation in the
    report; --resume finishes with no duplicate."""
    emulator.window.limit, emulator.window.period = 5, 0.2  # slow enough to stop in the middle
    stop = asyncio.Event()
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(300)]
    config = make_config(batch_size=10, grace=5.0)
    task = asyncio.create_task(run(config, csv_source(rows_csv(pairs)), stop=stop))
    await asyncio.wait_for(emulator.wait_for_invitations(50), 20)
    stop.set()
    result = await task
    assert result.exit_code == 3
    assert result.summary.interrupted is True
    assert result.summary.unsent == 300 - result.summary.emails_sent > 0
    assert sent_pairs(config.report_path) == emulator.invited  # nothing created is missing
    again = await run(make_config(batch_size=10, resume=True), csv_source(rows_csv(pairs)))
    assert again.exit_code == 0
    assert emulator.invited == Counter(dict.fromkeys(pairs, 1))


async def test_resume_after_a_dry_run_sends_everything_once(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A dry run's planned batches are not outcomes: --resume on its report sends them all."""
    from worker.run.plan import dry_run

    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(12)] + [(TOKEN_A, "not-an-email")]
    config = make_config(batch_size=5)
    await dry_run(config, csv_source(rows_csv(pairs)), out=io.StringIO())
    assert emulator.requests == []
    planned = load_history(config.report_path, journal_path(config.report_path))
    assert planned.failed == {}
    assert len(planned.sent) == 0
    result = await run(make_config(batch_size=5, resume=True), csv_source(rows_csv(pairs)))
    assert result.summary.job == JobTotals(emails_sent=12, emails_failed=0, emails_skipped=0,
                                           rejected=1, unknown=0)  # fmt: skip
    assert emulator.invited == Counter(dict.fromkeys(pairs[:12], 1))


def test_resume_and_summarize_replay_a_report_the_same_way(tmp_path: Path) -> None:
    """One replay serves --resume and report summarize: a pair once sent stays sent even if
    a later record says failed; a final failure is settled; a passing one is not."""
    report = tmp_path / "r.jsonl"
    report.write_text(
        "\n".join(
            [
                '{"kind":"batch","token":"t","emails":["a@x.io","b@x.io"],"status":"sent"}',
                '{"kind":"batch","token":"t","emails":["a@x.io"],"status":"failed",'
                '"error":{"code":"server_error","message":"?"}}',
                '{"kind":"batch","token":"t","emails":["c@x.io"],"status":"failed",'
                '"error":{"code":"bad_request","message":"no"}}',
                '{"kind":"batch","token":"t","emails":["d@x.io"],"status":"failed",'
                '"error":{"code":"timeout","message":"slow"}}',
                '{"kind":"rejected","line":7,"reason":"invalid_email","email":"nope"}',
                '{"kind":"skipped","token":"t","emails":["e@x.io"],"reason":"already_invited"}',
                '{"kind":"summary","requests":3}',
            ]
        )
        + "\n"
    )
    history = load_history(report, journal_path(report))
    keys = {e: pair_key("t", e) for e in ("a@x.io", "b@x.io", "c@x.io", "d@x.io")}
    assert history.settled(list(keys.values())) == {keys["a@x.io"], keys["b@x.io"],
                                                    keys["c@x.io"]}  # fmt: skip
    assert history.totals() == {"emails_sent": 2, "emails_failed": 2, "emails_skipped": 1,
                                "rejected": 1, "unknown": 0}  # fmt: skip
    assert history.runs == 1
    totals = Replay.read(report).summary()
    assert (totals["sent"], totals["failed"], totals["rejected"]) == (2, 2, 1)
    assert totals["skipped"] == 1
    assert totals["failed_by_code"] == {"bad_request": 1, "timeout": 1}


async def test_a_run_that_leaves_nothing_open_empties_its_journal(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A finished run (a bad row and all) empties its journal once the report is durable:
    a daily --resume then reads no earlier day's intents, and still sends nobody twice."""
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(30)]
    config = make_config(batch_size=10)
    first = await run(config, csv_source(rows_csv([*pairs, (TOKEN_A, "not-an-email")])))
    assert first.exit_code == 1  # the bad row: incomplete, yet nothing is open
    assert journal_path(config.report_path).stat().st_size == 0
    more = [*pairs, (TOKEN_B, "q@example.com")]
    again = await run(make_config(batch_size=10, resume=True), csv_source(rows_csv(more)))
    assert again.exit_code == 0
    assert journal_path(config.report_path).stat().st_size == 0
    assert emulator.invited == Counter(dict.fromkeys(more, 1))


async def test_a_run_that_ends_with_an_unknown_outcome_keeps_its_journal(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A request whose outcome no listing could tell (the service ignores page_number) is
    still open when the run ends: its intent stays in the journal for --resume."""
    board = emulator.add_dashboard(TOKEN_A, invitees=None)
    board.invitations.extend((f"other{i}@example.com", 1.0) for i in range(150))
    emulator.ignore_page_number = True  # two pages, each the first: the list is unreadable
    emulator.script("502-after")  # created, but the answer says 502
    config = make_config(batch_size=5, resend=True, reconcile_delay=0.0, max_attempts=2)
    emails = [f"p{i}@example.com" for i in range(5)]
    result = await run(config, csv_source(rows_csv([(TOKEN_A, e) for e in emails])))
    assert result.exit_code == 1
    [intent] = read_journal(journal_path(config.report_path)).values()
    assert intent.emails == emails
    assert sum(1 for r in emulator.requests if r.method == "POST") == 1
