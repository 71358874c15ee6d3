"""Whole runs against the emulator over loopback HTTP: outcomes, retries, splits, aborts."""

from __future__ import annotations

import random
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import (
    API_KEY,
    APP_KEY,
    TOKEN_A,
    TOKEN_B,
    TOKEN_C,
    by_kind,
    csv_source,
    find_capture,
    invitation_traffic,
    read_report,
    rows_csv,
)
from worker.config import Config
from worker.emulator import Emulator, Faults
from worker.errors import UsageError
from worker.run import run


async def test_ten_thousand_mixed_rows_invite_every_valid_address_exactly_once(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """10,000 rows with bad, duplicate and refused rows: exactly-once, list form, exit 1."""
    rng = random.Random(42)
    tokens = [TOKEN_A, TOKEN_B, TOKEN_C, "dash_board-4", "gone-deleted-dashboard"]
    emulator.add_dashboard("dash_board-4", [f"user{i}@example.com" for i in range(0, 10_000, 2)])
    lines = ["token,email"]
    expected_bad: dict[int, str] = {}
    seen: set[tuple[str, str]] = set()
    for i in range(10_000):
        line = len(lines) + 1
        token = tokens[i % 5]
        email = f"user{i}@example.com"
        roll = rng.random()
        if roll < 0.03:
            email = f"user{i}-at-example.com"
            expected_bad[line] = "invalid_email"
        elif roll < 0.05:
            token = "bad/token"
            expected_bad[line] = "invalid_token"
        elif roll < 0.08 and seen:
            token, email = rng.choice(sorted(seen))
            email = email.upper()
            expected_bad[line] = "duplicate"
        elif roll < 0.10:
            email = f"user{i}@outside.example"
        if line not in expected_bad:
            seen.add((token, email.lower()))
        lines.append(f"{token},{email}")
    config = make_config(batch_size=50, concurrency=4)
    result = await run(config, csv_source("\n".join(lines) + "\n"))

    records = read_report(config.report_path)
    rejected = {r["line"]: r["reason"] for r in by_kind(records, "rejected")}
    assert rejected == expected_bad
    batches = by_kind(records, "batch")
    sent = Counter(
        (b["token"], e.lower()) for b in batches if b["status"] == "sent" for e in b["emails"]
    )
    reported = Counter((b["token"], e.lower()) for b in batches for e in b["emails"])
    assert set(reported) == seen
    assert max(reported.values()) == 1
    assert sent == emulator.invited  # the report's "sent" is exactly what was created
    for (token, email), status in (
        ((b["token"], e.lower()), b["status"]) for b in batches for e in b["emails"]
    ):
        on_list = not email.endswith("@outside.example") and token != "gone-deleted-dashboard"
        if token == "dash_board-4":
            on_list = on_list and int(email[4:].split("@")[0]) % 2 == 0
        assert (status == "sent") == on_list, (token, email)
    posts = [r for r in emulator.requests if r.method == "POST"]
    assert all(r.list_form for r in posts)
    assert max(r.emails for r in posts) <= 50
    assert result.exit_code == 1
    summary = records[-1]
    assert summary["kind"] == "summary"
    assert len(by_kind(records, "summary")) == 1
    assert summary["emails_sent"] == sum(sent.values())
    assert summary["rows"] == 10_000
    assert summary["rejected"] == len(expected_bad)


async def test_clean_run_exits_zero_with_invitations_recorded(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """All rows valid and on the list: exit 0 and the per-email invitations are in the report."""
    config = make_config(batch_size=3)
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(7)]
    result = await run(config, csv_source(rows_csv(pairs)))
    assert result.exit_code == 0
    batches = by_kind(read_report(config.report_path), "batch")
    assert sorted(len(b["emails"]) for b in batches) == [1, 3, 3]
    for b in batches:
        assert b["status"] == "sent"
        assert b["http_status"] == 201
        assert b["error"] is None
        assert [i["email"] for i in b["invitations"]] == b["emails"]
        assert all(i["created_at"] and i["invitation_expiry"] for i in b["invitations"])
        assert b["attempts"] == 1
        assert b["duration_ms"] >= 0


async def test_one_refused_address_does_not_block_the_other_99(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A 400 that names no address splits the batch in halves until the refused one stands
    alone."""
    emulator.faults.name_refused = False
    config = make_config(batch_size=100)
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(100)]
    pairs[37] = (TOKEN_A, "intruder@outside.example")
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv(pairs)))
    batches = by_kind(read_report(config.report_path), "batch")
    failed = [b for b in batches if b["status"] == "failed"]
    assert [b["emails"] for b in failed] == [["intruder@outside.example"]]
    assert failed[0]["error"]["code"] == "bad_request"
    assert "share list" in failed[0]["error"]["message"]
    assert sum(len(b["emails"]) for b in batches if b["status"] == "sent") == 99
    assert sorted(e for b in batches for e in b["emails"]) == sorted(e for _, e in pairs)
    assert len(emulator.requests) <= 2 * 7 + 1  # about two requests per halving level
    assert find_capture(logs, "batch.split")
    assert not find_capture(logs, "batch.cap_learned")  # an address, not the length
    assert result.exit_code == 1


async def test_a_400_naming_addresses_fails_exactly_those_and_resends_the_rest_once(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The refused addresses the 400 names fail; the other 97 go again in one request."""
    config = make_config(batch_size=100)
    pairs = [(TOKEN_A, f"p{i}@example.com") for i in range(100)]
    for i in (3, 37, 90):
        pairs[i] = (TOKEN_A, f"Intruder{i}@Outside.Example")
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv(pairs)))
    batches = by_kind(read_report(config.report_path), "batch")
    failed = [b for b in batches if b["status"] == "failed"]
    assert [b["emails"] for b in failed] == [[pairs[3][1], pairs[37][1], pairs[90][1]]]
    assert failed[0]["error"]["code"] == "bad_request"
    sent = [b for b in batches if b["status"] == "sent"]
    assert [len(b["emails"]) for b in sent] == [97]
    assert len(invitation_traffic(emulator)) == 2
    assert not find_capture(logs, "batch.split")
    assert find_capture(logs, "batch.refused_named")[0]["refused"] == 3
    assert result.exit_code == 1


async def test_retryable_failures_are_retried_with_backoff(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """503, an HTML 502 from a proxy, and a dropped connection are retried, then succeed."""
    emulator.script("503", "502-html", "drop")
    config = make_config(batch_size=10, concurrency=1, max_attempts=5)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    [batch] = by_kind(read_report(config.report_path), "batch")
    assert batch["status"] == "sent"
    assert batch["attempts"] == 4
    retries = find_capture(logs, "batch.retry_scheduled")
    assert [r["code"] for r in retries] == ["server_error", "server_error", "connection_dropped"]
    # Each outcome was unknown, so the token's invitations were listed before every re-send.
    assert [r.method for r in invitation_traffic(emulator)] == ["POST", "GET"] * 3 + ["POST"]
    assert "<" not in retries[1]["error"]  # the HTML body was reduced to its text
    assert all(r["delay"] > 0 for r in retries)
    assert result.exit_code == 0
    assert emulator.invited[(TOKEN_A, "a@example.com")] == 1


async def test_retries_stop_at_max_attempts(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """A batch that keeps failing is recorded failed after --max-attempts attempts."""
    emulator.script("503", "503", "503")
    config = make_config(concurrency=1, max_attempts=3)
    result = await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    [batch] = by_kind(read_report(config.report_path), "batch")
    assert batch["status"] == "failed"
    assert batch["attempts"] == 3
    assert batch["error"]["code"] == "server_error"
    assert batch["http_status"] == 503
    assert result.exit_code == 1


async def test_a_timeout_is_retried(emulator: Emulator, make_config: Callable[..., Config]) -> None:
    """A response slower than --timeout is abandoned and the batch retried."""
    emulator.faults.slow_seconds = 2.0
    emulator.script("slow")
    config = make_config(concurrency=1, timeout=0.2)
    with capture_logs() as logs:
        await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    [batch] = by_kind(read_report(config.report_path), "batch")
    assert batch["status"] == "sent"
    assert batch["attempts"] == 2
    assert find_capture(logs, "batch.retry_scheduled")[0]["code"] == "timeout"


async def test_a_429_is_a_wait_not_a_failed_attempt(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Even with --max-attempts 1, a batch answered 429 twice is sent after waiting."""
    emulator.script("429", "429")
    config = make_config(concurrency=1, max_attempts=1)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    [batch] = by_kind(read_report(config.report_path), "batch")
    assert (batch["status"], batch["attempts"], batch["rate_limited"]) == ("sent", 1, 2)
    assert [e["reason"] for e in find_capture(logs, "ratelimit.wait")] == ["429", "429"]
    assert result.summary.rate_limited == 2
    assert result.exit_code == 0


async def test_a_rate_limited_server_still_gets_everyone_exactly_once(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """Against a small calendar-aligned limit, every pair is invited once and 429s are rare."""
    async with Emulator(api_key=API_KEY, app_key=APP_KEY, limit=4, period=0.25) as limited:
        limited.script("429")  # one the pacer could not foresee
        config = make_config(api_url=limited.url, batch_size=5, concurrency=4)
        pairs = [(t, f"p{i}@example.com") for i in range(40) for t in (TOKEN_A, TOKEN_B)]
        result = await run(config, csv_source(rows_csv(pairs)))
        assert result.exit_code == 0
        assert limited.invited == Counter(dict.fromkeys(pairs, 1))
        assert limited.stats()["rate_limited"] <= 2


async def test_wrong_keys_abort_quickly_and_record_everything_as_failed(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """403: exit 3 after a handful of requests; every pending batch is reported failed."""
    config = make_config(app_key="wrong-app-key-000", batch_size=10, concurrency=4)
    pairs = [(t, f"p{i}@example.com") for i in range(300) for t in (TOKEN_A, TOKEN_B)]
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv(pairs)))
    assert result.exit_code == 3
    assert len(emulator.requests) <= 4
    records = read_report(config.report_path)
    batches = by_kind(records, "batch")
    assert sum(len(b["emails"]) for b in batches) == 600
    assert all(b["status"] == "failed" for b in batches)
    codes = Counter(b["error"]["code"] for b in batches)
    assert codes["forbidden"] >= 1
    assert codes["aborted"] >= 50
    assert "DD_APP_KEY" in records[-1]["abort_reason"]
    assert records[-1]["aborted"] is True
    assert find_capture(logs, "run.aborted")


async def test_unknown_token_fails_its_batches_without_more_requests(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """404 on the token's first read (its listing): every batch of the token fails, with
    no other request for it, and nothing is POSTed."""
    config = make_config(batch_size=2, concurrency=1)
    pairs = [("gone-token", f"p{i}@example.com") for i in range(6)] + [(TOKEN_A, "a@example.com")]
    result = await run(config, csv_source(rows_csv(pairs)))
    gone = [r for r in emulator.requests if r.token == "gone-token"]
    assert len(gone) == 1
    assert gone[0].status == 404
    batches = by_kind(read_report(config.report_path), "batch")
    dead = [b for b in batches if b["token"] == "gone-token"]
    assert len(dead) == 3
    assert all(b["error"]["code"] == "token_not_found" for b in dead)
    assert [b["attempts"] for b in dead] == [0, 0, 0]
    assert not [r for r in gone if r.method == "POST"]
    assert result.exit_code == 1


async def test_keys_never_appear_in_report_or_logs(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Neither a successful nor a refused run writes a key anywhere."""
    for app_key in (APP_KEY, "bad-" + APP_KEY):
        config = make_config(app_key=app_key, overwrite=True)
        with capture_logs() as logs:
            await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
        text = config.report_path.read_text() + repr(logs) + repr(config)
        assert API_KEY not in text
        assert APP_KEY not in text


async def test_report_is_private_and_never_silently_replaced(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """The report is created 0600; an existing one is refused unless --overwrite is given."""
    config = make_config()
    await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    assert stat.S_IMODE(config.report_path.stat().st_mode) == 0o600
    with pytest.raises(UsageError, match="--overwrite"):
        await run(config, csv_source(rows_csv([(TOKEN_A, "b@example.com")])))
    again = make_config(overwrite=True)
    await run(again, csv_source(rows_csv([(TOKEN_A, "b@example.com")])))
    assert len(by_kind(read_report(config.report_path), "summary")) == 1


async def test_buffering_is_bounded_across_many_tokens(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """With more tokens than the buffer bound holds, partial batches go early; none is lost."""
    config = make_config(batch_size=10, max_buffered_rows=20)
    pairs = [(f"tok{i % 50}", f"p{i}@example.com") for i in range(500)]
    await run(config, csv_source(rows_csv(pairs)))
    batches = by_kind(read_report(config.report_path), "batch")
    assert sum(len(b["emails"]) for b in batches) == 500
    assert all(len({b["token"]}) == 1 and len(b["emails"]) <= 10 for b in batches)
    assert emulator.stats()["invitations"] == 500


async def test_events_have_stable_names(
    emulator: Emulator, make_config: Callable[..., Config]
) -> None:
    """Run start, each batch outcome and the final summary are logged as named events."""
    config = make_config()
    with capture_logs() as logs:
        await run(config, csv_source(rows_csv([(TOKEN_A, "a@example.com")])))
    names = [e["event"] for e in logs]
    assert names[0] == "run.started"
    assert names[-1] == "run.finished"
    assert "batch.sent" in names
    assert find_capture(logs, "run.finished")[0]["emails_sent"] == 1


def test_config_is_validated_and_hides_keys() -> None:
    """Bad values are usage errors; repr never shows the keys; plain HTTP only to loopback."""
    good: dict[str, Any] = {"api_url": "http://127.0.0.1:1", "api_key": "k" * 8,
                            "app_key": "a" * 8}  # fmt: skip
    assert "kkkkkkkk" not in repr(Config(**good))
    bad: dict[str, Any]
    for bad in (
        {"batch_size": 0},
        {"concurrency": 0},
        {"rate": 0.0},
        {"timeout": -1.0},
        {"api_key": ""},
        {"api_url": "ftp://x"},
        {"api_url": "http://10.0.0.1"},
    ):
        with pytest.raises(UsageError):
            Config(**{**good, **bad})
    assert Config(**{**good, "api_url": "https://proxy.internal/"}).api_url == (
        "https://proxy.internal"
    )


def test_emulator_settings_are_checked_when_built() -> None:
    """Fault rates outside 0..1 (or summing past 1), a zero period or limit are refused."""
    cases: list[dict[str, Any]] = [{"error_rate": 1.5}, {"error_rate": 0.7, "drop_after_rate": 0.5}]
    for faults in cases:
        with pytest.raises(UsageError, match="fault rates"):
            Faults(**faults)
    with pytest.raises(UsageError, match="--period"):
        Emulator(period=0)
    with pytest.raises(UsageError, match="--limit"):
        Emulator(limit=0)
