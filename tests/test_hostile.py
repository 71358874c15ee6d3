"""Hostile input, secrets and the shipped install: no crash, no lost row, no leaked key."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    by_kind,
    emulator_invited,
    read_report,
    worker_command,
    worker_env,
)
from worker.errors import UsageError
from worker.record.journal import journal_path
from worker.sources import open_source
from worker.sources.lines import Row

TOKEN = "good-token_1"

# Arbitrary bytes, with line breaks, quotes, delimiters and NULs over-represented.
hostile_bytes = st.lists(
    st.one_of(
        st.binary(max_size=20),
        st.sampled_from([b"\n", b"\r\n", b'"', b",", b";", b"\x00", b"\xef\xbb\xbf", b"\xff",
                         b" ", b"{", b"}", b"[", b"null"]),
    ),
    max_size=60,
).map(b"".join)  # fmt: skip


def rows_of(source_bytes: bytes, fmt: str) -> list[Row]:
    """All raw rows the reader yields (driving the blocking parser directly)."""
    source = open_source("-", fmt, stdin=io.BytesIO(source_bytes))
    rows: list[Row] = []
    while (chunk := source._parse_chunk()) is not None:  # type: ignore[attr-defined]
        rows.extend(chunk)
    return rows


def non_blank_lines(data: bytes, skip_header: bool) -> list[int]:
    """1-based numbers of the lines holding more than ASCII whitespace."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    numbers = [n for n, line in enumerate(lines, 1) if line.strip()]
    return numbers[1:] if skip_header else numbers


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=hostile_bytes)
def test_csv_reader_accounts_for_every_line_of_arbitrary_bytes(body: bytes) -> None:
    """Property: after a good header, every non-blank line is one row (or one rejection).

    (A last good row keeps the input from being a header alone, which is refused.)"""
    data = b"token,email\n" + body + b"\nt,a@example.com\n"
    rows = rows_of(data, "csv")
    assert [r[0] for r in rows] == non_blank_lines(data, skip_header=True)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=hostile_bytes)
def test_jsonl_reader_accounts_for_every_line_of_arbitrary_bytes(body: bytes) -> None:
    """Property: after a good first object (whose field names are checked, as a CSV header
    is), every non-blank JSONL line is one row, parsed or rejected, never an error."""
    data = b'{"token": "t", "email": "a@example.com"}\n' + body
    rows = rows_of(data, "jsonl")
    assert [r[0] for r in rows] == non_blank_lines(data, skip_header=False)
    for _, token, email, reason in rows:
        assert reason is not None or (isinstance(token, str) and isinstance(email, str))


@given(header=hostile_bytes)
def test_any_header_is_either_read_or_a_usage_error(header: bytes) -> None:
    """Property: a garbage header never raises anything but a clear UsageError."""
    try:
        rows_of(header + b"\nt,a@example.com\n", "csv")
    except UsageError as exc:
        message = str(exc)
    else:
        return  # the garbage happened to name token and email columns
    assert "header" in message or "empty" in message


@given(first=hostile_bytes)
def test_any_first_jsonl_line_is_either_read_or_a_usage_error(first: bytes) -> None:
    """Property: a garbage first JSONL line never raises anything but a clear UsageError."""
    try:
        rows_of(first + b'\n{"token": "t", "email": "a@example.com"}\n', "jsonl")
    except UsageError as exc:
        message = str(exc)
    else:
        return  # the garbage happened to be an object with both fields, or blank
    assert "JSON object" in message or "first object" in message or "empty" in message


def hostile_corpus(tmp_path: Path) -> tuple[Path, Path, set[tuple[str, str]], set[int], set[int]]:
    """A CSV and a JSONL of the cases spreadsheets and scripts produce, and what is good."""
    good: set[tuple[str, str]] = set()
    csv_lines: list[bytes] = [b"\xef\xbb\xbfEmail;TOKEN;Notes"]  # BOM, case, ';', extra column
    bad_csv: set[int] = set()

    def csv_row(raw: bytes, ok: tuple[str, str] | None = None) -> None:
        csv_lines.append(raw)
        if ok:
            good.add(ok)
        else:
            bad_csv.add(len(csv_lines))

    csv_row(b"a1@example.com;good-token_1;plain", ("good-token_1", "a1@example.com"))
    csv_row(b'"a2@example.com";"good-token_1";"quoted; with delimiter"',
            ("good-token_1", "a2@example.com"))  # fmt: skip
    csv_row(b'a3@example.com;good-token_1;"unbalanced')
    csv_row(
        b"a4@example.com;good-token_1;after the broken quote", ("good-token_1", "a4@example.com")
    )
    csv_row(b"caf\xe9@example.com;good-token_1;latin-1")
    csv_row(b"a5@example.com;good\x00token;nul in token")
    csv_row(b"x" * (3 * 1024 * 1024))  # a 3 MB garbage line
    csv_row(b"a6@example.com")  # too few fields
    csv_row(b"a7@example.com;good-token_1;x;surplus")  # too many fields
    for i, token in enumerate(["../etc", "a/b", "a?b=1", "a#b", "a%2Fb", "a b", "t\xc3\xb6k"]):
        csv_row(f"p{i}@example.com;{token};path games".encode())
    csv_row(b"  a8@example.com  ;  good-token_1  ;trimmed", ("good-token_1", "a8@example.com"))
    csv_path = tmp_path / "hostile.csv"
    csv_path.write_bytes(b"\r\n".join(csv_lines) + b"\r\n")

    jsonl_lines: list[bytes] = []
    bad_jsonl: set[int] = set()

    def jsonl_row(raw: bytes, ok: tuple[str, str] | None = None) -> None:
        jsonl_lines.append(raw)
        if ok:
            good.add(ok)
        else:
            bad_jsonl.add(len(jsonl_lines))

    jsonl_row(
        b'{"token": "good-token_2", "email": "j1@example.com"}', ("good-token_2", "j1@example.com")
    )
    for raw in (
        b'["good-token_2", "j2@example.com"]',
        b"42",
        b"null",
        b'{"token": "good-',
        b'{"token": 5, "email": "j3@example.com"}',
        b'{"token": "good-token_2"}',
        b'{"token": "good-token_2", "email": ["j4@example.com"]}',
        b"\xff\xfe{}",
    ):
        jsonl_row(raw)  # fmt: skip
    jsonl_row(b'{"email": "j5@example.com", "token": "good-token_2", "x": {"nested": true}}',
              ("good-token_2", "j5@example.com"))  # fmt: skip
    jsonl_path = tmp_path / "hostile.jsonl"
    jsonl_path.write_bytes(b"\n".join(jsonl_lines) + b"\n\n")
    return csv_path, jsonl_path, good, bad_csv, bad_jsonl


def test_a_hostile_corpus_invites_the_good_and_reports_the_bad(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Exit 1, no traceback, every good row invited, every bad row reported with its line,
    and no request to any path but the invitation endpoint."""
    url = start_emulator()
    csv_path, jsonl_path, good, bad_csv, bad_jsonl = hostile_corpus(tmp_path)
    env = worker_env(DD_API_KEY=API_KEY, DD_APP_KEY=APP_KEY)
    for source, bad in ((csv_path, bad_csv), (jsonl_path, bad_jsonl)):
        report = tmp_path / f"{source.suffix[1:]}-report.jsonl"
        done = subprocess.run(
            worker_command("run", str(source), "--api-url", url, "--report", str(report)),
            env=env, capture_output=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr.decode()
        assert b"Traceback" not in done.stderr
        rejected = {r["line"] for r in by_kind(read_report(report), "rejected")}
        assert rejected == bad
    assert set(emulator_invited(url)) == good
    with __import__("urllib.request").request.urlopen(f"{url}/_emulator/stats") as resp:
        assert json.loads(resp.read())["other_paths"] == []


def test_keys_from_files_and_nowhere_else(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """DD_*_KEY_FILE and --*-key-file work (trailing newline dropped); keys never appear in
    output, report or journal; report and journal are owner-only."""
    url = start_emulator()
    (tmp_path / "api").write_text(API_KEY + "\n")
    (tmp_path / "app").write_text(APP_KEY + "\r\n")
    source = tmp_path / "in.csv"
    source.write_text(f"token,email\n{TOKEN},k@example.com\n")
    report = tmp_path / "r.jsonl"
    for extra, env in (
        ([], {"DD_API_KEY_FILE": str(tmp_path / "api"), "DD_APP_KEY_FILE": str(tmp_path / "app")}),
        (["--api-key-file", str(tmp_path / "api"), "--app-key-file", str(tmp_path / "app"),
          "--overwrite"], {"DD_API_KEY": "ignored-when-a-file-is-given"}),
    ):  # fmt: skip
        done = subprocess.run(
            worker_command("run", str(source), "--api-url", url, "--report", str(report), *extra),
            env=worker_env(**env), capture_output=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        everything = done.stdout + done.stderr + report.read_bytes()
        everything += journal_path(report).read_bytes()
        assert API_KEY.encode() not in everything
        assert APP_KEY.encode() not in everything
        for path in (report, journal_path(report)):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_unreadable_key_file_is_a_usage_error(tmp_path: Path) -> None:
    """A missing key file exits 2 naming the file."""
    done = subprocess.run(
        worker_command("run", str(ROOT / "sample_inputs" / "invites.csv"), "--api-url",
                       "http://127.0.0.1:9", "--report", str(tmp_path / "r.jsonl")),
        env=worker_env(DD_API_KEY_FILE=str(tmp_path / "nope"), DD_APP_KEY="x"),
        capture_output=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr.decode()
    assert b"API key file" in done.stderr
    assert b"nope" in done.stderr


def test_the_image_runs_as_a_non_root_user_from_a_built_wheel() -> None:
    """The Dockerfile's final USER is not root, and its ENTRYPOINT is the console script."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    user = [line.split()[1] for line in lines if line.startswith("USER ")][-1]
    assert user not in ("root", "0")
    assert 'ENTRYPOINT ["invite-worker"]' in lines


@pytest.mark.timeout(300)
def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_sandbox(tmp_path: Path) -> None:
    """The install the image does (a wheel into a clean environment) runs a sandbox rehearsal."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=240)  # fmt: skip
    [wheel] = wheels.glob("invite_worker-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir)  # without pip: this environment's pip installs into it
    python = env_dir / "bin" / "python"
    # The dependencies are this environment's, installed from the same pyproject.toml:
    # fetching and unpacking them again was most of this test's 20 s. A path line in a .pth
    # file adds no .pth of its own, so this checkout's editable install stays out of reach.
    where = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                            "'purelib'))"], check=True, capture_output=True, text=True)  # fmt: skip
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(where.stdout.strip()) / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run([*pip, "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=240)  # fmt: skip
    # Every requirement the wheel declares is met, and the code run is the wheel's.
    checked = subprocess.run([*pip, "check"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DD_", "PYTHON"))}
    imported = subprocess.run([str(python), "-c", "import worker; print(worker.__file__)"],
                              capture_output=True, text=True, cwd=tmp_path, env=clean,
                              check=True)  # fmt: skip
    assert Path(imported.stdout.strip()).is_relative_to(env_dir), imported.stdout
    report = tmp_path / "r.jsonl"
    done = subprocess.run(
        [str(env_dir / "bin" / "invite-worker"), "run",
         str(ROOT / "sample_inputs" / "invites.csv"), "--sandbox", "--report", str(report)],
        capture_output=True, cwd=tmp_path, timeout=60, check=False, env=clean,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr.decode()
    assert read_report(report)[-1]["emails_sent"] == 3  # 2 more skipped, 2 refused
