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
    by_kind,
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


def _tear_first_line(path: Path) -> None:
    first, rest = path.read_bytes().split(b"\n", 1)
    path.write_bytes(first[: len(first) // 2] + b"\n" + rest)


def test_a_report_whose_first_line_is_torn_is_still_summarized_and_resumed(
    tmp_path: Path,
) -> None:
    """A report whose first record a crash cut short is still a report: ``report
    summarize`` and ``report failed`` read it, and ``--resume`` continues it; a CSV or
    JSONL input (first line torn, or a byte-order mark) is still refused as one."""
    source, report = tmp_path / "in.csv", tmp_path / "r.jsonl"
    source.write_bytes(SAMPLE.read_bytes())
    assert invite_worker("run", str(source), "--sandbox", "--report", str(report)).returncode == 1
    whole = invite_worker("report", "summarize", str(report))
    assert whole.returncode != 2, whole.stderr
    _tear_first_line(report)
    summarized = invite_worker("report", "summarize", str(report))
    assert summarized.returncode == whole.returncode, summarized.stderr
    assert "not an invite-worker report" not in summarized.stderr
    failed = invite_worker("report", "failed", str(report), "--output", str(tmp_path / "f.csv"))
    assert failed.returncode != 2, failed.stderr
    before = report.stat().st_size
    resumed = invite_worker("run", str(source), "--sandbox", "--report", str(report), "--resume")
    assert resumed.returncode in (0, 1), resumed.stderr
    assert report.stat().st_size > before
    assert by_kind(read_report_tolerantly(report), "summary")[-1]["resumed"] is True
    # Still never an input taken for a report, whatever its first line.
    notes = tmp_path / "notes.jsonl"
    for content in INPUTS:
        notes.write_bytes(content)
        for flag in ("--overwrite", "--resume"):
            done = invite_worker("run", str(source), "--sandbox", "--report", str(notes), flag)
            assert done.returncode == 2, (content, done.stderr)
            assert "is not a report" in done.stderr
        assert invite_worker("report", "summarize", str(notes)).returncode == 2
        assert notes.read_bytes() == content


#: Inputs given where a report goes: JSONL with its first line torn, or a byte-order mark.
INPUTS = [
    b'{"tok\n{"token":"t","email":"a@example.com"}\n',
    b'\xef\xbb\xbf{"token":"t","email":"a@example.com"}\n{"token":"t","email":"b@x.co"}\n',
    b"\xef\xbb\xbftoken,email\nt,a@example.com\n",
    b"token,email\nt,a@example.com\n",
]


def read_report_tolerantly(path: Path) -> list[dict[str, object]]:
    """The records of a report whose torn lines are left out."""
    import msgspec

    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        records.append(record)
    return records


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@127.0.0.1:99999",
        f"http://user:{SECRET}@127.0.0.1:port",
        f"http://user:{SECRET}@[::1",
        f"ftp://user:{SECRET}@127.0.0.1",
        f"http://user:{SECRET}@example.com",
        f"http://user:{SECRET}/x@127.0.0.1:abc",
        f"user:{SECRET}@127.0.0.1",
    ],
)
def test_a_bad_api_url_is_refused_without_its_credentials(url: str) -> None:
    """Every refusal of --api-url (bad port, unclosed IPv6, scheme, plain HTTP afar) is
    exit 2 and shows the URL without its user and password."""
    done = invite_worker("run", str(SAMPLE), "--api-url", url, "--report", "/nonexistent/r")
    assert done.returncode == 2, done.stderr
    assert "--api-url" in done.stderr
    assert SECRET not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY"])
@pytest.mark.parametrize(
    "value",
    [
        f"http://user:{SECRET}@[::1",
        f"user:{SECRET}@[::1",
        f"http://user:{SECRET}@ex\uff0fample.com",
    ],
    ids=["ipv6", "no-scheme", "nfkc"],
)
def test_a_malformed_proxy_variable_is_a_usage_error_without_its_password(
    tmp_path: Path, variable: str, value: str
) -> None:
    """A proxy variable that does not parse is exit 2 naming the variable, not a traceback;
    its password is never shown; nothing is written."""
    report = tmp_path / "r.jsonl"
    done = invite_worker("run", str(SAMPLE), "--api-url", "http://127.0.0.1:9", "--report",
                         str(report), **{variable: value})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{variable}=" in done.stderr
    assert SECRET not in done.stderr + done.stdout
    assert not report.exists()


def test_a_dry_run_never_replaces_a_crashed_runs_report(tmp_path: Path) -> None:
    """A report holding only ``rejected`` records (a real run that crashed before its first
    batch) is not a plan: a dry run refuses it (exit 2) and leaves it whole; a real plan
    is still replaced by the next dry run."""
    source, report = tmp_path / "in.csv", tmp_path / "r.jsonl"
    source.write_bytes(SAMPLE.read_bytes())
    assert invite_worker("run", str(source), "--sandbox", "--report", str(report)).returncode == 1
    rejected = [line for line in report.read_bytes().splitlines(keepends=True)
                if b'"kind":"rejected"' in line]  # fmt: skip
    assert rejected
    report.write_bytes(b"".join(rejected))
    done = invite_worker("run", str(source), "--dry-run", "--report", str(report))
    assert done.returncode == 2, done.stderr
    assert "already exists" in done.stderr
    assert report.read_bytes() == b"".join(rejected)
    plan = tmp_path / "plan.jsonl"
    assert invite_worker("run", str(source), "--dry-run", "--report", str(plan)).returncode == 1
    again = invite_worker("run", str(source), "--dry-run", "--report", str(plan))
    assert again.returncode == 1, again.stderr
