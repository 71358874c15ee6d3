"""Row validation: what may reach a URL, what looks like an address, what is a repeat."""

from __future__ import annotations

import re

#: A share token as Datadog issues them: letters, digits, ``-`` and ``_``, nothing else.
#: This is the only gate between input and a URL path, so it is deliberately narrow.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)

#: A practical address check: RFC 5322 "atext" dot-atoms on both sides, a dotted domain.
EMAIL_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9]",
    re.ASCII,
)
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
    """The identity of a (token, email) pair, ignoring case, as a 64-bit hash."""
    return hash((token.lower(), email.lower()))


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


class Validator:
    """Turns raw rows into valid pairs or reason codes."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = SeenPairs()

    def check(self, token: str | None, email: str | None) -> tuple[str, str, str | None]:
        """Return ``(token, email, reason)``: trimmed values, and ``None`` or why it is bad."""
        token = token.strip() if token else ""
        email = email.strip() if email else ""
        if not token:
            return token, email, "missing_token"
        if not email:
            return token, email, "missing_email"
        if TOKEN_RE.fullmatch(token) is None:
            return token, email, "invalid_token"
        if len(email) > MAX_EMAIL_LENGTH or EMAIL_RE.fullmatch(email) is None:
            return token, email, "invalid_email"
        if not self.seen.add(token, email):
            return token, email, "duplicate"
        return token, email, None
