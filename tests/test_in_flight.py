"""A request in flight when its process stops or dies: settled only once it has landed.

The service creates the invitations of a slow request even after the client has gone, so
a listing made before that request could end would miss them and invite everyone again.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Proc, by_kind, emulator_invited, read_report
from worker.record.journal import journal_path

#: The emulator answers every POST this late, creating its invitations then, client or not;
#: the worker's --timeout is just longer, so the request is not one that times out.
SLOW, TIMEOUT = "4", "5"


def wait_for(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_request_cut_by_sigterm_is_settled_on_resume_only_once_it_has_landed(
    tmp_path: Path, start_emulator: Callable[..., str], spawn: Callable[..., Proc]
) -> None:
    """SIGTERM during a slow POST: exit 3 with it counted as an unknown outcome, not unsent;
    --resume waits until it can no longer be in progress, finds it created: invited once."""
    url = start_emulator("--slow-rate", "1", "--slow-seconds", SLOW)
    source, report = tmp_path / "in.csv", tmp_path / "report.jsonl"
    pairs = {("dash-slow", f"t{i}@example.com") for i in range(3)}
    source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))

    def run(*extra: str) -> Proc:
        return spawn("run", str(source), "--report", str(report), "--api-url", url,
                     "--timeout", TIMEOUT, "--reconcile-delay", "0.5", "--grace", "0.5",
                     *extra)  # fmt: skip

    first = run()
    journal = journal_path(report)
    wait_for(lambda: journal.exists() and b'"i":' in journal.read_bytes(), "the intent")
    time.sleep(0.3)  # the POST is on its way; the service answers it SLOW s later
    first.popen.send_signal(signal.SIGTERM)
    first.expect(3, timeout=15)
    assert emulator_invited(url) == {}  # not yet: the service is still on it
    started = time.monotonic()
    run("--resume").expect(0, timeout=60)
    assert time.monotonic() - started < 30
    assert emulator_invited(url) == dict.fromkeys(pairs, 1)
    records = read_report(report)
    sent = [b for b in by_kind(records, "batch") if b["status"] == "sent"]
    assert [(b["reconciled"], len(b["emails"])) for b in sent] == [(True, 3)]
    stopped, resumed = by_kind(records, "summary")
    assert stopped["interrupted"] is True
    # The request went out: its outcome is unknown, its emails are not "unsent".
    assert (stopped["unknown_outcomes"], stopped["unsent"]) == (1, 0)
    assert (resumed["job"]["emails_sent"], resumed["job"]["unknown"]) == (3, 0)


def test_a_killed_queue_workers_slow_request_is_settled_only_once_it_has_landed(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """SIGKILL a queue worker during a slow POST; another claims its messages at once but
    lists them only once that POST can no longer be in progress: each invited once."""
    url = start_emulator("--slow-rate", "1", "--slow-seconds", SLOW)
    source = tmp_path / "in.csv"
    source.write_text("token,email\ndash-q,k1@example.com\ndash-q,k2@example.com\n")
    spawn("enqueue", str(source), redis_server, "--stream", stream_name).expect(0, timeout=60)

    def worker(name: str, *extra: str) -> Proc:
        return spawn("run", redis_server, "--stream", stream_name, "--consumer", name,
                     "--until-empty", "--linger", "0.1", "--api-url", url, "--timeout",
                     TIMEOUT, "--reconcile-delay", "0.5",
                     "--report", str(tmp_path / f"{name}.jsonl"), *extra)  # fmt: skip

    def intents() -> int:
        key = f"{stream_name}:invite-worker:intents"
        out = subprocess.run(["redis-cli", "-u", redis_server, "HLEN", key],
                             capture_output=True, check=True)  # fmt: skip
        return int(out.stdout.strip() or 0)

    first = worker("first")
    wait_for(lambda: intents() == 2, "the intents")
    time.sleep(0.3)  # the POST is on its way
    first.popen.send_signal(signal.SIGKILL)
    first.expect(-signal.SIGKILL, timeout=10)
    assert emulator_invited(url) == {}
    started = time.monotonic()
    worker("second", "--claim-idle", "0.5").expect(0, timeout=60)
    assert time.monotonic() - started < 30
    assert emulator_invited(url) == {("dash-q", "k1@example.com"): 1,
                                     ("dash-q", "k2@example.com"): 1}  # fmt: skip
    [sent] = [b for b in by_kind(read_report(tmp_path / "second.jsonl"), "batch")
              if b["status"] == "sent"]  # fmt: skip
    assert sent["reconciled"] is True
