"""Runs over files on one machine edit a dashboard one at a time (``send.edit_lock``): two
``--add-invitees`` runs at once keep each other's entries; a run waiting for the lock
stops when told; where no lock can be had, edits go on and say so."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

from structlog.testing import capture_logs

from tests.conftest import (
    API_KEY,
    APP_KEY,
    TOKEN_A,
    Proc,
    csv_source,
    emulator_invited,
    rows_csv,
    worker_command,
)
from worker.config import Config
from worker.emulator import Emulator
from worker.run import run

OLD = [f"old{i}@example.com" for i in range(20)]


def people(run_name: str, n: int) -> list[tuple[str, str]]:
    return [(TOKEN_A, f"{run_name}{i}@example.com") for i in range(n)]


async def test_two_runs_in_one_process_keep_each_others_entries(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Two runs adding 30 people each to one dashboard at once, three to a batch: every
    entry stays, both exit 0, everyone is invited once, nobody is added back at the end."""
    board = emulator.add_dashboard(TOKEN_A, invitees=OLD)
    runs = []
    for name in ("a", "b"):
        config = make_config(add_invitees=True, batch_size=3,
                             report_path=tmp_path / f"{name}.jsonl")  # fmt: skip
        runs.append(run(config, csv_source(rows_csv(people(name, 30)))))
    with capture_logs() as logs:
        results = await asyncio.gather(*runs)
    assert [r.exit_code for r in results] == [0, 0]
    wanted = {e for _, e in people("a", 30) + people("b", 30)}
    assert set(board.invitees or {}) == set(OLD) | wanted
    assert {e for (_, e), n in emulator.invited.items() if n == 1} == wanted
    assert not [e for e in logs if e["event"] == "invitees.missing"]


def test_two_processes_side_by_side_keep_each_others_entries(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """Two real ``--add-invitees`` processes started together over one dashboard (300
    new people each, ten to a batch): all 650 entries stay, both exit 0, each person is
    invited once."""
    dashboards = tmp_path / "dashboards.json"
    dashboards.write_text(json.dumps([{"token": TOKEN_A, "invitees": [{"email": e} for e in OLD]}]))
    url = start_emulator("--dashboards", str(dashboards))
    env = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY, "TMPDIR": str(tmp_path)}
    procs = []
    for name in ("a", "b"):
        source = tmp_path / f"{name}.csv"
        source.write_text(rows_csv(people(name, 300)))
        argv = ["run", str(source), "--api-url", url, "--report", str(tmp_path / f"{name}.jsonl"),
                "--add-invitees", "--batch-size", "10", "--log-format", "json"]  # fmt: skip
        procs.append(Proc(worker_command(*argv), tmp_path / f"{name}.log", {**os.environ, **env}))
    for proc in procs:
        proc.expect(0, timeout=60)
    keys = {"DD-API-KEY": API_KEY, "DD-APPLICATION-KEY": APP_KEY}
    request = urllib.request.Request(f"{url}/api/v1/dashboard/public/{TOKEN_A}", headers=keys)  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
        entries = {i["email"] for i in json.loads(resp.read())["invitees"]}
    wanted = {e for _, e in people("a", 300) + people("b", 300)}
    assert entries == set(OLD) | wanted
    invited = emulator_invited(url)
    assert {e for (_, e) in invited} == wanted
    assert set(invited.values()) == {1}


async def test_a_run_waiting_for_another_runs_edit_stops_when_told(
    emulator: Emulator, make_config: Callable[..., Config], edit_locks: Path
) -> None:
    """Another run holds the dashboard's edit lock: this run waits, writes nothing, and a
    stop ends the wait (exit 3, the row left for --resume)."""
    emulator.add_dashboard(TOKEN_A, invitees=OLD)
    config = make_config(add_invitees=True)
    origin = f"http://127.0.0.1:{emulator.url.rsplit(':', 1)[1]}"
    name = hashlib.sha256(f"{origin}\n{TOKEN_A}".encode()).hexdigest()[:32]
    holder = os.open(edit_locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        stop = asyncio.Event()
        running = asyncio.create_task(run(config, csv_source(rows_csv(people("a", 1))), stop=stop))
        await asyncio.sleep(0.3)
        assert not running.done()
        stop.set()
        result = await asyncio.wait_for(running, 10)
    finally:
        os.close(holder)
    assert result.exit_code == 3
    assert [r.method for r in emulator.requests].count("PUT") == 0
    assert not emulator.invited


async def test_without_a_usable_lock_directory_edits_go_on_and_say_so(
    emulator: Emulator, make_config: Callable[..., Config], edit_locks: Path
) -> None:
    """A file where the lock directory should be: one ``invitees.edit_lock_unavailable``
    warning, and the run adds and invites as it would."""
    os.rmdir(edit_locks)
    with open(edit_locks, "w") as f:  # noqa: ASYNC230 (a test's set-up)
        f.write("not a directory")
    emulator.add_dashboard(TOKEN_A, invitees=OLD)
    config = make_config(add_invitees=True, batch_size=1)
    with capture_logs() as logs:
        result = await run(config, csv_source(rows_csv(people("a", 3))))
    assert result.exit_code == 0
    assert [e["event"] for e in logs].count("invitees.edit_lock_unavailable") == 1
    assert len(emulator.invited) == 3


async def test_every_spelling_of_an_api_and_token_names_one_lock(tmp_path: Path) -> None:
    """An origin with or without its default port, in any letter case, and a token in any
    letter case, take the same lock file."""
    from worker.clock import SystemClock
    from worker.send.edit_lock import LocalEdits

    stop = asyncio.Event()
    spellings = [("https://api.datadoghq.com", "abc-def"),
                 ("https://API.datadoghq.com:443/", "ABC-def")]  # fmt: skip
    for url, token in spellings:
        async with LocalEdits(url, stop, SystemClock(), tmp_path).hold(token):
            pass
    assert len(os.listdir(tmp_path)) == 1
