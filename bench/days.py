"""``bench/run.py --invitees`` and ``--days N``: the scheduled job as it runs.

``--invitees`` serves every generated address as an invitee of its token's dashboard (a
``--dashboards`` file for the emulator), as the real service requires before it sends, so
the dashboard check reads the whole allow-list of each token. ``--days N`` runs the same
list N times against one emulator, as a daily job does: day 1 sends everything, day 2
finds everyone invited and sends nothing. Each day is its own worker process: its CPU per
row, peak RSS, wall time, what it sent and skipped, and its requests by kind (from the
report's summary), with day N's CPU as a share of day 1's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any


def write_dashboards(path: Path, rows: int, tokens: int) -> None:
    """Dashboards of the generated tokens, each allowing exactly its own addresses (the
    input spreads ``user{i}`` over tokens round-robin, see ``run.write_input``)."""
    with path.open("w") as f:
        f.write("[")
        for token in range(tokens):
            people = range(token, rows, tokens)
            emails = ",".join(f'{{"email":"user{i}@example.com"}}' for i in people)
            comma = "," if token else ""
            f.write(f'{comma}{{"token":"bench-token-{token:05d}","invitees":[{emails}]}}')
        f.write("]")


def summary_of(report: Path) -> dict[str, Any]:
    """The summary record a run wrote last in its report."""
    with report.open("rb") as f:
        f.seek(max(0, report.stat().st_size - 65536))
        last = f.read().splitlines()[-1]
    summary: dict[str, Any] = json.loads(last)
    return summary


def day_rows(
    days: int,
    rows: int,
    fresh: Callable[[], AbstractContextManager[str]],
    run_day: Callable[[str], dict[str, Any]],
    stats: Callable[[str], dict[str, Any]],
) -> list[tuple[str, str]]:
    """Run the job ``days`` times against one emulator; a table row per figure per day,
    then what the service holds at the end (every address invited once, or not)."""
    table: list[tuple[str, str]] = []
    first_cpu = 0.0
    with fresh() as url:
        for day in range(1, days + 1):
            worker = run_day(url)
            summary = worker["summary"]
            if day == 1:
                first_cpu = worker["cpu"]
            kinds = summary.get("requests_by_kind", {})
            table += [
                (f"day {day}: exit / wall", f"{worker['exit']} / {worker['wall']:.2f} s"),
                (f"day {day}: CPU per row",
                 f"{worker['cpu'] / rows * 1e6:.2f} µs (user {worker['user']:.2f} s + sys "
                 f"{worker['sys']:.2f} s){_share(worker['cpu'], first_cpu, day)}"),
                (f"day {day}: peak RSS", f"{worker['rss_mb']:.1f} MB"),
                (f"day {day}: sent / skipped / failed",
                 f"{summary.get('emails_sent', 0):,} / {summary.get('emails_skipped', 0):,} / "
                 f"{summary.get('emails_failed', 0):,}"),
                (f"day {day}: requests by kind",
                 ", ".join(f"{k} {v:,}" for k, v in kinds.items())
                 + f"; {summary.get('list_pages', 0):,} pages listed"),
            ]  # fmt: skip
        service = stats(url)
    table.append(("invitations / duplicates", f"{service['invitations']:,} / "
                  f"{service['duplicates']:,}"))  # fmt: skip
    return table


def _share(cpu: float, first: float, day: int) -> str:
    return f" = {cpu / first:.2f}x day 1" if day > 1 and first else ""
