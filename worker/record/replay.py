"""Replaying a report's history: each pair's last state, the runs, the rejected rows.

A report may hold several runs (``--resume``): a pair's *last* batch or skipped record is
its state, so a pair skipped again by a resumed run is counted once. A ``revoked`` record
(``--prune`` took the access away) ends what came before it: the pair has no state until
a later record gives it one, so a person back on the list is sent again.
``--resume`` (which pairs are settled) and ``report summarize|failed`` (totals, the failed
pairs) both read a report through :class:`Replay`, so they cannot disagree.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from msgspec import UNSET

from worker.errors import UsageError, keeps_pending
from worker.outcome import Status
from worker.record.files import read_records
from worker.record.journal import Intent, read_journal
from worker.record.records import (
    REPORT_LINE,
    BatchRecord,
    PruneRefusedRecord,
    RejectedRecord,
    RejectedRow,
    ReportRecord,
    RevokedRecord,
    SkippedRecord,
    SummaryRecord,
    restored,
)
from worker.record.revocations import Revocations
from worker.validate import address_key, pair_key
from worker.validate.dedupe import locate, member

#: Request counters summed over the runs' summaries.
RUN_COUNTERS = ("requests", "retries", "rate_limited", "ratelimit_waits", "duration_ms")
#: What ``summary()["last_run"]`` says of the last run's end.
LAST_RUN = ("exit_code", "unsent", "unread")


def records(path: Path) -> Iterator[ReportRecord]:
    """The report's records; a line cut short by a crash is skipped."""
    try:
        yield from read_records(path, REPORT_LINE)
    except OSError as exc:
        raise UsageError(f"cannot read the report {str(path)!r}: {exc.strerror}") from None


def state_of(record: BatchRecord | SkippedRecord) -> tuple[str, str | None, str]:
    """(status, code, token) of a record that holds pairs' states; a skip's code: its reason."""
    if isinstance(record, SkippedRecord):
        return Status.SKIPPED, record.reason, record.token
    return record.status, record.code, record.token


def _looked_at_all(run: SummaryRecord) -> bool:
    """Whether ``run`` ended (exit 0, 1) having looked at every entry it and the runs
    before it added, none lost (``send.recheck``). A summary from before runs looked says
    nothing of it (unset): its runs are taken as settled, as they were then, so a newer
    version does not look back over a report's whole history."""
    if run.exit_code not in (0, 1):
        return False
    if run.invitees_lost is UNSET:
        return True
    return run.invitees_lost == 0 and run.invitees_unchecked in (0, UNSET)


def _note_adds(unlooked: dict[str, array[int]], token: str, emails: list[str]) -> None:
    unlooked.setdefault(token, array("q")).extend(map(address_key, emails))


@dataclass
class Replay:
    """What a report says, pair by pair and run by run: its history replayed once.

    A report can hold millions of pairs, so their final states are kept compact: one
    64-bit key per pair (see :func:`pair_key`) with the number of the batch record that
    holds its last state, in two numpy arrays sorted by key.
    """

    #: (status, error code, token) of every batch and skipped record, in the report's
    #: order; a skipped record's code is its reason
    batches: list[tuple[str, str | None, str]] = field(default_factory=list)
    rejected: dict[RejectedRow, str] = field(default_factory=dict)  # row -> reason
    runs: list[SummaryRecord] = field(default_factory=list)
    #: ``--prune``: removals (each person once per removal, see ``record.revocations``),
    #: by what was taken, and dashboards left whole
    revoked: int = 0
    revoked_by_what: Counter[str] = field(default_factory=Counter)
    #: ``--add-invitees``: addresses added to dashboards' invitees before their sends
    invitees_added: int = 0
    prunes_refused: Counter[str] = field(default_factory=Counter)
    ends_with_summary: bool = False
    #: With ``adds``: per token, the address keys (``validate.address_key``) of those
    #: added to its invitees since the last run that looked at its entries at its end and
    #: found none missing (``send.recheck``): killed and stopped runs make no look.
    unlooked: dict[str, array[int]] = field(default_factory=dict)
    _keys: Any = None  # sorted pair keys, each once
    _last: Any = None  # for each, the number of its last batch record
    #: sorted keys of the pairs sent, then revoked: the request that sent them is settled
    #: (the journal need not list the token again), though the pairs are not
    revoked_after_sent: Any = None

    @classmethod
    def read(cls, path: Path, *, strict: bool = False, adds: bool = False) -> Replay:
        """Replay the report at ``path``; ``strict``: one without any record is an error;
        ``adds``: keep ``unlooked``."""
        review = cls()
        unlooked = review.unlooked if adds else None
        keys, owners = array("q"), array("i")  # 8 + 4 bytes a pair
        revocations = Revocations()
        last: ReportRecord | None = None
        for record in records(path):
            last = record
            if (added := restored(record)) is not None:  # no pair's outcome: counted only
                review.invitees_added += len(added)
                if unlooked is not None and isinstance(record, SkippedRecord):
                    _note_adds(unlooked, record.token, added)
            elif isinstance(record, BatchRecord | SkippedRecord):
                token, emails = record.token, record.emails
                owners.extend(repeat(len(review.batches), len(emails)))
                review.batches.append(state_of(record))
                keys.extend(pair_key(token, email) for email in emails)
                if isinstance(record, BatchRecord) and isinstance(record.invitees_added, list):
                    review.invitees_added += len(record.invitees_added)
                    if unlooked is not None:
                        _note_adds(unlooked, token, record.invitees_added)
            elif isinstance(record, RejectedRecord):
                review.rejected.setdefault(record.row, record.reason)
            elif isinstance(record, RevokedRecord):
                if record.planned is not True:
                    pairs = (pair_key(record.token, email) for email in record.emails)
                    revocations.add(pairs, len(review.batches), record.removed)
            elif isinstance(record, PruneRefusedRecord):
                review.prunes_refused[record.code] += 1
            else:
                review.runs.append(record)
                if unlooked is not None and _looked_at_all(record):
                    unlooked.clear()
        if last is None and strict:
            raise UsageError(
                f"{str(path)!r} is not an invite-worker report: it holds no report record "
                "(a JSON line with kind batch, rejected, skipped or summary)"
            )
        review.ends_with_summary = isinstance(last, SummaryRecord)
        review._index(keys, owners, revocations)
        return review

    def _index(self, keys: array[int], owners: array[int], revocations: Revocations) -> None:
        import numpy as np

        all_keys = np.frombuffer(keys, dtype=np.int64) if keys else np.empty(0, np.int64)
        all_owners = np.frombuffer(owners, dtype=np.intc) if owners else np.empty(0, np.intc)
        self.revoked, self.revoked_by_what = revocations.count(all_keys, all_owners)
        revoked, revoked_at = revocations.keys, revocations.at
        sent = np.array([s == Status.SENT for s, _, _ in self.batches], dtype=bool)
        self.revoked_after_sent = np.empty(0, np.int64)
        if revoked and len(all_keys):
            # A pair's records before its last revocation no longer count: it was sent, then
            # its access taken away, so it is no longer settled (nor failed, nor skipped).
            gone = np.frombuffer(revoked, dtype=np.int64)
            at = np.frombuffer(revoked_at, dtype=np.intc)
            order = np.lexsort((at, gone))
            gone, at = gone[order], at[order]
            final = np.ones(len(gone), dtype=bool)  # the last revocation of each pair
            final[:-1] = gone[1:] != gone[:-1]
            gone, at = gone[final], at[final]
            where, found = locate(gone, all_keys)
            keep = ~found | (all_owners >= at[where])
            self.revoked_after_sent = np.unique(all_keys[~keep & sent[all_owners]])
            all_keys, all_owners = all_keys[keep], all_owners[keep]
        # A pair once sent stays sent (nobody may be invited twice) until revoked: order
        # each pair's records so its last sent one, if any, comes last, else its last one.
        was_sent = sent[all_owners] if len(all_owners) else np.empty(0, bool)
        order = np.lexsort((all_owners, was_sent, all_keys))
        sorted_keys, sorted_owners = all_keys[order], all_owners[order]
        last = np.ones(len(sorted_keys), dtype=bool)  # the last of each run of equal keys
        last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
        self._keys, self._last = sorted_keys[last], sorted_owners[last]

    def keys_in(self, status: Status) -> tuple[Any, list[int]]:
        """The pairs whose state is ``status``: their keys (sorted) and their state's record."""
        import numpy as np

        wanted = np.array([s == status for s, _, _ in self.batches], dtype=bool)
        if not len(self._keys):
            return np.empty(0, np.int64), []
        mask = wanted[self._last]
        return self._keys[mask].copy(), self._last[mask].tolist()

    def last_records(self, keys: list[int]) -> list[int]:
        """For each key, the number of the record holding its last state (-1: none, or
        revoked since).

        Batch and skipped records are numbered together, in the report's order."""
        import numpy as np

        if not len(self._keys) or not keys:
            return [-1] * len(keys)
        at, found = locate(self._keys, np.array(keys, dtype=np.int64))
        result: list[int] = np.where(found, self._last[at], -1).tolist()
        return result

    def open_intents(self, journal: Path) -> list[Intent]:
        """The intents of ``journal`` never cleared, each with only its emails not in a
        ``sent`` record since (one sent, then revoked, was answered all the same): the
        requests whose outcome is unknown. Only what is still open is held while the
        journal is read; raises OSError."""
        import numpy as np

        answered: Any = None  # made at the first intent: most journals are empty

        def unsent(intent: Intent) -> Intent | None:
            nonlocal answered
            if answered is None:
                sent, _ = self.keys_in(Status.SENT)
                answered = np.union1d(sent, self.revoked_after_sent)
            keys = np.array([pair_key(intent.token, e) for e in intent.emails], np.int64)
            still = ~member(answered, keys)
            if not still.any():
                return None
            emails = [e for e, left in zip(intent.emails, still.tolist(), strict=True) if left]
            return Intent(intent.id, intent.token, emails, intent.at, intent.timeout)

        return list(read_journal(journal, unsent).values())

    def open_in(self, journal: Path) -> Any:
        """Sorted keys of the pairs whose outcome is unknown (see :meth:`open_intents`):
        a run stopped, or killed, with their request out, or still running."""
        import numpy as np

        try:
            intents = self.open_intents(journal)
        except OSError as exc:
            raise UsageError(f"cannot read the journal {str(journal)!r}: {exc.strerror}") from None
        keys = [pair_key(i.token, e) for i in intents for e in i.emails]
        return np.unique(np.array(keys, np.int64))

    def summary(self, unknown: Any = None, *, queued: bool = False) -> dict[str, Any]:
        """Totals over the whole history (emails by final state, rows rejected).

        ``unknown``: keys of the pairs whose outcome is unknown (see :meth:`open_in`); each
        counts as unknown only, whatever an earlier record of it says. ``queued``: a queue
        worker's report (no journal), whose failures that leave their message pending
        (``outcome_unknown``, ``listing_moved``, ``forbidden``, ``aborted``) count as
        ``pending``, not failed:
        the worker that claims the message settles them, in its own report."""
        import numpy as np

        statuses: Counter[str] = Counter()
        failed_by_code: Counter[str] = Counter()
        failed_by_token: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        finals = np.bincount(self._last, minlength=len(self.batches))
        unknown = np.empty(0, np.int64) if unknown is None else unknown
        if len(unknown) and len(self._keys):
            at, found = locate(self._keys, unknown)
            np.subtract.at(finals, self._last[at[found]], 1)
        finals = finals.tolist()
        for (status, code, token), pairs in zip(self.batches, finals, strict=True):
            if pairs:
                if queued and status == Status.FAILED and keeps_pending(code or ""):
                    statuses["pending"] += pairs
                    continue
                statuses[status] += pairs
                if status == Status.FAILED:
                    failed_by_code[code or "?"] += pairs
                    failed_by_token[token] += pairs
                elif status == Status.SKIPPED:
                    skipped[code or "skipped"] += pairs
        totals: dict[str, Any] = {
            "sent": statuses["sent"],
            "failed": statuses["failed"],
            "planned": statuses["planned"],
            "rejected": len(self.rejected),
            "skipped": statuses["skipped"],
            "unknown": len(unknown),
            "pending": statuses["pending"],
            "runs": len(self.runs),
            "complete": self.ends_with_summary,
            # How the last run ended, from its summary (None: it wrote none).
            "last_run": {name: getattr(self.runs[-1], name) for name in LAST_RUN}
            if self.ends_with_summary and self.runs
            else None,
        }
        for name in RUN_COUNTERS:
            totals[name] = sum(getattr(run, name) for run in self.runs)
        totals["duration_ms"] = round(totals["duration_ms"], 1)
        totals["failed_by_code"] = dict(failed_by_code.most_common())
        totals["failed_by_token"] = dict(failed_by_token.most_common())
        totals["rejected_by_reason"] = dict(Counter(self.rejected.values()).most_common())
        totals["skipped_by_reason"] = dict(skipped.most_common())
        totals["invitees_added"] = self.invitees_added
        # The last run's: a later run that looks again adds them back (send.recheck).
        last = self.runs[-1] if self.ends_with_summary and self.runs else None
        for name in ("invitees_lost", "invitees_unchecked"):
            value = getattr(last, name, 0)
            totals[name] = value if isinstance(value, int) else 0
        totals["revoked"] = self.revoked
        totals["revoked_by_what"] = dict(sorted(self.revoked_by_what.items()))
        totals["prunes_refused"] = sum(self.prunes_refused.values())
        totals["prune_refused_by_code"] = dict(self.prunes_refused.most_common())
        return totals
