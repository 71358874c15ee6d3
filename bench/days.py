"""``bench/run.py --invitees`` and ``--days N``: the scheduled job as it runs.

``--invitees`` serves every generated address as an invitee of its token's dashboard (a
``--dashboards`` file for the emulator), as the real service requires before it sends, so
the dashboard check reads the whole allow-list of each token. ``--days N`` runs the same
list N times against one emulator, as a daily job does: day 1 sends everything, day 2
finds everyone invited and sends nothing. Each later day runs twice, both against the same
service: once as the CronJob in ``deploy/`` runs it, continuing day 1's report with
``--resume`` (the report's history settles who was served: no request), and once from a
fresh report (``--overwrite``: the dashboard check lists every token's invitations). Each
run is its own worker process: its CPU per row, peak RSS, wall time, what it sent and
skipped, and its requests by kind (from the report's summary), with its CPU as a share of
day 1's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from statistics import median
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


#: How a later day runs: (label, mode); day 1 is mode "first".
LATER_DAYS = (("--resume", "resume"), ("fresh report", "fresh"))


def day_rows(
    days: int,
    rows: int,
    fresh: Callable[[], AbstractContextManager[str]],
    run_day: Callable[[str, str], dict[str, Any]],
    stats: Callable[[str], dict[str, Any]],
    cpus: dict[str, float] | None = None,
) -> list[tuple[str, str]]:
    """Run the job ``days`` times against one emulator; a table row per figure per run,
    then what the service holds at the end (every address invited once, or not).
    ``cpus``: filled with each run's CPU seconds, by its name in the table.

    ``run_day(url, mode)``: one worker run; ``first`` writes the report, ``resume``
    continues it (``--resume``), ``fresh`` writes another from scratch.
    """
    table: list[tuple[str, str]] = []
    first_cpu = 0.0
    with fresh() as url:
        for day in range(1, days + 1):
            for how, mode in LATER_DAYS if day > 1 else (("", "first"),):
                worker = run_day(url, mode)
                if day == 1:
                    first_cpu = worker["cpu"]
                name = f"day {day}" + (f" ({how})" if how else "")
                if cpus is not None:
                    cpus[name] = worker["cpu"]
                table += _figures(name, worker, rows, first_cpu if day > 1 else 0.0)
        service = stats(url)
    table.append(("invitations / duplicates", f"{service['invitations']:,} / "
                  f"{service['duplicates']:,}"))  # fmt: skip
    return table


def _figures(
    name: str, worker: dict[str, Any], rows: int, first_cpu: float
) -> list[tuple[str, str]]:
    """One run's rows of the table; ``first_cpu``: day 1's, for the share (0: none)."""
    summary = worker["summary"]
    kinds = summary.get("requests_by_kind", {})
    share = f" = {worker['cpu'] / first_cpu:.2f}x day 1" if first_cpu else ""
    settled = summary.get("skipped", 0) if summary.get("resumed") else 0
    return [
        (f"{name}: exit / wall", f"{worker['exit']} / {worker['wall']:.2f} s"),
        (f"{name}: CPU per row",
         f"{worker['cpu'] / rows * 1e6:.2f} µs (user {worker['user']:.2f} s + sys "
         f"{worker['sys']:.2f} s){share}"),
        (f"{name}: peak RSS", f"{worker['rss_mb']:.1f} MB"),
        (f"{name}: sent / skipped / failed",
         f"{summary.get('emails_sent', 0):,} / {summary.get('emails_skipped', 0):,} / "
         f"{summary.get('emails_failed', 0):,}"
         + (f"; {settled:,} rows settled by the report" if settled else "")),
        (f"{name}: requests by kind",
         ", ".join(f"{k} {v:,}" for k, v in kinds.items())
         + f"; {summary.get('list_pages', 0):,} pages listed"),
    ]  # fmt: skip


def rounds_rows(
    rounds: list[tuple[list[tuple[str, str]], dict[str, float]]], rows: int
) -> list[tuple[str, str]]:
    """Several rounds of the days: the table of the middle round by day 1's CPU (of an
    even number, the upper of the two middle ones), then every round's CPU ratio of each
    later run to its own day 1 (and of day 1 to the round's day 1 without an allow-list,
    when run), with their medians.

    A shared machine drifts by a third within minutes; a ratio within one round, runs
    one right after the other, is what holds still.
    """
    ordered = sorted(rounds, key=lambda r: r[1]["day 1"])
    table = list(ordered[len(ordered) // 2][0])
    if len(rounds) == 1:
        return table
    table.append(("rounds", f"{len(rounds)}; day 1 CPU per row: " + "; ".join(
        f"{r[1]['day 1'] / rows * 1e6:.2f}" for r in rounds) + " µs"))  # fmt: skip
    for name in rounds[0][1]:
        if name == "day 1":
            continue
        ratios = [r[1][name] / r[1]["day 1"] for r in rounds]
        if name == PLAIN:
            ratios = [1 / ratio for ratio in ratios]
            label = "day 1 / day 1 with no allow-list"
        else:
            label = f"{name} / day 1"
        shown = "; ".join(f"{ratio:.2f}" for ratio in ratios)
        table.append((f"{label}, each round", f"{shown} (median {median(ratios):.2f}x)"))
    return table


#: The name of the comparison run: day 1 against dashboards that list no allow-list.
PLAIN = "day 1, no allow-list"
