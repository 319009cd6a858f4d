"""The sender: hands what the outbox holds to the relay, and records what the relay said.

Part of :mod:`gateway.outbound` (step 3): ``ready`` rows go to the relay; 250 → ``sent``, 4xx or
no connection → ``retry`` with backoff, 5xx or too old → ``failed`` and the admin is alerted;
each final state is filed as an ``outcome`` entry. A failure is never recorded as sent.

A run (:meth:`Sender.run_once`) goes over one session (one relay connection, RSET between
messages) in batches; a batch is recorded in one transaction, for the rows this sender still
holds, and that transaction claims the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from archive import tables as t
from archive.log import Item
from archive.service import Archive
from gateway.outbound import Attempt, alert, backoff, claim

log = logging.getLogger("gateway.sender")


class Deliverer(Protocol):
    """What hands messages to the relay: :class:`gateway.relay.RelaySession` in ``serve``."""

    def deliver(self, message: bytes, *, mail_from: str, rcpt_to: Sequence[str]) -> Attempt: ...


#: Opens a session for one batch (one relay connection), closed when the batch is done.
OpenSession = Callable[[], AbstractContextManager[Deliverer]]


@dataclass(frozen=True)
class Unsendable:
    """A row the relay is never offered (our own defect, e.g. a bare LF): failed, and the
    admin is alerted, like any failure; the other rows of the batch go on."""

    problem: str
    outcome: Literal["failed"] = "failed"

    @property
    def reply(self) -> str:
        return f"not sent: {self.problem}"


@dataclass
class Sender:
    archive: Archive
    open_session: OpenSession
    clock: Callable[[], datetime]
    name: str
    admin: str = ""
    give_up_after: timedelta = timedelta(hours=48)

    def run_once(self, limit: int = 20, batches: int = 5) -> list[tuple[int, str]]:
        """Send what is ready, in one relay session; returns (outbox id, new state) for each row
        handled. Up to ``batches`` batches of ``limit`` rows: each batch's outcome is recorded
        in the transaction that claims the next one (bytes in memory stay at one batch)."""
        db = self.archive.db
        with db.session() as s:
            ids = claim(s, self.name, self.clock(), limit, sending=True)
        if not ids:
            return []
        out: list[tuple[int, str]] = []
        with self.open_session() as session:
            for more in range(batches - 1, -1, -1):
                results = self._deliver(session, ids)
                with db.session() as s:
                    out += self._record(s, results)
                    ids = claim(s, self.name, self.clock(), limit, sending=True) if more else []
                if not ids:
                    break
        return out

    def _deliver(self, session: Deliverer, ids: Sequence[int]) -> list[tuple[int, Attempt]]:
        with self.archive.db.session(read_only=True) as s:
            jobs = list(
                s.execute(
                    select(t.Outbox.id, t.Outbox.message, t.Outbox.mail_from, t.Outbox.rcpt_to)
                    .where(t.Outbox.id.in_(ids))
                    .order_by(t.Outbox.id)
                )
            )
        results: list[tuple[int, Attempt]] = []
        for number, message, mail_from, rcpt_to in jobs:
            if not message or not mail_from or not rcpt_to:
                results.append((number, Unsendable("no message, sender or recipient")))
                continue
            try:
                attempt = session.deliver(message, mail_from=mail_from, rcpt_to=rcpt_to)
            except ValueError as err:  # a message we built wrongly: never retried as is
                attempt = Unsendable(str(err))
            results.append((number, attempt))
        return results

    def _record(self, s: Session, results: list[tuple[int, Attempt]]) -> list[tuple[int, str]]:
        """Record the relay's answers, for the rows this sender still holds (one statement)."""
        now = self.clock()
        o = t.Outbox
        query = select(
            o.id, o.state, o.worker, o.attempts, o.created_at, o.next_attempt_at,
            o.entry_seq, o.key, o.kind,
        ).where(o.id.in_([number for number, _ in results]))  # fmt: skip
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()  # held to the commit: a lease takeover waits
        rows = {row.id: row for row in s.execute(query)}
        out, items, changes = [], [], []
        for number, attempt in results:
            row = rows.get(number)
            if row is None or row.state != "sending" or row.worker != self.name:
                continue
            attempts, reply = row.attempts + 1, attempt.reply[:2000]
            state: str = attempt.outcome
            if state == "retry" and now - row.created_at >= self.give_up_after:
                state = "failed"
            retry_at = row.next_attempt_at
            if state == "retry":
                retry_at = now + backoff(attempts)
                log.warning("outbox %s (%s) will be retried: %s", row.id, row.key, attempt.reply)
            else:
                items.append(
                    Item(
                        "outcome",
                        now,
                        {
                            "for_seq": row.entry_seq,
                            "outbox": row.key,
                            "status": state,
                            "reply": reply,
                            "attempts": attempts,
                        },
                        {},
                    )
                )
                if state == "failed":
                    log.error("outbox %s (%s) failed: %s", row.id, row.key, attempt.reply)
                    if row.kind != "alert" and self.admin:
                        s.add(alert(row.key, f"{row.kind} {row.key}: {attempt.reply}", now))
            changes.append(
                {
                    "id": number,
                    "state": state,
                    "attempts": attempts,
                    "last_reply": reply,
                    "next_attempt_at": retry_at,
                    "worker": None,
                    "lease_until": None,
                    "updated_at": now,
                }
            )
            out.append((number, state))
        if changes:
            s.execute(update(t.Outbox), changes)  # by primary key, one executemany
        if items:
            self.archive.file_in(s, items, at=now)
        return out
