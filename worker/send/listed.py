"""Reading what the service lists: a shared dashboard's allow-list, a page of invitations.

Both can be large (a dashboard allowing a million addresses, a listing of as many
invitations), so a well-formed body is decoded straight into small structs of the fields
the worker decides from; anything else is read field by field, tolerating any shape.
"""

from __future__ import annotations

from typing import Any

import msgspec

from worker.outcome import Invitation
from worker.send.answers import json_or_none


class Invitee(msgspec.Struct, frozen=True, gc=False):
    """An address a shared dashboard allows, until ``access_expiration`` (None: always)."""

    email: str
    access_expiration: str | None = None


class SharedDashboard(msgspec.Struct, frozen=True, gc=False):
    """What the worker needs of a shared dashboard; an allow-list is None when not given.

    Held only while a token is checked: the check keeps hashes of the addresses, not these.
    """

    share_type: str | None = None
    status: str | None = None
    invitees: list[Invitee] | None = None
    share_list: list[str] | None = None


_DASHBOARD = msgspec.json.Decoder(SharedDashboard)


def read_dashboard(raw: bytes) -> SharedDashboard:
    """The shared dashboard in a body: only the fields above are decoded (no dict per
    invitee); a body of another shape goes through :func:`shared_dashboard`."""
    try:
        return _DASHBOARD.decode(raw)
    except ValueError:
        return shared_dashboard(json_or_none(raw))


def shared_dashboard(doc: Any) -> SharedDashboard:
    """The shared dashboard object, tolerating any shape: what is malformed is unknown."""
    if not isinstance(doc, dict):
        return SharedDashboard()
    invitees = None
    if isinstance(doc.get("invitees"), list):
        invitees = []
        for item in doc["invitees"]:
            if isinstance(item, dict) and isinstance(item.get("email"), str):
                expiry = item.get("access_expiration")
                invitees.append(Invitee(item["email"], expiry if isinstance(expiry, str) else None))
    share_list = None
    if isinstance(doc.get("share_list"), list):
        share_list = [e for e in doc["share_list"] if isinstance(e, str)]
    text = {
        k: doc.get(k) if isinstance(doc.get(k), str) else None for k in ("share_type", "status")
    }
    return SharedDashboard(text["share_type"], text["status"], invitees, share_list)


class Listed(msgspec.Struct, frozen=True, gc=False):
    """What the worker reads of one listed invitation: the decisions' fields and the
    record's (see :meth:`invitation`), nothing else."""

    email: str
    created_at: str | None = None
    invitation_expiry: str | None = None
    has_session: bool | None = None
    session_expiry: str | None = None

    def invitation(self) -> Invitation:
        """The invitation as a record keeps it."""
        return Invitation(self.email, self.created_at, self.invitation_expiry)


class _ListedItem(msgspec.Struct, gc=False):
    attributes: Listed


class _PageInfo(msgspec.Struct, gc=False):
    total_count: int | None = None


class _Meta(msgspec.Struct, gc=False):
    page: _PageInfo | None = None


class _ListPage(msgspec.Struct, gc=False):
    data: list[_ListedItem] = []  # msgspec copies a default empty list
    meta: _Meta | None = None


_LIST_PAGE = msgspec.json.Decoder(_ListPage)


def read_listing(raw: bytes) -> tuple[list[Listed], int | None] | None:
    """A page of invitations and ``meta.page.total_count``; None when it is not JSON.

    A well-formed page is decoded straight into :class:`Listed` (five fields of each
    invitation, no dicts); any other shape is read field by field, what is malformed left
    out.
    """
    try:
        page = _LIST_PAGE.decode(raw)
    except ValueError:
        return _listing(json_or_none(raw), raw)
    meta = page.meta.page if page.meta is not None else None
    return [item.attributes for item in page.data], meta.total_count if meta else None


def _listing(doc: Any, raw: bytes) -> tuple[list[Listed], int | None] | None:
    if doc is None and raw.strip() != b"null":
        return None
    total: Any = doc
    for key in ("meta", "page", "total_count"):
        total = total.get(key) if isinstance(total, dict) else None
    count = total if isinstance(total, int) and not isinstance(total, bool) else None
    data = doc.get("data") if isinstance(doc, dict) else None
    out: list[Listed] = []
    for item in data if isinstance(data, list) else []:
        attributes = item.get("attributes") if isinstance(item, dict) else None
        if not isinstance(attributes, dict) or not isinstance(attributes.get("email"), str):
            continue
        text = {k: v if isinstance(v := attributes.get(k), str) else None
                for k in ("created_at", "invitation_expiry", "session_expiry")}  # fmt: skip
        session = attributes.get("has_session") is True
        out.append(Listed(attributes["email"], text["created_at"], text["invitation_expiry"],
                          session, text["session_expiry"]))  # fmt: skip
    return out, count
