"""Validation: every row trimmed and checked, duplicates caught by a compact pair index.

``rules`` holds the checks and the :class:`Validator`; ``dedupe`` the duplicate index.
"""

from worker.validate.rules import (
    EMAIL_RE,
    MAX_EMAIL_LENGTH,
    REASONS,
    TOKEN_RE,
    RawRow,
    Reason,
    Rejection,
    Validator,
    address_key,
    check_email,
    check_token,
    pair_key,
)

__all__ = [
    "EMAIL_RE",
    "MAX_EMAIL_LENGTH",
    "REASONS",
    "TOKEN_RE",
    "RawRow",
    "Reason",
    "Rejection",
    "Validator",
    "address_key",
    "check_email",
    "check_token",
    "pair_key",
]
