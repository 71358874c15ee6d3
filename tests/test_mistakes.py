"""A newcomer's mistakes, made as a user makes them: the CLI in a real process, real files.

Each is refused (exit 2, one line naming the fix) before anything is written or sent, or
said the way that points to the fix: the input is never written over, a wrong URL or
stream name is never taken as given, and JSONL is as strict as CSV.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    Proc,
    by_kind,
    emulator_invited,
    free_port,
    read_report,
    wait_for_port,
    worker_command,
)
from tests.conftest import worker_env as clean_env
from worker.config import Config
from worker.errors import UsageError
from worker.queue.options import StreamOptions
from worker.sources.jsonl import JsonlSource

SAMPLE = ROOT / "sample_inputs" / "invites.csv"
KEYS = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}


def invite_worker(
    *args: str,
    stdin: bytes | int | None = None,
    cwd: Path = ROOT,
    timeout: float = 60,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """``invite-worker ARGS`` with the test keys (and ``env``); stderr as console text."""
    return subprocess.run(
        worker_command(*args, "--log-format", "console")
        if args[0] in ("run", "enqueue", "dead-letter") else worker_command(*args),
        env=clean_env(**KEYS, **env), cwd=cwd, capture_output=True, timeout=timeout, check=False,
        text=True, **({"input": stdin.decode()} if isinstance(stdin, bytes) else {"stdin": stdin}),
    )  # fmt: skip


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single message a refused command printed."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def emulator_stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=10) as resp:  # noqa: S310
        stats: dict[str, int] = json.loads(resp.read())
        return stats


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """A copy of the README's sample input."""
    path = tmp_path / "in.csv"
    shutil.copy(SAMPLE, path)
    return path


@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link", "journal", "lock"])
def test_a_report_that_is_the_input_is_refused_even_with_overwrite(
    sample: Path, tmp_path: Path, how: str
) -> None:
    """Case 1: a report (or its journal, or its lock) that is the input file, by path or
    through a link, is exit 2 before anything is written; the input is unchanged."""
    report = tmp_path / "r.jsonl"
    if how == "same path":
        report = sample
    elif how == "symbolic link":
        report.symlink_to(sample)
    elif how == "hard link":
        os.link(sample, report)
    else:  # the journal of --report R is R.journal, its lock R.lock
        sample = sample.rename(tmp_path / f"r.jsonl.{how}")
    before = sample.read_bytes()
    done = invite_worker("run", str(sample), "--sandbox", "--format", "csv", "--report",
                         str(report), "--overwrite")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is the input" in one_line(done)
    assert sample.read_bytes() == before
    linked = {report.name} if report.exists() or report.is_symlink() else set()
    assert {p.name for p in tmp_path.iterdir()} == {sample.name} | linked  # no journal, no lock


def test_a_report_given_as_the_input_is_refused_with_the_way_to_retry(
    sample: Path, tmp_path: Path
) -> None:
    """A report given as the input (its first record a rejected row, which has token and
    email fields like an input row) is exit 2, naming ``report failed``; nothing is sent
    and no report is written."""
    first = tmp_path / "day1.jsonl"
    done = invite_worker("run", str(sample), "--sandbox", "--report", str(first))
    assert done.returncode == 1, done.stderr
    assert read_report(first)[0]["kind"] == "rejected"
    again = tmp_path / "again.jsonl"
    done = invite_worker("run", str(first), "--sandbox", "--report", str(again))
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert "line 1 is a record of an invite-worker report (kind 'rejected')" in line
    assert f"invite-worker report failed {first} --output retry.csv" in line
    assert not again.exists()


@pytest.mark.parametrize("kind", ["batch", "revoked", "summary", ["a", "list"], {"a": 1}])
def test_an_input_rows_own_kind_field_is_not_taken_for_a_report(kind: object) -> None:
    """An input row with a ``kind`` field of its own (a report's kind name, or not a string
    at all) is an input row: only a record of a report's whole shape is refused."""
    row = {"token": "abcdefabcdef", "email": "a@example.com", "kind": kind}
    source = JsonlSource(io.BytesIO(json.dumps(row).encode() + b"\n"), "in.jsonl")
    assert source.description == "in.jsonl"  # read past its first object, not refused


def test_stdin_redirected_from_the_report_is_refused(sample: Path) -> None:
    """Case 1: ``run - --report in.csv < in.csv`` is the same file, told by its inode."""
    before = sample.read_bytes()
    with sample.open("rb") as stdin:
        done = invite_worker("run", "-", "--sandbox", "--report", str(sample), "--overwrite",
                             stdin=stdin.fileno())  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is the input standard input itself" in one_line(done)
    assert sample.read_bytes() == before


def test_overwrite_replaces_only_a_report_and_report_failed_never_its_input(
    sample: Path, tmp_path: Path
) -> None:
    """Case 1: --overwrite on a file that is not a report is refused; ``report failed``
    with --output the report itself (or another report, a journal, a lock) is refused,
    --overwrite or not, naming another --output (it named a --report)."""
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "notes"}\n')
    done = invite_worker("run", str(sample), "--sandbox", "--report", str(notes), "--overwrite")
    assert done.returncode == 2, done.stderr
    assert "is not a report" in one_line(done)
    assert notes.read_text() == '{"my": "notes"}\n'
    report = tmp_path / "r.jsonl"
    assert invite_worker("run", str(sample), "--sandbox", "--report", str(report)).returncode == 1
    before = report.read_bytes()
    done = invite_worker("report", "failed", str(report), "--output", str(report), "--overwrite")
    assert done.returncode == 2, done.stderr
    assert "is the report itself" in one_line(done)
    assert f"e.g. --output {tmp_path / 'r-failed.csv'}" in one_line(done)  # not --report
    assert report.read_bytes() == before
    # Nor another report, any report's journal or lock (an open send's only record).
    other = tmp_path / "other.jsonl"
    shutil.copy(report, other)
    for output in (other, tmp_path / "other.jsonl.journal", tmp_path / "other.jsonl.lock"):
        output.touch()
        kept = output.read_bytes()
        done = invite_worker("report", "failed", str(report), "--output", str(output),
                             "--overwrite")  # fmt: skip
        assert done.returncode == 2, (output, done.stderr)
        assert "is a report, or a report's journal or lock" in one_line(done)
        assert output.read_bytes() == kept
    # An earlier list of the failed is replaced, as asked.
    listed = tmp_path / "r-failed.csv"
    assert invite_worker("report", "failed", str(report), "--output", str(listed)).returncode == 0
    again = invite_worker("report", "failed", str(report), "--output", str(listed), "--overwrite")
    assert again.returncode == 0, again.stderr


def test_preflight_without_dry_run_sends_nothing(sample: Path, tmp_path: Path) -> None:
    """Case 2: --preflight without --dry-run is exit 2 naming --dry-run, even in the sandbox
    (it used to send 3 invitations there); no report is written."""
    report = tmp_path / "r.jsonl"
    done = invite_worker("run", str(sample), "--sandbox", "--preflight", "--report", str(report))
    assert done.returncode == 2, done.stderr
    assert "--preflight goes with --dry-run" in one_line(done)
    assert not report.exists()


@pytest.mark.parametrize("suffix", ["/api/v2", "/?x=1", "#top", "?", "/#"])
def test_an_api_url_with_a_path_is_refused_before_any_request(
    sample: Path, tmp_path: Path, start_emulator: Callable[..., str], suffix: str
) -> None:
    """Case 3: a base URL with a path, query or fragment is exit 2 naming the base URL to
    use; the service sees no request."""
    url = start_emulator()
    done = invite_worker("run", str(sample), "--api-url", url + suffix, "--report",
                         str(tmp_path / "r.jsonl"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"use --api-url {url}" in one_line(done)
    assert emulator_stats(url)["requests"] == 0


@pytest.mark.parametrize(("given", "says"), [
    ("", "--api-url is empty: give the base URL"),
    ("   ", "--api-url is empty: give the base URL"),
    (" http://127.0.0.1:8126 ", "--api-url has spaces around it"),
])  # fmt: skip
def test_an_empty_or_padded_api_url_is_refused_not_taken_for_the_site(
    sample: Path, tmp_path: Path, given: str, says: str
) -> None:
    """An --api-url given empty (a rehearsal's unset variable) is exit 2, never the
    site's URL in its place; one with spaces around it says so, not that its port is
    wrong. A dry run, so that not even a mistake here could reach the site."""
    done = invite_worker("run", str(sample), "--dry-run", "--api-url", given, "--report",
                         str(tmp_path / "r.jsonl"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert says in one_line(done)
    assert not (tmp_path / "r.jsonl").exists()


def test_a_dry_run_that_cannot_reach_the_api_is_told_to_run_as_it_was(
    sample: Path, tmp_path: Path
) -> None:
    """A dry run --preflight with nothing listening halts (exit 3) with advice it can
    follow: --resume is for a run of a file, which a dry run refuses."""
    url = f"http://127.0.0.1:{free_port()}"
    done = invite_worker("run", str(sample), "--dry-run", "--preflight", "--api-url", url,
                         "--report", str(tmp_path / "p.jsonl"))  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "a run of a file with --resume; a dry run as it was" in one_line(done)


def test_an_emulator_on_a_busy_port_says_to_choose_another() -> None:
    """invite-worker emulator on a port already taken: exit 2, naming --port."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = invite_worker("emulator", "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert "choose another --port, or --port 0 for a free one" in one_line(done)


def test_a_wrong_dd_api_url_is_named_as_the_variable_it_came_from(
    sample: Path, tmp_path: Path
) -> None:
    """A base URL from DD_API_URL that cannot be meant names DD_API_URL and how to set it,
    not --api-url; --sandbox with it set says to unset it. --api-url still wins over it."""
    report = str(tmp_path / "r.jsonl")
    wrong = invite_worker("run", str(sample), "--dry-run", "--report", report,
                          DD_API_URL="http://127.0.0.1:8126/proxy/")  # fmt: skip
    assert wrong.returncode == 2, wrong.stderr
    assert "DD_API_URL takes the base URL only" in one_line(wrong)
    assert "use DD_API_URL=http://127.0.0.1:8126" in one_line(wrong)
    sandbox = invite_worker("run", str(sample), "--sandbox", "--report", report,
                            DD_API_URL="http://127.0.0.1:8126")  # fmt: skip
    assert sandbox.returncode == 2, sandbox.stderr
    assert "unset DD_API_URL" in one_line(sandbox)
    given = invite_worker("run", str(sample), "--dry-run", "--report", report,
                          "--api-url", "http://127.0.0.1:8126/x",
                          DD_API_URL="http://127.0.0.1:8126")  # fmt: skip
    assert given.returncode == 2, given.stderr
    assert "--api-url takes the base URL only" in one_line(given)


def test_an_ipv6_api_url_with_a_path_is_told_the_base_url_in_brackets() -> None:
    """The base URL offered for an IPv6 --api-url with a path can be given back as is."""
    from worker.errors import UsageError
    from worker.urls import check_api_url

    with pytest.raises(UsageError, match=r"use --api-url http://\[::1\]:8126$"):
        check_api_url("http://[::1]:8126/x")


def test_an_unreachable_ipv6_api_is_named_as_it_is_written() -> None:
    """The message for an API that cannot be reached names an IPv6 host in brackets, so
    the URL it shows can be given back to --api-url."""
    from worker.send.reach import Reach

    assert Reach("http://[::1]:8126", (), None, 5.0).origin() == "http://[::1]:8126"
    assert Reach("https://api.datadoghq.eu", (), None, 5.0).origin() == (
        "https://api.datadoghq.eu:443")  # fmt: skip


@pytest.fixture
def not_an_api(tmp_path: Path) -> Iterator[str]:
    """A web server on loopback answering 404 to every GET (as a wrong base URL would)."""
    port, empty = free_port(), tmp_path / "empty"
    empty.mkdir()
    proc = Proc([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                 "--directory", str(empty)], tmp_path / "http.log")  # fmt: skip
    wait_for_port(port, proc.popen, "the web server", proc.log)
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def test_every_token_answering_404_is_a_wrong_url_left_for_resume(
    tmp_path: Path, not_an_api: str, start_emulator: Callable[..., str]
) -> None:
    """Case 3: a URL where every read answers 404 halts with exit 3 instead of refusing
    every token for good; --resume against the right URL then invites everyone once."""
    source, report = tmp_path / "in.csv", tmp_path / "r.jsonl"
    pairs = {(f"tok{i % 3}", f"u{i}@example.com") for i in range(30)}
    source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))
    done = invite_worker("run", str(source), "--api-url", not_an_api, "--report", str(report))
    assert done.returncode == 3, done.stderr
    assert "no Datadog API there" in done.stderr
    records = read_report(report)
    assert by_kind(records, "batch") == []  # nothing refused for good
    assert records[-1]["halted"]["code"] == "wrong_url"
    url = start_emulator()
    resumed = invite_worker("run", str(source), "--api-url", url, "--report", str(report),
                            "--resume")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    with urllib.request.urlopen(f"{url}/_emulator/invited", timeout=10) as resp:  # noqa: S310
        invited = {(t, e): n for t, e, n in json.loads(resp.read())}
    assert set(invited) == pairs
    assert set(invited.values()) == {1}


def test_a_dry_run_against_a_wrong_url_says_to_plan_again(tmp_path: Path, not_an_api: str) -> None:
    """A dry run with --preflight where every read answers 404 halts with exit 3, says to
    run the dry run again once the URL is right (not to --resume a real run), and ends its
    plan with a summary that says why; the next dry run replaces it."""
    source = tmp_path / "in.csv"
    source.write_text("token,email\ntok0,a@example.com\n")
    done = invite_worker("run", str(source), "--api-url", not_an_api, "--dry-run",
                         "--preflight", "--report", str(tmp_path / "plan.jsonl"))  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "no Datadog API there" in done.stderr
    assert "run the dry run again" in done.stderr
    assert "--resume" not in done.stderr
    summary = read_report(tmp_path / "plan.jsonl")[-1]  # the plan says why it stopped
    assert (summary["kind"], summary["dry_run"], summary["exit_code"]) == ("summary", True, 3)
    assert summary["halted"]["code"] == "wrong_url"
    again = invite_worker("run", str(source), "--dry-run", "--report", str(tmp_path / "plan.jsonl"))
    assert again.returncode == 0, again.stderr  # a halted plan is replaced as any plan is


def test_a_wrong_token_column_names_what_is_missing(tmp_path: Path) -> None:
    """Case 7: a wrong --token-column says that column is missing, not the email's."""
    source = tmp_path / "users.csv"
    source.write_text("dashboard_token,user_email\nt,a@example.com\n")
    done = invite_worker("run", str(source), "--sandbox", "--token-column", "dash_token",
                         "--email-column", "user_email")  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert "has no 'dash_token' column" in line
    assert "'user_email' column" not in line.split("(its columns")[0]


@pytest.mark.parametrize(
    ("content", "name", "args", "says"),
    [
        (b'{"dashboard": "t", "address": "a@example.com"}\n' * 3, "in.jsonl", (),
         "has no 'token' and no 'email' field (its fields: 'dashboard', 'address')"),
        (b"", "in.jsonl", (), "the input is empty"),
        (b"\n\n", "in.csv", (), "the input is empty"),
        (b"token,email\n\n", "in.csv", (), "a header (line 1) but no row"),
        (b'{"token": "t", "email": "a@example.com"}\n', "-", (), "pass --format jsonl"),
    ],
)  # fmt: skip
def test_jsonl_is_as_strict_as_csv(
    tmp_path: Path, content: bytes, name: str, args: tuple[str, ...], says: str
) -> None:
    """Case 6: other field names, an empty input in any format, and JSON on stdin without
    --format are each exit 2 with one line, before any row is sent or reported."""
    report = tmp_path / "r.jsonl"
    source = name if name == "-" else str(tmp_path / name)
    if name != "-":
        Path(source).write_bytes(content)
    done = invite_worker("run", source, "--dry-run", "--report", str(report), *args,
                         stdin=content if name == "-" else None)  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert says in line, line
    if "field" in says:
        assert "--token-column and --email-column" in line
    assert not report.exists()


def test_messages_point_the_right_way(sample: Path, tmp_path: Path) -> None:
    """Case 7: a folder as input or --report, a --report folder that does not exist, a CSV
    given to 'report summarize', and a bad --resend-after: one line each, saying so."""
    cases = [
        (("run", str(tmp_path), "--sandbox"), "is a folder; give the input file"),
        (("run", str(sample), "--sandbox", "--report", str(tmp_path)), "is a folder; name a file"),
        (("run", str(sample), "--sandbox", "--report", str(tmp_path / "no" / "r.jsonl")),
         "does not exist"),
        (("report", "summarize", str(sample)), "is not an invite-worker report"),
        (("run", str(sample), "--resend-after", "7days"), "not a duration: '7days'"),
    ]  # fmt: skip
    for args, says in cases:
        done = invite_worker(*args)
        assert done.returncode == 2, (args, done.stderr)
        line = one_line(done)
        assert says in line, (args, line)
        for misleading in ("lock", "crash", "usage:"):
            assert misleading not in line, (args, line)


def test_a_report_name_or_port_that_cannot_be_meant_is_refused(
    sample: Path, tmp_path: Path
) -> None:
    """A --report named as another report's journal or lock, an --api-url on port 0 (it
    would reach port 80), an emulator port out of range: exit 2, one line, nothing made."""
    cases = [
        (("run", str(sample), "--sandbox", "--report", str(tmp_path / "daily.jsonl.journal")),
         "the name a report's journal takes"),
        (("run", str(sample), "--sandbox", "--report", str(tmp_path / "daily.jsonl.lock")),
         "the name a report's lock takes"),
        (("run", str(sample), "--report", str(tmp_path / "r.jsonl"), "--api-url",
          "http://127.0.0.1:0"), "not a number from 1 to 65535"),
        (("run", str(sample), "--report", str(tmp_path / "r.jsonl"), "--api-url",
          "http://127.0.0.1:"), "not a number from 1 to 65535"),
        (("emulator", "--port", "99999"), "'99999' is not a port number from 0 to 65535"),
    ]  # fmt: skip
    for args, says in cases:
        done = invite_worker(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert says in one_line(done), (args, done.stderr)
    assert [p.name for p in tmp_path.iterdir()] == [sample.name]


@pytest.mark.parametrize("kind", ["device", "fifo"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_report_that_is_a_device_or_a_fifo_is_refused_untouched(
    sample: Path, tmp_path: Path, kind: str, dry_run: bool
) -> None:
    """A --report that is a device (/dev/null's kind) or a FIFO: exit 2 at once, one line,
    the node's mode unchanged and nothing made beside it (opening a FIFO to write waits
    for a reader, a device takes a chmod)."""
    node = tmp_path / "out" / "report"
    node.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(node, 0o644)
    elif os.geteuid() == 0:
        os.mknod(node, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    else:
        pytest.skip("making a device node needs root")
    os.chmod(node, 0o644)  # (past the umask)
    extra = ("--dry-run",) if dry_run else ()
    done = invite_worker("run", str(sample), "--sandbox", "--report", str(node), *extra,
                         timeout=30)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is not a regular file" in one_line(done)
    assert stat.S_IMODE(node.stat().st_mode) == 0o644
    assert [p.name for p in node.parent.iterdir()] == ["report"]


@pytest.mark.parametrize("beside", ["journal", "lock"])
def test_a_fifo_where_the_journal_or_lock_goes_is_refused_at_once(
    sample: Path, tmp_path: Path, beside: str
) -> None:
    """A FIFO named as the report's journal or lock (opening it to write would wait for a
    reader, deaf to SIGTERM): exit 2 at once, one line naming it, nothing else made."""
    report = tmp_path / "out" / "r.jsonl"
    report.parent.mkdir()
    os.mkfifo(report.with_name(f"r.jsonl.{beside}"))
    done = invite_worker("run", str(sample), "--sandbox", "--report", str(report), timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"the {beside} of --report" in one_line(done)
    assert [p.name for p in report.parent.iterdir()] == [f"r.jsonl.{beside}"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_report_that_is_where_stdout_goes_is_refused(
    sample: Path, tmp_path: Path, dry_run: bool
) -> None:
    """--report /dev/stdout with standard output sent to a file: exit 2, one line, the file
    left as it was (the plan printed there and the records would overwrite each other)."""
    out = tmp_path / "out.txt"
    with out.open("wb") as stdout:
        done = subprocess.run(
            worker_command("run", str(sample), "--sandbox", "--report", "/dev/stdout",
                           *(("--dry-run",) if dry_run else ()), "--log-format", "console"),
            env=clean_env(), cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True,
            timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is the file standard output goes to" in done.stderr
    assert out.read_bytes() == b""


def test_a_report_through_a_missing_folder_is_refused_leaving_nothing(
    sample: Path, tmp_path: Path
) -> None:
    """--report missing/../r.jsonl: the path goes through a folder that is not there (the
    system cannot open it): exit 2 naming it, and no lock left where the name seemed to
    point."""
    done = invite_worker("run", str(sample), "--sandbox", "--report", "missing/../r.jsonl",
                         cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "does not exist" in one_line(done)
    assert [p.name for p in tmp_path.iterdir()] == [sample.name]


def test_dry_runs_repeat_and_a_read_only_folder_says_where_to_write(
    sample: Path, tmp_path: Path
) -> None:
    """Case 8: a second dry run replaces the first one's plan (no --resume hint), and a run
    onto a plan is not told to --resume it; a dry run never replaces, nor continues
    (--resume), a real run's report; a dry run in a
    read-only folder names a writable --report, and that command works."""
    first = invite_worker("run", str(sample), "--dry-run", cwd=tmp_path)
    again = invite_worker("run", str(sample), "--dry-run", cwd=tmp_path)
    assert (first.returncode, again.returncode) == (1, 1), again.stderr
    plan = read_report(tmp_path / "invite-report.plan.jsonl")
    assert len(by_kind(plan, "summary")) == 1  # replaced, not appended to
    # A real run pointed at the plan: not told to --resume it (a plan is no run).
    onto = invite_worker("run", str(sample), "--sandbox", "--report",
                         str(tmp_path / "invite-report.plan.jsonl"))  # fmt: skip
    assert onto.returncode == 2, onto.stderr
    assert "holds a dry run's plan, not a run" in onto.stderr, onto.stderr
    assert "--resume" not in onto.stderr, onto.stderr
    real = tmp_path / "real.jsonl"
    assert invite_worker("run", str(sample), "--sandbox", "--report", str(real)).returncode == 1
    kept = invite_worker("run", str(sample), "--dry-run", "--report", str(real))
    assert kept.returncode == 2  # a real run's report is not a plan: never replaced silently
    assert "--overwrite to replace it with this plan" in one_line(kept)
    # Adding --dry-run to the daily --resume: refused as such, the report left as it was.
    before = real.read_bytes()
    resumed = invite_worker("run", str(sample), "--dry-run", "--resume", "--report", str(real))
    assert resumed.returncode == 2, resumed.stderr
    assert "never continues a report: drop --resume" in one_line(resumed)
    assert "--overwrite" not in one_line(resumed)
    assert real.read_bytes() == before
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "ro", "tmpfs",
                                        str(readonly)], check=False).returncode:  # fmt: skip
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        done = invite_worker("run", str(sample), "--dry-run", cwd=readonly)
        assert done.returncode == 2, done.stderr
        line = one_line(done)
        assert "Choose a writable folder, e.g. --report" in line, line
        suggested = line.rsplit("--report ", 1)[1].strip("'")
        Path(suggested).unlink(missing_ok=True)
        try:
            fine = invite_worker("run", str(sample), "--dry-run", "--report", suggested,
                                 cwd=readonly)  # fmt: skip
            assert fine.returncode == 1, fine.stderr
        finally:
            for leftover in (suggested, f"{suggested}.lock"):
                Path(leftover).unlink(missing_ok=True)
    finally:
        subprocess.run(["umount", "-l", str(readonly)], capture_output=True, check=False)


@pytest.mark.timeout(90)
async def test_a_mistyped_redis_url_or_stream_is_refused(
    tmp_path: Path, redis_server: str, redis: Redis, stream_name: str,
    start_emulator: Callable[..., str], spawn: Callable[..., Proc],
) -> None:  # fmt: skip
    """Case 4: a one-slash Redis URL, one with a query (?db=3 would beat /0), --until-empty
    or dead-letter on a stream that does not exist are exit 2 naming the streams that do
    (and create nothing); a long-lived worker still waits for its stream, which enqueue
    creates, saying which streams it may have meant."""
    await redis.xadd(stream_name, {"token": "tok", "email": "a@example.com"})
    # On a shared server the meant stream must still be named: hundreds of others, which
    # sort first and come before it in SCAN's order as likely as not.
    decoys = [f"a-decoy-{n}-{uuid.uuid4().hex[:8]}" for n in range(500)]
    async with redis.pipeline(transaction=False) as pipe:
        for decoy in decoys:
            pipe.xadd(decoy, {"token": "tok", "email": "a@example.com"})
        await pipe.execute()
    port = redis_server.rsplit(":", 1)[1].split("/")[0]
    typo = stream_name[:-1]
    cases = [
        (("run", f"redis:/127.0.0.1:{port}", "--stream", stream_name, "--until-empty",
          "--sandbox"), "names no host"),
        (("run", f"redis://127.0.0.1:{port}/0?db=3", "--stream", stream_name, "--until-empty",
          "--sandbox"), "has a query or fragment"),
        (("enqueue", str(ROOT / "sample_inputs" / "invites.csv"),
          f"redis://127.0.0.1:{port}/0?", "--stream", stream_name), "has a query or fragment"),
        (("run", redis_server, "--stream", typo, "--until-empty", "--sandbox"),
         f"no stream {typo!r} on that Redis server (the streams there: "),
        (("dead-letter", "list", redis_server, "--stream", typo), f"no stream {typo!r}"),
        (("dead-letter", "requeue", redis_server, "--stream", typo, "--all", "--dry-run"),
         f"no stream {typo!r}"),
    ]  # fmt: skip
    for args, says in cases:
        done = await asyncio.to_thread(invite_worker, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr, done.stderr
        if "the streams there" in says:
            assert stream_name in done.stderr
    await redis.delete(*decoys)
    assert not await redis.exists(typo)
    assert not await redis.exists(f"{typo}:dead")
    listed = await asyncio.to_thread(invite_worker, "dead-letter", "list", redis_server,
                                     "--stream", stream_name)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "0 dead letter(s)" in listed.stdout  # true: the stream is there, with none
    url, later = start_emulator(), f"{stream_name}-later"
    worker = spawn("run", redis_server, "--stream", later, "--linger", "0.05", "--api-url",
                   url, "--report", str(tmp_path / "w.jsonl"))  # fmt: skip
    deadline = time.monotonic() + 30  # it says so, naming the streams it may have meant
    while "queue.stream_created" not in (said := worker.stderr()):
        assert worker.popen.poll() is None, said
        assert time.monotonic() < deadline, said
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    assert worker.popen.poll() is None, worker.stderr()  # and waits for its stream
    [created] = [json.loads(line) for line in said.splitlines()
                 if '"queue.stream_created"' in line]  # fmt: skip
    assert stream_name in created["other_streams"], said
    source = tmp_path / "later.csv"
    source.write_text("token,email\ntok,later@example.com\n")
    await asyncio.to_thread(
        spawn("enqueue", str(source), redis_server, "--stream", later).expect, 0, 60
    )
    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(emulator_invited, url):
        assert time.monotonic() < deadline, worker.stderr()
        await asyncio.sleep(0.1)
    worker.popen.send_signal(signal.SIGTERM)
    await asyncio.to_thread(worker.expect, 3, 30)  # a stop: exit 3, as in file mode


def test_options_of_the_other_kind_of_source_are_refused(redis_server: str) -> None:
    """--resume with a stream (a queue worker always appends and re-reads its pending
    messages) and --stream or --until-empty with a file were silently ignored: each is
    exit 2, naming the option to drop, before anything is read."""
    sample = str(ROOT / "sample_inputs" / "invites.csv")
    cases = [
        (("run", redis_server, "--stream", "invites", "--resume", "--sandbox"),
         "--resume continues a file run's report"),
        (("run", sample, "--stream", "invites", "--sandbox"),
         "--stream is for a redis:// SOURCE (a stream)"),
        (("run", sample, "--until-empty", "--sandbox"),
         "--until-empty is for a redis:// SOURCE (a stream)"),
    ]  # fmt: skip
    for args, says in cases:
        done = invite_worker(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr


def test_a_redis_url_is_shown_as_it_can_be_written_back() -> None:
    """An IPv6 host keeps its brackets where the URL is shown (it was printed
    redis://::1:6379/0), and a port past 65535, 0 or none after the colon is named as out of
    range, not as "not a number" (nor taken as 6379)."""
    from worker.queue.options import StreamOptions

    assert StreamOptions(url="redis://[::1]:6379/0", stream="s").where == "redis://[::1]:6379/0#s"
    # 0 or nothing after the colon: redis would quietly take 6379, another server.
    for port in ("99999", "0", ""):
        url = f"redis://127.0.0.1:{port}/0"
        done = invite_worker("enqueue", "-", url, "--stream", "s", stdin=b"")
        assert done.returncode == 2, (port, done.stderr)
        assert "has a port that is not a number from 1 to 65535" in done.stderr, done.stderr


def test_durations_are_plain_numbers_and_access_lasts_at_least_a_minute() -> None:
    """--access-expires under a minute (0.4s made an entry already expired when the
    request landed) and numbers float() takes but nobody writes (1e3, 1_000, other
    scripts' digits) are exit 2, naming the value; 90m still goes."""
    sample = str(ROOT / "sample_inputs" / "invites.csv")
    for value, says in (("0.4s", "within a minute"), ("30s", "within a minute"),
                        ("1e3s", "not a duration"), ("1_000s", "not a duration"),
                        ("\u0663d", "not a duration")):  # fmt: skip
        done = invite_worker("run", sample, "--sandbox", "--add-invitees",
                             f"--access-expires={value}", "--dry-run")  # fmt: skip
        assert done.returncode == 2, (value, done.stderr)
        assert says in done.stderr, done.stderr
    done = invite_worker("run", sample, "--sandbox", "--resend-after=1e3s", "--dry-run")
    assert done.returncode == 2, done.stderr
    done = invite_worker("run", sample, "--sandbox", "--add-invitees", "--access-expires=90m",
                         "--dry-run", "--report", "/dev/null/never")  # fmt: skip
    assert "--access-expires" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("option", "field"),
    [("--reconcile-delay", "reconcile_delay"), ("--grace", "grace"), ("--timeout", "timeout"),
     ("--max-wait", "max_wait"), ("--linger", "linger"), ("--progress-every", "progress_every")],
)  # fmt: skip
@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0])
def test_a_duration_that_is_endless_or_not_a_number_is_refused(
    make_config: Callable[..., Config], option: str, field: str, value: float
) -> None:
    """inf, NaN or a negative duration is a usage error naming the option: an endless
    --reconcile-delay once hung a run at its first 5xx, and NaN passed every check."""
    with pytest.raises(UsageError, match=rf"^{option} must be .* seconds.*, got {value}"):
        make_config(**{field: value})


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_an_endless_claim_idle_is_refused(value: float) -> None:
    """--claim-idle inf would leave a dead worker's messages unclaimed for ever."""
    with pytest.raises(UsageError, match=r"^--claim-idle must be a positive number"):
        StreamOptions(url="redis://127.0.0.1:6390/0", stream="s", claim_idle=value)


def test_reconcile_delay_inf_is_exit_2_before_anything_is_read(
    sample: Path, tmp_path: Path
) -> None:
    """On the command line: exit 2 and one line naming the option, no report made."""
    done = invite_worker("run", str(sample), "--sandbox", "--reconcile-delay", "inf",
                         "--report", str(tmp_path / "r.jsonl"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--reconcile-delay must be a number of seconds, 0 or more, got inf" in one_line(done)
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--resend-after", "-1d"), ("--access-expires", "-5m")]
)
def test_a_negative_duration_is_named_not_taken_for_a_missing_value(
    sample: Path, tmp_path: Path, option: str, value: str
) -> None:
    """argparse reads '-1d' as an option, so it said "expected one argument" of an option
    given one: the message names the negative value and a positive example."""
    done = invite_worker("run", str(sample), "--sandbox", "--add-invitees", option, value,
                         "--report", str(tmp_path / "r.jsonl"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert f"argument {option}: '{value}' is negative; use e.g. {option} {value[1:]}" in line
    assert not (tmp_path / "r.jsonl").exists()
