"""How much a run says: quiet on a terminal, -v/-q/--log-level, every info event in JSON."""

from __future__ import annotations

import logging
import re
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import structlog

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    on_a_terminal,
    worker_command,
    worker_env,
)
from worker.cli import build_parser
from worker.logs import choose_level

KEYS = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}


def write_rows(path: Path, rows: int, *, gone: int = 0) -> Path:
    """``rows`` addresses for a fresh token, plus ``gone`` for a token the service lacks."""
    token, missing = f"tok-{uuid.uuid4().hex[:10]}", f"gone-{uuid.uuid4().hex[:10]}"
    lines = [f"{token},u{i}@example.com\n" for i in range(rows)]
    lines += [f"{missing},g{i}@example.com\n" for i in range(gone)]
    path.write_text("token,email\n" + "".join(lines))
    return path


def plain(seen: bytes) -> str:
    """What a terminal showed, without colours, one line per redraw."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode()).replace("\r", "\n")


def run_on_terminal(tmp_path: Path, url: str, source: Path, *flags: str) -> tuple[int, str]:
    """``run SOURCE`` against ``url`` with stderr on a pseudo-terminal."""
    report = tmp_path / f"report-{uuid.uuid4().hex[:6]}.jsonl"
    code, seen = on_a_terminal(
        worker_command("run", str(source), "--api-url", url, "--report", str(report),
                       "--batch-size", "50", *flags),
    )  # fmt: skip
    return code, plain(seen)


def run_piped(
    url: str, source: Path, report: Path, *flags: str
) -> tuple[int, list[dict[str, object]]]:
    """``run SOURCE`` with stderr on a pipe: its JSON events."""
    done = subprocess.run(
        worker_command("run", str(source), "--api-url", url, "--report", str(report),
                       "--batch-size", "50", *flags),
        env=worker_env(**KEYS), cwd=ROOT, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, [msgspec.json.decode(line) for line in done.stderr.splitlines()]


@pytest.mark.timeout(120)
def test_a_terminal_run_of_5000_rows_shows_no_batch_line_and_verbose_shows_each(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """5,000 rows at batch 50 on a pty: the bar and the table, no batch.sent; -v: 100 of them."""
    url = start_emulator()
    code, shown = run_on_terminal(tmp_path, url, write_rows(tmp_path / "a.csv", 5000))
    assert code == 0, shown[-3000:]
    assert "batch.sent" not in shown
    assert "run.started" not in shown  # info: the bar and the table say it
    assert "invites:" in shown  # the bar
    assert "5,000/5,000" in shown or "5000/5000" in shown
    assert "Done: " in shown
    assert "Next: nothing: everyone is invited" in shown

    code, shown = run_on_terminal(tmp_path, url, write_rows(tmp_path / "b.csv", 5000), "-v")
    assert code == 0, shown[-3000:]
    assert shown.count("batch.sent") == 100
    assert "invites:" in shown
    assert "Done: " in shown


@pytest.mark.timeout(120)
def test_a_terminal_run_shows_warnings_and_quiet_keeps_only_errors_and_the_table(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Default: a refusal's warning shows; -q: no warning, no bar, errors and the table do."""
    url = start_emulator()
    code, shown = run_on_terminal(tmp_path, url, write_rows(tmp_path / "a.csv", 100, gone=3))
    assert code == 1, shown[-3000:]
    assert "batch.refused" in shown
    assert "batch.sent" not in shown

    code, shown = run_on_terminal(tmp_path, url, write_rows(tmp_path / "b.csv", 100, gone=3), "-q")
    assert code == 1, shown[-3000:]
    assert "batch.refused" not in shown
    assert "invites:" not in shown  # no bar
    assert "Done: " in shown
    assert "refused: token_not_found  3" in shown

    wrong = tmp_path / "wrong-key"
    wrong.write_text("not-the-api-key-at-all\n")
    code, shown = run_on_terminal(
        tmp_path, url, write_rows(tmp_path / "c.csv", 100), "-q", "--api-key-file", str(wrong)
    )
    assert code == 3, shown[-3000:]
    assert "run.aborting" in shown  # an error is shown even with -q
    assert "Halted: " in shown  # the table, headed with what happened


@pytest.mark.timeout(120)
def test_json_mode_keeps_every_info_event_and_quiet_keeps_the_summary_event(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Off a terminal: batch.sent as before; -q: errors and run.finished; warning: no info."""
    url = start_emulator()

    def events(*flags: str) -> tuple[int, list[str]]:
        source = write_rows(tmp_path / f"{uuid.uuid4().hex[:6]}.csv", 500, gone=3)
        code, lines = run_piped(url, source, tmp_path / f"{uuid.uuid4().hex[:6]}.jsonl", *flags)
        return code, [str(e["event"]) for e in lines]

    code, names = events()
    assert code == 1
    assert names.count("batch.sent") == 10
    assert {"run.started", "batch.refused", "run.finished"} <= set(names)

    code, names = events("--log-format", "json", "-q")
    assert code == 1
    assert names == ["run.finished"]

    code, names = events("--log-level", "warning")
    assert code == 1
    assert "batch.sent" not in names
    assert "run.started" not in names
    assert {"batch.refused", "run.finished"} <= set(names)


def test_every_logging_command_takes_v_q_and_log_level_but_not_two_at_once(
    tmp_path: Path,
) -> None:
    """run, enqueue, dead-letter and emulator take -v, -q and --log-level; two of them
    together (or an unknown level) is exit 2 before anything runs."""
    parser = build_parser()
    commands = [
        ["run", "x.csv"],
        ["enqueue", "x.csv", "redis://127.0.0.1:1/0", "--stream", "s"],
        ["dead-letter", "list", "redis://127.0.0.1:1/0", "--stream", "s"],
        ["emulator"],
    ]
    for command in commands:
        assert parser.parse_args([*command, "-v"]).verbose, command
        assert parser.parse_args([*command, "--quiet"]).quiet, command
        assert parser.parse_args([*command, "--log-level", "error"]).log_level == "error"
    for flags in (["-v", "-q"], ["-q", "--log-level", "info"], ["--log-level", "loud"]):
        done = subprocess.run(
            worker_command("run", str(tmp_path / "x.csv"), "--sandbox", *flags),
            env=worker_env(), cwd=ROOT, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2, (flags, done.stderr.decode())


@pytest.mark.parametrize(
    ("watched", "flags", "level"),
    [
        (True, {}, logging.WARNING),
        (True, {"verbose": True}, logging.INFO),
        (True, {"quiet": True}, logging.ERROR),
        (True, {"log_level": "debug"}, logging.DEBUG),
        (False, {}, logging.INFO),
        (False, {"quiet": True}, logging.ERROR),
        (False, {"log_level": "warning"}, logging.WARNING),
    ],
)
def test_the_level_follows_the_options_and_who_watches(
    watched: bool, flags: dict[str, object], level: int
) -> None:
    """A watched run defaults to warnings, anything else to info; the options override."""
    assert choose_level(watched=watched, **flags) == level  # type: ignore[arg-type]


def test_a_dry_run_on_a_terminal_prints_its_plan_without_the_plan_event(tmp_path: Path) -> None:
    """A dry run watched on a terminal (even with -q) shows no plan.ready line, whose fields
    the printed plan says; piped, the plan.ready event is there for machines."""
    source = write_rows(tmp_path / "a.csv", 10)
    for flags in ((), ("-q",)):
        plan = tmp_path / "plan.jsonl"
        argv = worker_command("run", str(source), "--dry-run", "--report", str(plan), *flags)
        code, seen = on_a_terminal(argv)
        assert code == 0, plain(seen)[-3000:]
        assert "plan.ready" not in plain(seen)
    done = subprocess.run(
        worker_command("run", str(source), "--dry-run", "--report", str(tmp_path / "plan.jsonl")),
        env=worker_env(), cwd=ROOT, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = [msgspec.json.decode(line) for line in done.stderr.splitlines()]
    assert [e["event"] for e in events if e["event"] == "plan.ready"] == ["plan.ready"]
    assert "Dry run of" in done.stdout.decode()


class _Writes:
    """A stand-in for stderr that keeps each write() apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_log_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A log line reaches stderr in one write, newline included: processes sharing one
    stderr (a container's log) never split each other's lines."""
    from worker import logs

    seen = _Writes()
    monkeypatch.setattr("sys.stderr", seen)
    logs.configure("json")
    structlog.get_logger("test").warning("batch.refused", token="t", emails=3)
    assert len(seen.writes) == 1
    line = seen.writes[0]
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert msgspec.json.decode(line)["event"] == "batch.refused"
