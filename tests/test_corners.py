"""Corners a user meets through the CLI: blank lines are not rows, a torn first record does
not disown a report, credentials in a URL or a proxy variable are never echoed, and a dry
run replaces only what is positively a plan (a real process, real files)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    on_a_terminal,
    read_report,
    worker_command,
    worker_env,
)
from tests.test_true_counts import shown

SAMPLE = ROOT / "sample_inputs" / "invites.csv"
KEYS = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}
SECRET = "s3cretpw"


def invite_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``invite-worker ARGS`` with the test keys (and ``env``); console text on stderr."""
    argv = worker_command(*args)
    if args[0] == "run":
        argv += ["--log-format", "console"]
    return subprocess.run(argv, env=worker_env(**KEYS, **env), cwd=ROOT, capture_output=True,
                          timeout=60, check=False, text=True)  # fmt: skip


@pytest.mark.timeout(120)
def test_blank_lines_between_rows_are_not_counted_as_rows_after_a_stop(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Rows each followed by two blank lines (CRLF, one of them spaces only): the bar's
    total is the 30,000 rows, and after SIGTERM "invited" + "not sent yet" and the
    summary's sent + unsent + unread add up to exactly those rows."""
    url = start_emulator("--limit", "5", "--period", "1")
    source, report = tmp_path / "in.csv", tmp_path / "r.jsonl"
    source.write_bytes(
        b"token,email\r\n\r\n"
        + b"".join(b"tok%d,u%d@example.com\r\n  \r\n\r\n" % (i % 3, i) for i in range(30_000))
    )

    def stop_soon(proc: subprocess.Popen[bytes]) -> None:
        time.sleep(1.5)  # past the first sends, the count done long before
        proc.send_signal(signal.SIGTERM)

    code, seen = on_a_terminal(
        worker_command("run", str(source), "--api-url", url, "--batch-size", "20",
                       "--report", str(report)),
        when=b"invites:", then=stop_soon,
    )  # fmt: skip
    assert code == 3
    bars = [part for part in shown(seen) if part.startswith("invites:")]
    assert any("/30000" in bar for bar in bars), bars[-3:]
    assert not any(re.search(r"/(?!30000\b)\d{5}", bar) for bar in bars), bars[-3:]
    last = shown(seen)[-1]
    found = re.search(r"Stopped by SIGTERM: ([\d,]+) invited; ([\d,]+) not sent yet", last)
    assert found, last
    invited, left = (int(n.replace(",", "")) for n in found.groups())
    assert invited + left == 30_000
    summary = read_report(report)[-1]
    assert summary["unread"] > 0
    assert summary["emails_sent"] + summary["unsent"] + summary["unread"] == 30_000
