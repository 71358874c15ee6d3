"""The dead-letter stream: messages that failed for good, to inspect and, once fixed, requeue.

A queue worker copies a message here (``<stream>:dead`` by default) with ``token``,
``email``, ``stream_id``, ``error_code``, ``error_message`` and ``failed_at`` when it fails
for good or was delivered too often. :func:`requeue` moves chosen ones back to the stream as
new ``token``/``email`` messages. Each move — add to the stream, delete from the dead
letters — is one Lua script, so it happens whole or not at all: a requeue cut short and run
again moves only what is left, and never puts a message back twice.
"""

from __future__ import annotations

import contextlib
import difflib
from collections import Counter
from collections.abc import AsyncGenerator, Collection
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

#: Dead letters read per XRANGE page, and moved per script call.
PAGE = 500

# KEYS: dead-letter stream, stream. ARGV: ids. A dead letter without a token or an email
# (or with an empty one) is left where it is; one already moved (by an earlier requeue) is
# simply not found. The fields are moved as the bytes they are.
_REQUEUE = """
local moved = 0
for _, id in ipairs(ARGV) do
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if #entry == 1 then
    local fields, token, email = entry[1][2], nil, nil
    for i = 1, #fields, 2 do
      if fields[i] == 'token' then token = fields[i + 1] end
      if fields[i] == 'email' then email = fields[i + 1] end
    end
    if token and email and token ~= '' and email ~= '' then
      redis.call('XADD', KEYS[2], '*', 'token', token, 'email', email, 'requeued_from', id)
      redis.call('XDEL', KEYS[1], id)
      moved = moved + 1
    end
  end
end
return moved
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the dead-letter stream."""

    id: str
    fields: dict[str, str]

    @property
    def code(self) -> str:
        """The error code it failed with (``max_deliveries`` for one delivered too often)."""
        return self.fields.get("error_code", "")

    @property
    def requeueable(self) -> bool:
        """Whether it carries what a message needs: a token and an address (an empty one,
        as a message lacking it is dead-lettered, is none)."""
        return bool(self.fields.get("token")) and bool(self.fields.get("email"))


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command acts on: all, or those with these codes or ids."""

    codes: Collection[str] = ()
    ids: Collection[str] = ()

    def __contains__(self, letter: DeadLetter) -> bool:
        if not self.codes and not self.ids:
            return True
        return letter.code in self.codes or letter.id in self.ids


async def dead_letters(
    redis: Redis, key: str, selection: Selection = Selection(), *, until: str = "+"
) -> AsyncGenerator[list[DeadLetter], None]:
    """The selected dead letters of ``key`` up to id ``until``, oldest first, a page at a time."""
    start = "-"
    while True:
        entries: Any = await redis.xrange(key, min=start, max=until, count=PAGE)
        if not entries:
            return
        page = [DeadLetter(_text(mid), {_text(k): _text(v) for k, v in (fields or {}).items()})
                for mid, fields in entries]  # fmt: skip
        chosen = [letter for letter in page if letter in selection]
        if chosen:
            yield chosen
        start = f"({page[-1].id}"


async def codes_present(redis: Redis, key: str, wanted: Collection[str]) -> Counter[str]:
    """How many dead letters there are of each error code; read only until every code
    ``wanted`` was seen (the counts are then partial): the command that asked reads the
    dead letters again, so a second whole pass is kept for a code that is missing."""
    counts: Counter[str] = Counter()
    async with contextlib.aclosing(dead_letters(redis, key)) as pages:
        async for page in pages:
            counts.update(letter.code for letter in page)
            if all(code in counts for code in wanted):
                break
    return counts


def mistyped_codes(wanted: Collection[str], present: Counter[str]) -> dict[str, str]:
    """Of the codes asked for that no dead letter has, those that look like a slip of the
    keyboard for one there is: each with the code it most likely meant."""
    meant = {}
    for code in sorted(set(wanted) - set(present)):
        close = difflib.get_close_matches(code, [c for c in present if c], n=1, cutoff=0.8)
        if close:
            meant[code] = close[0]
    return meant


async def requeue(
    redis: Redis, key: str, stream: str, selection: Selection, *, dry_run: bool = False
) -> dict[str, int]:
    """Move the selected dead letters back to ``stream``; counts of what was done.

    ``requeued`` were moved; ``not_requeueable`` lack a token or an address and stay.
    With ``dry_run`` nothing moves and ``requeued`` counts what would.
    """
    script: Any = redis.register_script(_REQUEUE)
    moved = skipped = 0
    # Only what is dead now: a message that fails again while this runs is not taken twice.
    newest: Any = await redis.xrevrange(key, max="+", min="-", count=1)
    if not newest:
        return {"requeued": 0, "not_requeueable": 0}
    async for page in dead_letters(redis, key, selection, until=_text(newest[0][0])):
        ids = [letter.id for letter in page if letter.requeueable]
        skipped += len(page) - len(ids)
        if ids and not dry_run:
            moved += int(await script(keys=[key, stream], args=ids))
        elif ids:
            moved += len(ids)
    return {"requeued": moved, "not_requeueable": skipped}


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
