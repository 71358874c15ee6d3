"""Row validation: what may reach a URL, what looks like an address, what is a repeat."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from enum import StrEnum
from operator import itemgetter, xor
from typing import Any

from worker.sources.lines import Columns
from worker.validate.dedupe import PairIndex

#: A share token as Datadog issues them: letters, digits, ``-`` and ``_``, nothing else.
#: This is the only gate between input and a URL path, so it is deliberately narrow.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)

#: A practical address check: RFC 5322 "atext" dot-atoms before the ``@``; after it, DNS
#: labels (letters and digits, hyphens only inside) and a top-level label of at least two
#: characters starting with a letter. Possessive quantifiers: the hot path never
#: backtracks. (Labels longer than 63 characters are not refused; the 254 total is.)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9]++(?:-++[A-Za-z0-9]++)*+"
_TLD = r"[A-Za-z](?:[A-Za-z0-9]++(?:-++[A-Za-z0-9]++)*+|(?:-++[A-Za-z0-9]++)++)"
_EMAIL = rf"{_ATEXT}++(?:\.{_ATEXT}++)*+@(?:{_LABEL}\.)++{_TLD}"
EMAIL_RE = re.compile(_EMAIL, re.ASCII)
#: Many addresses joined by line breaks, each matching :data:`EMAIL_RE` (a chunk in one call).
EMAILS_RE = re.compile(rf"(?:{_EMAIL}\n)*+{_EMAIL}", re.ASCII)
MAX_EMAIL_LENGTH = 254


class Reason(StrEnum):
    """Why an input row (or stream message) was rejected: the report's ``reason``."""

    MISSING_TOKEN = "missing_token"  # noqa: S105 - a reason, not a password
    MISSING_EMAIL = "missing_email"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - a reason, not a password
    INVALID_EMAIL = "invalid_email"
    DUPLICATE = "duplicate"
    MALFORMED_CSV = "malformed_csv"
    TOO_FEW_FIELDS = "too_few_fields"
    TOO_MANY_FIELDS = "too_many_fields"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    NOT_A_STRING = "not_a_string"
    BAD_ENCODING = "bad_encoding"
    LINE_TOO_LONG = "line_too_long"
    MESSAGE_TRIMMED = "message_trimmed"


#: Human explanations of every reason code, for logs and error messages.
REASONS: dict[Reason, str] = {
    Reason.MISSING_TOKEN: "the token is empty or missing",
    Reason.MISSING_EMAIL: "the email is empty or missing",
    Reason.INVALID_TOKEN: "the token may contain only letters, digits, '-' and '_' (max 128)",
    Reason.INVALID_EMAIL: "the email does not look like an address (name@domain.tld)",
    Reason.DUPLICATE: "this token/email pair already appeared earlier (compared ignoring case)",
    Reason.INVALID_JSON: "the line is not valid JSON",
    Reason.NOT_AN_OBJECT: "the line is JSON but not an object with token and email",
    Reason.NOT_A_STRING: "token and email must be JSON strings",
    Reason.BAD_ENCODING: "the line (or the stream message) is not valid UTF-8",
    Reason.LINE_TOO_LONG: "the line is longer than 64 KiB",
    Reason.MALFORMED_CSV: "the line's quoting is broken (unbalanced or stray quote)",
    Reason.TOO_FEW_FIELDS: "the line has fewer fields than the token/email columns need",
    Reason.TOO_MANY_FIELDS: "the line has more fields than the header (an unquoted delimiter?)",
    Reason.MESSAGE_TRIMMED: "the stream message was deleted (a producer's MAXLEN or XDEL) "
    "before this worker read its token and email: a worker that read it settles it if it "
    "is still running (its report or the dead letters name this id); if none is, the pair "
    "went with the entry: enqueue it again from its source",
}


def check_token(token: str) -> bool:
    """True when ``token`` (already trimmed) is a plain share token."""
    return TOKEN_RE.fullmatch(token) is not None


def check_email(email: str) -> bool:
    """True when ``email`` (already trimmed) looks like a deliverable address."""
    return len(email) <= MAX_EMAIL_LENGTH and EMAIL_RE.fullmatch(email) is not None


def address_key(email: str) -> int:
    """The identity of an address, ignoring case, as a 64-bit hash: what a pair's key
    (:func:`pair_key`) combines with its token's, and what per-token state keeps of an
    address (``send.compact``, a report's replay)."""
    return hash(email.lower())


def pair_key(token: str, email: str) -> int:
    """The identity of a (token, email) pair, ignoring case, as a 64-bit hash.

    The two string hashes are combined with XOR rather than by hashing a tuple: the token's
    hash is computed once per token (see :class:`Validator`), and no tuple is built per row.
    A collision (odds about one in 10^7 for a million pairs) never sends anyone twice: in
    a run it rejects a row as ``duplicate``, visibly in the report; on ``--resume`` it
    skips a pair as settled, counted in the summary's ``skipped`` (which then exceeds the
    pairs the earlier runs settled).
    """
    return hash(token.lower()) ^ hash(email.lower())


#: Distinct valid tokens remembered (checked, with the hash of their lower-case form); past
#: this, tokens are checked row by row again, so a million distinct tokens cannot grow it.
TOKEN_CACHE_SIZE = 100_000

RawRow = tuple[int | str, str | None, str | None, str | None]
_LINE, _TOKEN, _EMAIL_CELL, _REASON = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(3)
Rejection = tuple[int | str, str, str | None, str | None]


class Validator:
    """Turns raw rows into valid pairs or reason codes."""

    __slots__ = ("_tokens", "seen")

    def __init__(self) -> None:
        #: Every valid pair so far, as :func:`pair_key` keys, to reject repeats.
        self.seen = PairIndex()
        self._tokens: dict[str, int] = {}  # valid token -> hash of its lower-case form

    def check(self, token: str | None, email: str | None) -> tuple[str, str, str | None]:
        """Return ``(token, email, reason)``: trimmed values, and ``None`` or why it is bad."""
        valid, rejected, _ = self.check_rows([(0, token, email, None)])
        if valid:
            return valid[0][0], valid[0][1], None
        _, reason, checked_token, checked_email = rejected[0]
        return checked_token or "", checked_email or "", reason

    def check_rows(
        self, rows: Sequence[RawRow], settled: Callable[[list[int]], set[int]] | None = None
    ) -> tuple[list[tuple[str, str]], list[Rejection], int]:
        """Check a chunk of raw rows (the hot path of a run).

        Returns the valid ``(token, email)`` pairs (trimmed), the rejections as
        ``(line, reason, token, email)``, and how many valid pairs ``settled`` said to skip
        (already sent, on ``--resume``: it gets the chunk's :func:`pair_key` keys and
        returns those to skip). Reasons, in order of precedence: missing_token,
        missing_email, invalid_token, invalid_email, duplicate.
        """
        rejected: list[Rejection] = []
        clean = self._clean_chunk(rows)
        if clean is not None:
            pairs, keys = clean
            lines: Sequence[int | str] | None = None  # every row is a pair: rows[i] is pair i
        else:
            pairs, keys, lines = self._check_each(rows, rejected)
        # Duplicates are found for the whole chunk at once (see PairIndex.add_many).
        repeats = self.seen.add_many(keys)
        done = settled(keys) if settled is not None else None
        if not repeats and not done:
            return pairs, rejected, 0
        repeated = set(repeats)
        if lines is None:
            lines = [row[0] for row in rows]
        valid: list[tuple[str, str]] = []
        skipped = 0
        for position, (pair, key) in enumerate(zip(pairs, keys, strict=True)):
            if position in repeated:
                rejected.append((lines[position], Reason.DUPLICATE, *pair))
            elif done and key in done:
                skipped += 1
            else:
                valid.append(pair)
        if repeated and len(rejected) > len(repeated):
            rejected.sort(key=_LINE)  # duplicates were found last: back into input order
        return valid, rejected, skipped

    def _clean_chunk(
        self, rows: Sequence[RawRow]
    ) -> tuple[list[tuple[str, str]], list[int]] | None:
        """Pairs and keys of a chunk in which every row is well-formed, or None.

        The common case, done column-wise with C-level string operations (one regex over
        the joined addresses, one lower-casing, ``map(hash, ...)``) instead of a dozen Python
        steps per row. Anything unusual — a rejected row, surrounding spaces, an unknown
        token — returns None, and :meth:`_check_each` decides row by row.
        """
        if not rows:
            return None
        raw_tokens: list[Any]
        raw_emails: list[Any]
        if isinstance(rows, Columns):  # a reader's clean block: the columns are there
            raw_tokens, raw_emails = rows.tokens, rows.emails
        elif any(map(_REASON, rows)):
            return None
        else:
            raw_tokens, raw_emails = list(map(_TOKEN, rows)), list(map(_EMAIL_CELL, rows))
        tokens = self._tokens
        for token in set(raw_tokens).difference(tokens):
            if (
                type(token) is not str
                or len(tokens) >= TOKEN_CACHE_SIZE
                or TOKEN_RE.fullmatch(token) is None
            ):
                return None
            tokens[token] = hash(token.lower())
        try:
            joined = "\n".join(raw_emails)
        except TypeError:  # a missing email
            return None
        if (
            joined.count("\n") != len(raw_emails) - 1  # an address holding a line break
            or max(map(len, raw_emails)) > MAX_EMAIL_LENGTH
            or EMAILS_RE.fullmatch(joined) is None
        ):
            return None
        email_hashes = map(hash, joined.lower().split("\n"))
        keys = list(map(xor, map(tokens.__getitem__, raw_tokens), email_hashes))
        return list(zip(raw_tokens, raw_emails, strict=True)), keys

    def _check_each(
        self, rows: Sequence[RawRow], rejected: list[Rejection]
    ) -> tuple[list[tuple[str, str]], list[int], list[int | str]]:
        """Row by row: trim, check, and give each bad row its reason."""
        pairs: list[tuple[str, str]] = []
        keys: list[int] = []
        lines: list[int | str] = []
        tokens = self._tokens
        token_match, email_match = TOKEN_RE.fullmatch, EMAIL_RE.fullmatch
        for line, raw_token, raw_email, reason in rows:
            if reason is not None:
                rejected.append((line, reason, raw_token, raw_email))
                continue
            token = raw_token.strip() if raw_token else ""
            email = raw_email.strip() if raw_email else ""
            if not token:
                reason = Reason.MISSING_TOKEN
            elif not email:
                reason = Reason.MISSING_EMAIL
            else:
                token_hash = tokens.get(token)
                if token_hash is None:
                    if token_match(token) is None:
                        rejected.append((line, Reason.INVALID_TOKEN, token, email))
                        continue
                    token_hash = hash(token.lower())
                    if len(tokens) < TOKEN_CACHE_SIZE:
                        tokens[token] = token_hash
                if len(email) <= MAX_EMAIL_LENGTH and email_match(email) is not None:
                    pairs.append((token, email))
                    keys.append(token_hash ^ hash(email.lower()))  # == pair_key(token, email)
                    lines.append(line)
                    continue
                reason = Reason.INVALID_EMAIL
            rejected.append((line, reason, token, email))
        return pairs, keys, lines
