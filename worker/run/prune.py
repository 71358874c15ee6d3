"""``--prune``: once the whole list is read and sent, take away what it no longer grants.

:class:`ListedInput` gathers, as the input is read, what the guards need: the tokens the
list names, those with a row rejected for its address (never pruned), and the first row
that could not be read or attributed to a token (then nothing is pruned anywhere). Which
addresses the list names is not kept a second time: the validator's duplicate index
already holds every valid pair, settled ones on ``--resume`` included, as a 64-bit hash
of the lower-cased token and address (8 bytes a row). A collision can only make an
address look named, so it is kept: never a removal the list did not ask for.

:func:`prune` then goes dashboard by dashboard (``--concurrency`` at a time): survey,
restore (``--add-invitees``), guard (``--prune-max``), remove entries, revoke
invitations, each step recorded in the report: an entry once its PUT is answered, an
invitation as its DELETE leaves (see :mod:`worker.run.taking`). With ``plan``
(``--dry-run --preflight --prune``) it surveys only.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from worker.config import Config
from worker.errors import AuthError, SendError, Stopped
from worker.run.taking import groups, take_away
from worker.send.prune import Named, Pruner, Survey
from worker.send.screening import INVITEE_UPDATE_FAILED
from worker.sources.lines import Columns
from worker.validate import RawRow, Reason, Rejection, address_key, check_token

if TYPE_CHECKING:
    from worker.record.report import Report
    from worker.validate.dedupe import PairIndex

log = structlog.get_logger("worker.run.prune")

#: Adds invitees to a token's dashboard: whether they were added, and their access's end.
Restore = Callable[[str, list[str]], Awaitable[tuple[list[str] | None, str | None]]]
#: Rejections that leave the row attributed to its token: that token is not pruned.
ADDRESS_REASONS = frozenset({Reason.INVALID_EMAIL, Reason.MISSING_EMAIL})


class ListedInput:
    """What the input says for ``--prune``, gathered while it is read."""

    def __init__(self) -> None:
        #: Every valid pair of the input (the validator's duplicate index).
        self.index: PairIndex | None = None
        #: lower-cased token -> the token as the list first spells it
        self.tokens: dict[str, str] = {}
        #: lower-cased token -> the first (line, reason) rejected for its address
        self.blocked: dict[str, tuple[int | str, str]] = {}
        #: lower-cased token -> another spelling of it the list has (letter case apart)
        self.respelled: dict[str, str] = {}
        #: The first row that could not be read or attributed: (line, reason)
        self.unreadable: tuple[int | str, str] | None = None

    def chunk(self, rows: Sequence[RawRow], rejections: list[Rejection]) -> None:
        """Take note of one chunk: its tokens, and what was rejected (every rejection,
        also those an earlier run reported)."""
        tokens = rows.tokens if isinstance(rows, Columns) else [r[1] for r in rows if r[3] is None]
        for raw in set(tokens):
            token = raw.strip() if isinstance(raw, str) else ""
            if check_token(token):
                first = self.tokens.setdefault(token.lower(), token)
                if first != token:
                    self.respelled.setdefault(token.lower(), token)
        for line, reason, rejected, _ in rejections:
            if reason == Reason.DUPLICATE:
                continue  # harmless: the pair is in the list once already
            clean = rejected.strip() if rejected else ""
            if reason in ADDRESS_REASONS and check_token(clean):
                self.blocked.setdefault(clean.lower(), (line, reason))
            elif self.unreadable is None:
                self.unreadable = (line, reason)

    def named(self, token: str) -> Named:
        """Whether the list names each address for ``token`` (ignoring case)."""
        index = self.index

        def check(emails: list[str]) -> list[bool]:
            if index is None:
                return [False] * len(emails)
            return index.holds_with(token, list(map(address_key, emails)))

        return check


async def prune(
    config: Config,
    pruner: Pruner,
    listed: ListedInput,
    report: Report,
    *,
    stop: asyncio.Event,
    plan: dict[str, Counter[str]] | None = None,
    abort: Callable[[AuthError], None] | None = None,
    restore: Restore | None = None,
) -> None:
    """Prune every dashboard the list names (or, with ``plan``, count what would go).

    ``restore`` (``--add-invitees``: the run's way to add invitees) adds back those the
    list names who hold an invitation the dashboard no longer allows.

    Refused keys (401/403) end the prune, and are passed to ``abort`` (the run's).
    """
    if listed.unreadable is not None:
        line, reason = listed.unreadable
        _refuse(report, "input_unreadable", f"nothing was pruned: line {line} could not be "
                f"read or attributed to a token ({reason}); fix it and run again")  # fmt: skip
        return
    pending = iter(sorted(listed.tokens.items()))
    denied: list[AuthError] = []

    async def work() -> None:
        for lower, token in pending:
            if stop.is_set() or denied:
                return
            counts = plan.setdefault(token, Counter()) if plan is not None else None
            try:
                await _one(config, pruner, listed, report, token, lower, counts, stop,
                           restore)  # fmt: skip
            except AuthError as exc:  # the keys may not write dashboards: stop here
                denied.append(exc)
                if abort is not None:
                    abort(exc)
                _refuse(report, exc.code, f"the service refused to let these keys read or "
                        f"change the dashboard ({exc.message}); give the application key "
                        "dashboards_invite_share", token)  # fmt: skip
            except SendError as exc:
                _refuse(report, exc.code, f"the dashboard could not be pruned: {exc.message}; "
                        "run again to finish", token)  # fmt: skip
            except Stopped:
                # This dashboard's waits ended; the others' requests in flight finish (a
                # stop raised out of the group would cancel them, unanswered and
                # unrecorded), and each ends at its next step.
                return

    try:
        async with asyncio.TaskGroup() as group:  # a fault in one ends them all
            for _ in range(config.concurrency):
                group.create_task(work())
    except* Exception as failed:  # the first failure, as itself: a fault, a stop, a bug
        raise failed.exceptions[0] from None


async def _one(
    config: Config,
    pruner: Pruner,
    listed: ListedInput,
    report: Report,
    token: str,
    lower: str,
    counts: Counter[str] | None,
    stop: asyncio.Event,
    restore: Restore | None,
) -> None:
    """Survey, restore (see :func:`_restore`), guard and prune one dashboard."""
    refusal = None
    if lower in listed.blocked:
        line, reason = listed.blocked[lower]
        refusal = ("rejected_rows", f"line {line}, a row for this dashboard, was rejected "
                   f"({reason}), so the list may be missing someone: nobody was removed "
                   "from it; fix the row and run again")  # fmt: skip
    elif (other := listed.respelled.get(lower)) is not None:
        # The duplicate rule takes the two for one token, but the service may hold a
        # dashboard under each: which one the list means cannot be told, and a survey of
        # one would leave the other unpruned without a word.
        refusal = ("token_spellings", f"the list spells this token two ways, {token!r} and "
                   f"{other!r} (letter case apart): nobody was removed from either "
                   "dashboard; spell it one way and run again")  # fmt: skip
    if refusal is not None:
        _refuse(report, *refusal, token)
        if counts is not None:
            counts[f"would refuse removal: {refusal[0]}"] += 1
        return
    survey = await pruner.survey(token, listed.named(token))
    # A plan's survey reads the dashboard as it is: without the people its sends would
    # add to the invitees first, whom a run's survey counts among the dashboard's people.
    adding = counts["would add invitee"] if counts is not None else 0
    if stop.is_set():  # a survey is reads only: what a stop cuts, the next run surveys again
        return
    restored = survey is None or not survey.restore or await _restore(
        config, report, survey, counts, restore)  # fmt: skip
    if not restored:  # refused and recorded: the dashboard is left whole
        return
    if survey is None or not survey.remove:
        if counts is not None:
            counts["would remove"] += 0
        return
    remove, people = len(survey.remove), survey.people + adding
    if not config.prune_max.allows(remove, people):
        _refuse(report, "prune_max", f"{remove:,} of the dashboard's {people:,} people are "
                f"not on the list, more than --prune-max {config.prune_max} allows: nothing "
                "was removed from it. Check the list; if it is right, run with a higher "
                "--prune-max (e.g. 100%)", token, people, remove)  # fmt: skip
        if counts is not None:
            counts["would refuse removal: prune_max"] += remove
        return
    if counts is not None:
        counts["would remove"] += remove
        for removed, emails in groups(survey.remove.values()).items():
            report.revoked(token, emails, list(removed), planned=True)
        return
    if stop.is_set():  # nothing removed yet: the PUT would leave entries gone, unrecorded
        return
    await take_away(pruner, report, survey, stop,
                    lambda why: _refuse(report, "prune_update_failed", why, token))  # fmt: skip


async def _restore(config: Config, report: Report, survey: Survey,
                   counts: Counter[str] | None, restore: Restore | None) -> bool:  # fmt: skip
    """With ``--add-invitees``, add back to the invitees those the list names who hold an
    invitation the dashboard no longer allows (see ``Survey.restore``; a removal cut short
    by a crash leaves them so): the send skipped them as served, so nothing else would.
    It only adds, so no guard holds it back. Without it, they are only logged. False:
    they could not be added, which is recorded, and nothing is removed either."""
    token, emails = survey.token, list(survey.restore.values())
    if not config.add_invitees:
        log.warning("prune.not_allowed", token=token, emails=len(emails),
                    action="none: --add-invitees would add them back to the invitees")  # fmt: skip
        return True
    if counts is not None:
        counts["would add invitee"] += len(emails)
        return True
    assert restore is not None, "a run with --add-invitees passes its way to add invitees"
    added, until = await restore(token, emails)
    if added is None:
        _refuse(report, INVITEE_UPDATE_FAILED, f"{len(emails):,} people the list names hold "
                "an invitation but are neither invitees nor on the share list, and could "
                "not be added back to the invitees (see invitees.update_failed): nobody was "
                "removed from it; run again", token)  # fmt: skip
        return False
    log.info("prune.restored", token=token, emails=len(added))
    if added:  # the others were added back by someone else meanwhile
        report.restored(token, added, until)
    return True


def _refuse(report: Report, code: str, message: str, token: str | None = None,
            people: int | None = None, remove: int | None = None) -> None:  # fmt: skip
    """Record (and log) a dashboard left whole, or a run that pruned nothing."""
    log.warning("prune.refused", code=code, token=token, message=message)
    report.prune_refused(code, message, token, people, remove)
