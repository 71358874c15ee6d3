"""Row validation: what may reach a URL, what looks like an address, what is a repeat."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

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
EMAIL_RE = re.compile(rf"{_ATEXT}++(?:\.{_ATEXT}++)*+@(?:{_LABEL}\.)++{_TLD}", re.ASCII)
MAX_EMAIL_LENGTH = 254

#: Human explanations of every reason code, for logs and error messages.
REASONS: dict[str, str] = {
    "missing_token": "the token is empty or missing",
    "missing_email": "the email is empty or missing",
    "invalid_token": "the token may contain only letters, digits, '-' and '_' (max 128)",
    "invalid_email": "the email does not look like an address (name@domain.tld)",
    "duplicate": "this token/email pair already appeared earlier (compared ignoring case)",
    "invalid_json": "the line is not valid JSON",
    "not_an_object": "the line is JSON but not an object with token and email",
    "not_a_string": "token and email must be JSON strings",
    "bad_encoding": "the line is not valid UTF-8",
    "line_too_long": "the line is longer than 64 KiB",
    "malformed_csv": "the line's quoting is broken (unbalanced or stray quote)",
    "too_few_fields": "the line has fewer fields than the token/email columns need",
    "too_many_fields": "the line has more fields than the header (an unquoted delimiter?)",
}


def check_token(token: str) -> bool:
    """True when ``token`` (already trimmed) is a plain share token."""
    return TOKEN_RE.fullmatch(token) is not None


def check_email(email: str) -> bool:
    """True when ``email`` (already trimmed) looks like a deliverable address."""
    return len(email) <= MAX_EMAIL_LENGTH and EMAIL_RE.fullmatch(email) is not None


def pair_key(token: str, email: str) -> int:
    """The identity of a (token, email) pair, ignoring case, as a 64-bit hash.

    The two string hashes are combined with XOR rather than by hashing a tuple: the token's
    hash is computed once per token (see :class:`Validator`), and no tuple is built per row.
    """
    return hash(token.lower()) ^ hash(email.lower())


class SeenPairs:
    """Remembers every valid (token, email) pair, ignoring case, to reject repeats.

    Stores one 64-bit hash per pair rather than the strings. A hash collision (odds about
    one in 10^7 for a million pairs) would reject a row as ``duplicate`` — visibly, in the
    report — never send it twice.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def add(self, token: str, email: str) -> bool:
        """Record the pair; False when it was already there."""
        key = pair_key(token, email)
        seen = self._seen
        if key in seen:
            return False
        seen.add(key)
        return True

    def __len__(self) -> int:
        return len(self._seen)


#: Distinct valid tokens remembered (checked, with the hash of their lower-case form); past
#: this, tokens are checked row by row again, so a million distinct tokens cannot grow it.
TOKEN_CACHE_SIZE = 100_000

RawRow = tuple[int | str, str | None, str | None, str | None]
Rejection = tuple[int | str, str, str | None, str | None]


class Validator:
    """Turns raw rows into valid pairs or reason codes."""

    __slots__ = ("_tokens", "seen")

    def __init__(self) -> None:
        self.seen = SeenPairs()
        self._tokens: dict[str, int] = {}  # valid token -> hash of its lower-case form

    def check(self, token: str | None, email: str | None) -> tuple[str, str, str | None]:
        """Return ``(token, email, reason)``: trimmed values, and ``None`` or why it is bad."""
        valid, rejected, _ = self.check_rows([(0, token, email, None)])
        if valid:
            return valid[0][0], valid[0][1], None
        _, reason, checked_token, checked_email = rejected[0]
        return checked_token or "", checked_email or "", reason

    def check_rows(
        self, rows: Sequence[RawRow], settled: Callable[[int], bool] | None = None
    ) -> tuple[list[tuple[str, str]], list[Rejection], int]:
        """Check a chunk of raw rows in one pass (the hot path of a run).

        Returns the valid ``(token, email)`` pairs (trimmed), the rejections as
        ``(line, reason, token, email)``, and how many valid pairs ``settled`` said to skip
        (already sent, on ``--resume``). Reasons, in order of precedence: missing_token,
        missing_email, invalid_token, invalid_email, duplicate.
        """
        valid: list[tuple[str, str]] = []
        rejected: list[Rejection] = []
        skipped = 0
        tokens, seen = self._tokens, self.seen._seen
        token_match, email_match = TOKEN_RE.fullmatch, EMAIL_RE.fullmatch
        for line, raw_token, raw_email, reason in rows:
            if reason is not None:
                rejected.append((line, reason, raw_token, raw_email))
                continue
            token = raw_token.strip() if raw_token else ""
            email = raw_email.strip() if raw_email else ""
            if not token:
                reason = "missing_token"
            elif not email:
                reason = "missing_email"
            else:
                token_hash = tokens.get(token)
                if token_hash is None:
                    if token_match(token) is None:
                        rejected.append((line, "invalid_token", token, email))
                        continue
                    token_hash = hash(token.lower())
                    if len(tokens) < TOKEN_CACHE_SIZE:
                        tokens[token] = token_hash
                if len(email) > MAX_EMAIL_LENGTH or email_match(email) is None:
                    reason = "invalid_email"
                else:
                    key = token_hash ^ hash(email.lower())  # == pair_key(token, email)
                    if key in seen:
                        reason = "duplicate"
                    else:
                        seen.add(key)
                        if settled is not None and settled(key):
                            skipped += 1
                        else:
                            valid.append((token, email))
                        continue
            rejected.append((line, reason, token, email))
        return valid, rejected, skipped
