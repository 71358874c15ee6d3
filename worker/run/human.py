"""How a run went, for a person at a terminal: a short table, then the one next step; and
a dry run's plan, printed.

Off a terminal (JSON logs, a CronJob) the table is not printed: the ``run.finished`` event
carries the same numbers for machines.
"""

from __future__ import annotations

import itertools
import shlex
from collections import Counter
from collections.abc import Mapping
from typing import Any, TextIO

from worker.errors import ConsumerTakenOver
from worker.run.counts import FileRead, QueueRead
from worker.run.summary import AnySummary


def print_summary(
    summary: AnySummary,
    report: str,
    command: list[str],
    out: TextIO,
    *,
    signal: str | None = None,
) -> None:
    """The run's outcome as a table, and what to do next.

    A run stopped by ``signal`` (SIGINT, SIGTERM) ends with one plain line instead: what
    was done, what is left, and the exact command that finishes it.
    """
    seconds = summary.duration_ms / 1000
    sent = summary.emails_sent
    rows: list[tuple[str, str]] = [("invited", f"{sent:,}")]
    settled = summary.read.skipped if isinstance(summary.read, FileRead) else 0
    if settled:  # --resume: what the report's earlier runs had already settled
        rows.append(("settled before", f"{settled:,} (by this report's earlier runs)"))
    if summary.invitees_added:  # --add-invitees granted access, whatever the sends did
        rows.append(("invitees added", f"{summary.invitees_added:,}"))
    if summary.invitees_lost:  # entries gone again at the end: see invitees.lost
        rows.append(("invitees lost", f"{summary.invitees_lost:,}"))
    if summary.invitees_unchecked:  # the look could not read: see invitees.recheck_failed
        rows.append(("invitees unchecked", f"{summary.invitees_unchecked:,}"))
    rows += _by("skipped", summary.skipped_by_reason)
    rows += _by("refused", summary.refused_by_code)
    failed = summary.emails_failed - sum(summary.refused_by_code.values())
    if failed:
        rows.append(("failed", f"{failed:,}"))
    rows += _by("rejected rows", summary.rejected_by_reason)
    if summary.prune is not None:  # --prune
        rows.append(("revoked (pruned)", f"{summary.prune.emails_revoked:,}"))
        rows += _by("prune refused", summary.prune.prune_refused_by_code)
    left = summary.unsent + (summary.unread or 0)
    if left:
        rows.append(("not sent yet", f"{left:,}" + _unknown_rest(summary)))
    kinds = summary.requests_by_kind
    rows.append(("requests", ", ".join(f"{n:,} {k}" for k, n in kinds.items() if n) or "0"))
    rows.append(("429 answers", f"{summary.rate_limited:,}"))
    rate = f", {sent / seconds:,.0f} invited/s" if seconds > 0 and sent else ""
    rows.append(("duration", f"{seconds:,.1f} s{rate}"))
    width = max(len(name) for name, _ in rows)
    stopped = summary.interrupted and summary.halted is None
    print(f"\n{heading(summary)}: {summary.source} (exit {summary.exit_code})",
          file=out)  # fmt: skip
    for name, value in rows:
        print(f"  {name:<{width}}  {value}", file=out)
    if stopped:
        print(stopped_line(summary, command, signal), file=out)
    else:
        print(f"Next: {next_step(summary, report, command)}", file=out)


def heading(summary: AnySummary) -> str:
    """What happened, in a word: Done, Stopped (a signal) or Halted (a fault, the keys)."""
    if summary.halted is not None or summary.aborted:
        return "Halted"
    return "Stopped" if summary.interrupted else "Done"


def _unknown_rest(summary: AnySummary) -> str:
    """For a stop on a pipe: the rows it never read cannot be counted."""
    return " read, and the rest of the input" if summary.unread is None else ""


def stopped_line(summary: AnySummary, command: list[str], signal: str | None) -> str:
    """One plain line for a run a signal stopped: done, left, and how to finish."""
    by = f" by {signal}" if signal else ""
    counts = (("invited", summary.emails_sent), ("skipped", summary.emails_skipped),
              ("failed", summary.emails_failed))  # fmt: skip
    done = ", ".join(f"{n:,} {what}" for what, n in counts if n or what == "invited")
    if isinstance(summary.read, QueueRead):  # the stream keeps what it did not settle
        return (f"Stopped{by}: {done}; messages not yet settled stay pending for the next "
                f"worker, nothing is lost. Run again with: {shlex.join(command)}")  # fmt: skip
    left = summary.unsent + (summary.unread or 0)
    return (f"Stopped{by}: {done}; {left:,}{_unknown_rest(summary)} not sent yet, nothing "
            f"is lost. Finish with: {resume_command(command)}")  # fmt: skip


def next_step(summary: AnySummary, report: str, command: list[str]) -> str:
    """The one thing to do now, as a command where there is one."""
    queue = summary.read if isinstance(summary.read, QueueRead) else None  # a queue worker
    # A queue worker runs the same command again: its unsettled messages stay pending.
    resume = shlex.join(command) if queue is not None else resume_command(command)
    if summary.halted is not None:
        if queue is not None and summary.halted.code == ConsumerTakenOver.code:
            return (f"nothing: the process now running as --consumer '{queue.consumer}' "
                    "settles what this one held")  # fmt: skip
        if queue is not None:  # a queue worker's halt says what to do (another URL, say)
            # Under the same --consumer it re-reads its pending messages at once; under
            # another name they wait --claim-idle to be claimed.
            return (f"{summary.halted.message.rstrip('.')}; then, to take up its pending "
                    f"messages at once: {shlex.join(command)}")  # fmt: skip
        return f"{summary.halted.message.split('. ')[0]}; then: {resume}"
    if summary.aborted:
        kept = "; the messages not settled stay pending" if queue is not None else ""
        return ("the service refused the keys: check DD_API_KEY / DD_APP_KEY, --site and the "
                f"dashboards_invite_share permission{kept}, then: {resume}")  # fmt: skip
    if queue is not None:
        return _queue_step(summary, queue, command)
    if summary.interrupted or summary.unsent or summary.unread:
        return f"finish the run: {resume}"
    if summary.invitees_lost:  # before the failed: --resume also sends those again
        return ("see invitees.lost: someone else keeps writing those dashboards from an "
                "older read; once they stop, look again and add the lost back: "
                f"{resume}")  # fmt: skip
    if summary.invitees_unchecked:
        return ("the look at the entries this run made could not read every dashboard (see "
                "invitees.recheck_failed); once the service answers, look again: "
                f"{resume}")  # fmt: skip
    refused = summary.refused_by_code
    fixes = "; ".join(REFUSAL_FIXES.get(code, code) for code in sorted(refused))
    # --resume: failures for good of earlier runs still make the job incomplete (exit 1)
    failed = max(summary.emails_failed, summary.job.emails_failed if summary.job else 0)
    if failed > sum(refused.values()):
        retry = shlex.join(["invite-worker", "report", "failed", report, "--output",
                            "retry.csv"])  # fmt: skip
        step = f"once the cause is fixed: {retry}, then run retry.csv"
        if refused:  # left out of that file: their fix is another
            step += f" (the refused are left out: {fixes}, then add --include-refused)"
        return step
    if refused:
        retry = shlex.join(["invite-worker", "report", "failed", report, "--include-refused",
                            "--output", "retry.csv"])  # fmt: skip
        return f"{fixes}; then: {retry}, and run retry.csv"
    if summary.rejected:
        return "fix the rejected rows in the input (their lines are in the report)"
    if summary.prune is not None and summary.prune.prunes_refused:
        return ("see why --prune left dashboards whole (the prune_refused records in "
                f"{shlex.quote(report)}), then run again")  # fmt: skip
    return "nothing: everyone is invited"


#: What fixes each refusal of the dashboard check (the "Next:" step after it).
REFUSAL_FIXES = {
    "not_on_share_list": "add the refused addresses to their dashboards' invitees (or run "
    "again with --add-invitees)",
    "token_not_found": "check the tokens no shared dashboard answers to (report summarize "
    "lists them); correct them in the input",
    "dashboard_paused": "resume sharing the paused dashboards",
    "not_invite_only": "share those dashboards as invite-only",
}


def _queue_step(summary: AnySummary, queue: QueueRead, command: list[str]) -> str:
    """A stream worker's next step: its dead letters, else nothing (the stream goes on)."""
    if queue.dead_lettered:
        stream = next((v for k, v in itertools.pairwise(command) if k == "--stream"), None)
        listing = ["invite-worker", "dead-letter", "list", command[2]]
        listing += ["--stream", stream] if stream else []
        return (f"see why {queue.dead_lettered:,} message(s) were dead-lettered: "
                f"{shlex.join(listing)}; once fixed, 'dead-letter requeue' puts them "
                "back")  # fmt: skip
    if summary.rejected:
        return "fix the producer of the rejected messages (their ids are in the report)"
    return "nothing: every message read is settled"


def resume_command(command: list[str]) -> str:
    """The command again, with ``--resume``: it continues from the report."""
    return shlex.join([*command, *(["--resume"] if "--resume" not in command else [])])


def _by(label: str, counts: Mapping[str, int]) -> list[tuple[str, str]]:
    return [(f"{label}: {key}", f"{count:,}") for key, count in counts.items() if count]


#: Tokens whose counts the printed plan shows one per line; then how many more, and the
#: counts over all of them (the report's summary holds every token's).
SHOWN_TOKENS = 20


def print_plan(plan: dict[str, Any], out: TextIO) -> None:
    """The plan for a person."""
    reasons = ", ".join(f"{k}: {v}" for k, v in plan["rejected_by_reason"].items())
    seconds = plan["estimated_seconds"]
    if seconds is None:
        when = "unknown: give --rate R or --assume-limit L/P"
    else:
        basis = []
        if plan["rate"]:
            basis.append(f"--rate {plan['rate']:g}/s")
        if plan["assume_limit"]:
            limit, period = plan["assume_limit"]
            basis.append(f"{limit} requests per {period:g} s window")
        when = f"{_duration(seconds)} at {' and '.join(basis)}" if basis else _duration(seconds)
    rows = [
        ("rows read", f"{plan['rows']:,}"),
        ("valid", f"{plan['valid']:,}"),
        ("rejected", f"{plan['rejected']:,}" + (f"   ({reasons})" if reasons else "")),
        ("tokens", f"{plan['tokens']:,}"),
        ("requests needed", f"{plan['requests']:,}   (batches of up to {plan['batch_size']})"),
        ("estimated time", when),
    ]
    print(f"Dry run of {plan['source']}: nothing was sent; the plan is in {plan['report']}.",
          file=out)  # fmt: skip
    for name, value in rows:
        print(f"  {name:<16} {value}", file=out)
    if "preflight" in plan:
        print("Per token (dashboards read, invitations listed; nothing written):", file=out)
        per_token = plan["preflight"]
        for token, counts in itertools.islice(per_token.items(), SHOWN_TOKENS):
            text = ", ".join(f"{k} {v:,}" for k, v in counts.items())
            print(f"  {token}: {text}", file=out)
        if len(per_token) > SHOWN_TOKENS:  # an input may name tens of thousands of tokens
            totals: Counter[str] = Counter()
            for counts in per_token.values():
                totals.update(counts)
            text = ", ".join(f"{k} {v:,}" for k, v in sorted(totals.items()))
            print(f"  … {len(per_token) - SHOWN_TOKENS:,} more tokens (each in the summary "
                  f"record of {plan['report']}); all {len(per_token):,}: {text}",
                  file=out)  # fmt: skip
    if plan.get("keys_refused"):
        print("The service refused the keys (401/403): the run would stop at its first "
              "check (exit 3). Check DD_API_KEY / DD_APP_KEY, the site (--site) and the "
              "application key's permissions.", file=out)  # fmt: skip
    if "removals" in plan and "input_unreadable" in plan.get("prune_refused_by_code", {}):
        # Refused for the whole list, not per dashboard: counting it as one dashboard
        # left whole would understate it.
        print("--prune would remove nobody from any dashboard: a row of the list cannot be "
              f"read or attributed to a token (see the prune_refused record in "
              f"{plan['report']})", file=out)  # fmt: skip
    elif "removals" in plan:
        print(f"--prune would remove {plan['removals']:,} people (their addresses are in "
              f"{plan['report']}); dashboards it would leave whole: "
              f"{plan['prunes_refused']:,}", file=out)  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
