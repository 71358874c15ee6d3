"""The command line as people use it: a real process, exit codes, stderr, the report."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    by_kind,
    read_report,
    worker_command,
    worker_env,
)
from worker import __version__
from worker.cli import build_parser

SAMPLES = ROOT / "sample_inputs"


def invite_worker(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m worker`` with a clean environment (no DD_* from the caller)."""
    return subprocess.run(
        worker_command(*args),
        env=worker_env(**(env or {})),
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture
def emulator_process(start_emulator: Callable[..., str]) -> str:
    """A standalone emulator expecting the test keys."""
    return start_emulator()


def test_sandbox_runs_the_csv_sample(tmp_path: Path) -> None:
    """The README's first command: the sample through --sandbox, exit 1 for its bad rows;
    the sandbox's dashboards make it show every outcome: sent, skipped, refused."""
    report = tmp_path / "r.jsonl"
    done = invite_worker("run", str(SAMPLES / "invites.csv"), "--sandbox", "--report", str(report))
    assert done.returncode == 1, done.stderr.decode()
    records = read_report(report)
    assert {r["line"]: r["reason"] for r in by_kind(records, "rejected")} == {
        5: "duplicate",
        9: "invalid_email",
        10: "invalid_token",
    }
    summary = records[-1]
    assert (summary["emails_sent"], summary["emails_failed"]) == (3, 2)
    assert summary["skipped_by_reason"] == {"active_session": 1, "already_invited": 1}
    failed = {b["error"]["code"] for b in by_kind(records, "batch") if b["status"] == "failed"}
    assert failed == {"not_on_share_list", "token_not_found"}
    for line in done.stderr.decode().splitlines():  # not a terminal: JSON lines
        event = msgspec.json.decode(line)
        assert "event" in event
        assert "level" in event


def test_sandbox_reads_jsonl_from_stdin(tmp_path: Path) -> None:
    """SOURCE '-' with --format jsonl reads standard input."""
    report = tmp_path / "r.jsonl"
    done = invite_worker(
        "run",
        "-",
        "--format",
        "jsonl",
        "--sandbox",
        "--report",
        str(report),
        stdin=(SAMPLES / "invites.jsonl").read_bytes(),
    )
    assert done.returncode == 1, done.stderr.decode()
    records = read_report(report)
    reasons = sorted(r["reason"] for r in by_kind(records, "rejected"))
    assert reasons == ["duplicate", "invalid_json", "not_a_string", "not_an_object"]
    assert records[-1]["emails_sent"] == 4


def test_standalone_emulator_and_keys_from_the_environment(
    tmp_path: Path, emulator_process: str
) -> None:
    """A separate emulator process, keys from DD_API_KEY/DD_APP_KEY, a clean run: exit 0."""
    source = tmp_path / "in.csv"
    source.write_text(
        "email,token\n" + "".join(f"u{i}@example.com,tok-{i % 3}\n" for i in range(250))
    )
    report = tmp_path / "r.jsonl"
    done = invite_worker(
        "run",
        str(source),
        "--report",
        str(report),
        "--batch-size",
        "20",
        env={"DD_API_URL": emulator_process, "DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY},
    )
    assert done.returncode == 0, done.stderr.decode()
    assert read_report(report)[-1]["emails_sent"] == 250
    assert API_KEY.encode() not in done.stderr
    assert APP_KEY.encode() not in done.stderr


def test_wrong_keys_exit_3_with_a_reason(tmp_path: Path, emulator_process: str) -> None:
    """Refused keys stop the run with exit 3 and say which settings to check."""
    report = tmp_path / "r.jsonl"
    done = invite_worker(
        "run",
        str(SAMPLES / "invites.csv"),
        "--api-url",
        emulator_process,
        "--report",
        str(report),
        env={"DD_API_KEY": "nope-api", "DD_APP_KEY": "nope-app"},
    )
    assert done.returncode == 3, done.stderr.decode()
    stderr = done.stderr.decode()
    assert "DD_API_KEY" in stderr
    assert "run.aborted" in stderr
    assert "nope-api" not in stderr
    assert "nope-app" not in report.read_text()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--site", "datadoghq.moon"],
            {"DD_API_KEY": "k", "DD_APP_KEY": "a"},
            "unknown Datadog site",
        ),
        (["--api-url", "http://127.0.0.1:9"], {}, "DD_API_KEY"),
        (
            ["--api-url", "http://example.invalid:8080"],
            {"DD_API_KEY": "k", "DD_APP_KEY": "a"},
            "plain HTTP",
        ),
        (["--sandbox", "--api-url", "http://127.0.0.1:9"], {}, "drop --api-url"),
        (["--sandbox", "--batch-size", "0"], {}, "--batch-size"),
    ],
)
def test_usage_errors_exit_2_before_anything_is_sent(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    """Bad options or configuration: exit 2, a one-line reason, no report written."""
    report = tmp_path / "r.jsonl"
    done = invite_worker(
        "run", str(SAMPLES / "invites.csv"), "--report", str(report), *args, env=env
    )
    assert done.returncode == 2, done.stderr.decode()
    assert message in done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert not report.exists() or report.stat().st_size == 0


def test_missing_header_is_a_usage_error(tmp_path: Path) -> None:
    """A CSV without token/email columns exits 2 and names the fix."""
    source = tmp_path / "in.csv"
    source.write_text("dashboard,address\nt,a@example.com\n")
    done = invite_worker("run", str(source), "--sandbox", "--report", str(tmp_path / "r.jsonl"))
    assert done.returncode == 2, done.stderr.decode()
    assert "'token'" in done.stderr.decode()
    assert "'email'" in done.stderr.decode()


def test_console_logs_when_asked(tmp_path: Path) -> None:
    """--log-format console prints readable lines instead of JSON."""
    done = invite_worker(
        "run",
        str(SAMPLES / "invites.csv"),
        "--sandbox",
        "--log-format",
        "console",
        "--report",
        str(tmp_path / "r.jsonl"),
    )
    first = done.stderr.decode().splitlines()[0]
    assert "sandbox.started" in first
    assert not first.startswith("{")


def test_a_dry_run_never_reads_a_stream(tmp_path: Path) -> None:
    """--dry-run with a redis:// source is refused (exit 2) rather than run for real."""
    done = invite_worker("run", "redis://127.0.0.1:9/0", "--stream", "s", "--dry-run",
                         "--sandbox", "--report", str(tmp_path / "r.jsonl"))  # fmt: skip
    assert done.returncode == 2, done.stderr.decode()
    assert b"--dry-run plans a file" in done.stderr


def test_version_and_quiet_broken_pipes(tmp_path: Path) -> None:
    """--version prints the version; report summarize piped into a reader that stops early
    ends quietly, without a BrokenPipeError traceback."""
    done = invite_worker("--version")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == f"invite-worker {__version__}"
    report = tmp_path / "r.jsonl"
    invite_worker("run", str(SAMPLES / "invites.csv"), "--sandbox", "--report", str(report))
    reader = subprocess.Popen(
        worker_command("report", "summarize", str(report)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker_env(), cwd=ROOT,
    )  # fmt: skip
    assert reader.stdout is not None
    reader.stdout.close()  # the reader is gone before the first line is written
    _, stderr = reader.communicate(timeout=30)
    assert reader.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr


def test_report_failed_keeps_an_existing_file_and_summarize_refuses_a_non_report(
    tmp_path: Path,
) -> None:
    """report failed will not replace a file without --overwrite (exit 2), and --output -
    is standard output; report summarize on a file that is not a report says so and
    exits 2."""
    report = tmp_path / "r.jsonl"
    invite_worker("run", str(SAMPLES / "invites.csv"), "--sandbox", "--report", str(report))
    existing = tmp_path / "failed.csv"
    existing.write_text("keep me\n")
    refused = invite_worker("report", "failed", str(report), "--output", str(existing))
    assert refused.returncode == 2, refused.stderr.decode()
    assert b"--overwrite" in refused.stderr
    assert existing.read_text() == "keep me\n"
    replaced = invite_worker("report", "failed", str(report), "--output", str(existing),
                             "--overwrite")  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr.decode()
    assert existing.read_text().startswith("token,email,error_code,error_message\n")
    # --output - is standard output, as - is for an input (it wrote a file named "-").
    dashed = invite_worker("report", "failed", str(report), "--output", "-")
    assert dashed.returncode == 0, dashed.stderr.decode()
    assert dashed.stdout.decode() == existing.read_text()
    assert not Path("-").exists()  # in the directory the command ran in
    not_a_report = tmp_path / "invites.csv"
    not_a_report.write_text("token,email\nt,a@example.com\n")
    done = invite_worker("report", "summarize", str(not_a_report))
    assert done.returncode == 2, done.stderr.decode()
    assert b"is not an invite-worker report" in done.stderr


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_token_and_email_columns_can_be_named(tmp_path: Path, fmt: str) -> None:
    """--token-column/--email-column read a CSV (any case) or JSONL with other names."""
    token = "k9x2mmq7rt5vbc1a-77c1e0f4a2b94e6d8f0a1b2c3d4e5f60"
    if fmt == "csv":
        body = f"Dashboard_Token,user_email,name\n{token},barbara@example.com,Barbara\n"
    else:
        body = json.dumps({"dashboard_token": token, "user_email": "barbara@example.com"}) + "\n"
    source = tmp_path / f"in.{fmt}"
    source.write_text(body)
    report = tmp_path / "r.jsonl"
    names = ("--token-column", "dashboard_token", "--email-column", "user_email")
    done = invite_worker("run", str(source), "--sandbox", "--report", str(report), *names)
    assert done.returncode == 0, done.stderr.decode()
    assert read_report(report)[-1]["emails_sent"] == 1


def test_a_header_without_the_columns_suggests_naming_them(tmp_path: Path) -> None:
    """A CSV whose columns have other names: exit 2, and the message says how to name them."""
    source = tmp_path / "in.csv"
    source.write_text("dashboard_token,user_email\nt,a@example.com\n")
    done = invite_worker("run", str(source), "--sandbox", "--report", str(tmp_path / "r.jsonl"))
    assert done.returncode == 2, done.stderr.decode()
    assert b"--token-column and --email-column" in done.stderr


def test_a_plain_dry_run_does_not_block_the_run_that_follows(tmp_path: Path) -> None:
    """Without --report, a dry run writes its plan beside the default report and says
    where; the real run that follows starts without --overwrite."""
    source = tmp_path / "in.csv"
    source.write_text("token,email\nk9x2mmq7rt5vbc1a-77c1e0f4a2b94e6d8f0a1b2c3d4e5f60,"
                      "barbara@example.com\n")  # fmt: skip
    env = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}
    plan = subprocess.run(
        worker_command("run", str(source), "--dry-run"),
        cwd=tmp_path, env=worker_env(**env), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr.decode()
    assert b"the plan is in invite-report.plan.jsonl" in plan.stdout
    assert (tmp_path / "invite-report.plan.jsonl").exists()
    assert not (tmp_path / "invite-report.jsonl").exists()
    done = subprocess.run(
        worker_command("run", str(source), "--sandbox"),
        cwd=tmp_path, env=worker_env(), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "invite-report.jsonl").exists()


def test_sandbox_checks_its_input_before_the_emulator_starts(tmp_path: Path) -> None:
    """A CSV without the columns fails at once (exit 2): no emulator is started for it."""
    source = tmp_path / "in.csv"
    source.write_text("who,what\nx,y\n")
    done = invite_worker("run", str(source), "--sandbox", "--report", str(tmp_path / "r.jsonl"))
    assert done.returncode == 2, done.stderr.decode()
    assert b"sandbox.started" not in done.stderr


def test_no_arguments_lists_the_commands() -> None:
    """invite-worker alone lists every command on one line, and how to learn more."""
    done = invite_worker()
    assert done.returncode == 2, done.stderr.decode()
    listed = done.stdout.decode()
    for command in ("run", "enqueue", "dead-letter", "report", "emulator"):
        assert f"\n  {command} " in listed
    assert "--help" in listed


def command_parsers(
    parser: argparse.ArgumentParser, path: str = "invite-worker"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and sub-command parser under ``parser``, with its command line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}", sub
                yield from command_parsers(sub, f"{path} {name}")


def test_every_command_and_option_has_a_description_its_default_and_an_example() -> None:
    """--help of each command: a description, examples of whole commands; each option
    explained, with an example when it takes a value, and its default when it has one."""
    commands = dict(command_parsers(build_parser()))
    assert {"invite-worker run", "invite-worker enqueue", "invite-worker dead-letter list",
            "invite-worker dead-letter requeue", "invite-worker report summarize",
            "invite-worker report failed", "invite-worker emulator"} <= set(commands)  # fmt: skip
    for name, parser in commands.items():
        assert parser.description, name
        assert parser.epilog is not None, name
        assert parser.epilog.startswith("examples:\n  "), name
        assert "invite-worker " in parser.epilog, name
        shown = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            label = f"{name} {action.option_strings or action.dest}"
            assert action.help, label
            if action.nargs != 0 and action.choices is None:
                assert "e.g. " in action.help, label
            if action.option_strings and action.default not in (None, False, "", []):
                assert f"(default: {action.default})" in shown, label
