"""The durable inbox: a received message is committed here before the gateway answers 250.

An edge over :class:`archive.db.Database`. :func:`accept` (one message) and
:func:`accept_many` (several, in one transaction) are what the SMTP/LMTP listener and the IMAP
poller call; they return only once the raw bytes are durably committed (SQLite WAL +
synchronous=FULL, or PostgreSQL synchronous commit), and raise
:class:`~formats.errors.TransientError` (451) when they could not be.

:class:`GroupCommitter` is the listener's group commit: messages whose data completes while a
commit is under way are committed together in the next transaction (one write lock, one fsync),
and each learns its number — or the failure — only once that transaction is over.

:func:`release` puts a quarantined message back, by an admin's decision (``gateway archive
release``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from archive import tables as t
from archive.db import Database, Driver, insert_returning
from archive.records import Transport
from formats.errors import InputError, TransientError
from keys import store

#: The states of an intake row (:class:`archive.tables.Intake`), in the order a message goes.
STATES = ("new", "working", "retry", "done")

#: One message to take in: the raw bytes, how they came, and the origin key (or ``None``).
Item = tuple[bytes, Transport, str | None]


def accept(db: Database, raw: bytes, transport: Transport, *, source_key: str | None = None) -> int:
    """Commit ``raw`` durably and return its intake number.

    ``source_key`` names a fetched message's origin (``imap:user@host/INBOX/<uidvalidity>/<uid>``):
    if a message with that key was already taken in (fetched, committed, then a crash before
    it was moved), its number is returned and nothing new is stored.
    """
    return accept_many(db, [(raw, transport, source_key)])[0]


def accept_many(db: Database, items: Sequence[Item]) -> list[int]:
    """Commit every item durably in one transaction; their intake numbers, in item order.

    All or nothing: either every item is committed (or, by its ``source_key``, found already
    taken in, as in :func:`accept`; two items with one key get one row) or none is, and
    :class:`TransientError` is raised.
    """
    if not items:
        return []
    try:
        if db.dialect == "sqlite":  # the driver's own connection: the least CPU before a 250
            with db.driver_transaction(priority=True) as driver:
                return _insert(driver, items)
        with db.connection(priority=True) as c:  # a peer waits for this commit
            return _insert(c, items)
    except TransientError:
        raise
    except (SQLAlchemyError, OSError) as exc:
        # Disk full, read-only file system, I/O error: not committed, so the peer must retry.
        raise TransientError(f"the message could not be stored ({type(exc).__name__})") from exc


def _insert(c: Connection | Driver, items: Sequence[Item]) -> list[int]:
    """:func:`accept_many`'s statements, in its transaction."""
    keys = {key for _, _, key in items if key is not None}
    known: dict[str, int] = {}
    if keys:
        query = select(t.Intake.source_key, t.Intake.id).where(t.Intake.source_key.in_(keys))
        found = c.rows(query) if isinstance(c, Driver) else c.execute(query)
        known = {key: number for key, number in found if key is not None}
    # Each item is an existing number or the index of its new row; the new rows go in with
    # INSERT … RETURNING, numbers in the order of the rows.
    places: list[tuple[bool, int]] = []
    fresh: dict[str, int] = {}
    new: list[dict[str, Any]] = []
    for raw, transport, key in items:
        if key is not None and key in known:
            places.append((False, known[key]))
        elif key is not None and key in fresh:
            places.append((True, fresh[key]))
        else:
            places.append((True, len(new)))
            if key is not None:
                fresh[key] = len(new)
            new.append(_row(raw, transport, key))
    ids = insert_returning(c, t.Intake, new, "id") if new else []
    return [ids[at] if is_new else at for is_new, at in places]


def release(
    s: Session, seq: int, fields: Mapping[str, Any], raw: bytes, *, at: datetime, actor: str
) -> tuple[int, bool]:
    """Put quarantined message entry ``seq`` (its ``fields``, its ``raw`` bytes) back in the
    inbox, to be decided again (the state machine's quarantined → received), in the caller's
    transaction with its admin event. It keeps its transport and time of receipt: it is judged
    as it would have been when it arrived. Released once: ``(intake number, True)``; again, the
    first release's number and ``False``. :class:`InputError` for anything but a quarantined
    message."""
    if fields.get("kind") != "message" or fields.get("status") != "quarantined":
        what = f"a {fields.get('status')} {fields.get('kind')}" if fields.get("kind") else "not"
        raise InputError(f"entry {seq} is {what} entry: only a quarantined message is released")
    key = f"release:{seq}"
    known = s.scalar(select(t.Intake.id).where(t.Intake.source_key == key))
    if known is not None:
        return known, False
    transport = Transport.from_dict(fields["transport"])
    transport = dataclasses.replace(
        transport,
        extra={**transport.extra, "released_from": str(seq), "released_at": at.isoformat()},
    )
    number = s.scalar(insert(t.Intake).values(**_row(raw, transport, key)).returning(t.Intake.id))
    assert number is not None
    store.record(
        s, at=at, actor=actor, action="release", subject=f"entry {seq}", intake=number,
        reasons=[r.get("code") for r in fields.get("reasons", [])],
    )  # fmt: skip
    return number, True


def _row(raw: bytes, transport: Transport, source_key: str | None) -> dict[str, Any]:
    return {
        "received_at": transport.received_at,
        "transport": transport.as_dict(),
        "raw": raw,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "state": "new",
        "attempts": 0,
        "next_attempt_at": None,
        "archive_seq": None,
        "updated_at": transport.received_at,
        "size": len(raw),
        "source_key": source_key,
    }


def backoff(attempts: int) -> timedelta:
    """1, 2, 4 … minutes, at most an hour, between tries of a transiently failing message."""
    return timedelta(minutes=min(60, 2 ** max(0, attempts - 1)))


# --- group commit -----------------------------------------------------------------------------

#: Bounds of one group transaction (a single larger message still goes, alone).
GROUP_MAX_MESSAGES = 64
GROUP_MAX_BYTES = 64 * 1024 * 1024


@dataclass(eq=False)
class _Waiting:
    item: Item
    future: asyncio.Future[int]


class GroupCommitter:
    """Group commit on one event loop, over ``concurrency`` commits at a time in ``executor``.

    :meth:`submit` queues a message and returns a future for its intake number. While fewer
    than ``concurrency`` transactions are under way, one starts at once with everything
    waiting (at most ``max_messages`` messages and ``max_bytes`` bytes, at least one); when a
    transaction ends, every future of its group is resolved with its number or, if the
    transaction failed, with the same exception (never a number: nothing of it was stored),
    and the next group starts. A lone message takes :func:`accept`, a group :func:`accept_many`.

    No waiting for company: a message arriving at an idle committer is committed at once, so
    grouping costs no latency; it forms by itself when commits are the bottleneck. A future
    cancelled while still queued (its session went away) is dropped, not committed.

    Not thread-safe: :meth:`submit` is called on the event loop, which also runs the
    completions; the executor's threads only run the transactions.
    """

    def __init__(
        self,
        db: Database,
        executor: Executor | None = None,
        *,
        concurrency: int = 1,
        max_messages: int = GROUP_MAX_MESSAGES,
        max_bytes: int = GROUP_MAX_BYTES,
    ) -> None:
        if concurrency < 1 or max_messages < 1:
            raise ValueError("a group committer needs concurrency and max_messages of at least 1")
        self.db = db
        self.executor = executor
        self.concurrency = concurrency
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._queue: deque[_Waiting] = deque()
        self._running = 0

    @property
    def waiting(self) -> int:
        """Messages queued for a next group (not yet in a transaction)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Group transactions under way."""
        return self._running

    def submit(
        self, raw: bytes, transport: Transport, source_key: str | None = None
    ) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.append(_Waiting((raw, transport, source_key), future))
        self._start(loop)
        return future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running < self.concurrency:
            group = self._take()
            if not group:
                return
            self._running += 1
            try:
                done = loop.run_in_executor(self.executor, self._store, [w.item for w in group])
            except Exception as exc:  # e.g. an executor already shut down: nothing stored
                done = loop.create_future()
                done.set_exception(exc)
            done.add_done_callback(functools.partial(self._finished, loop, group))

    def _take(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        size = 0
        while self._queue and len(group) < self.max_messages:
            waiting = self._queue[0]
            if waiting.future.done():  # cancelled while queued: its peer gets no reply
                self._queue.popleft()
                continue
            length = len(waiting.item[0])
            if group and size + length > self.max_bytes:
                break
            self._queue.popleft()
            group.append(waiting)
            size += length
        return group

    def _store(self, items: list[Item]) -> list[int]:
        if len(items) == 1:
            raw, transport, key = items[0]
            if key is None:
                return [accept(self.db, raw, transport)]
            return [accept(self.db, raw, transport, source_key=key)]
        return accept_many(self.db, items)

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        group: list[_Waiting],
        done: asyncio.Future[list[int]],
    ) -> None:
        self._running -= 1
        cancelled = done.cancelled()  # (only if the loop went down with it: no number then)
        error = TransientError("the commit was cancelled") if cancelled else done.exception()
        numbers: list[int] = [] if error is not None else done.result()
        if error is None and len(numbers) != len(group):
            error = RuntimeError(f"{len(numbers)} intake numbers for {len(group)} messages")
        for i, waiting in enumerate(group):
            if waiting.future.done():  # its session was cancelled meanwhile
                continue
            if error is not None:
                waiting.future.set_exception(error)
            else:
                waiting.future.set_result(numbers[i])
        self._start(loop)
