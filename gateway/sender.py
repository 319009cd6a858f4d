"""The sender: hands what the outbox holds to the relay, and records what the relay said.

Part of :mod:`gateway.outbound` (step 3): ``ready`` rows go to the relay; 250 → ``sent``, 4xx or
no connection → ``retry`` with backoff, 5xx or too old → ``failed`` and the admin is alerted;
each final state is filed as an ``outcome`` entry. A failure is never recorded as sent.

A batch (:meth:`Sender.run_once`) goes over one session (one relay connection, RSET between
messages) and is recorded in one transaction, for the rows this sender still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol

from sqlalchemy import select
from sqlalchemy.orm import defer

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

    def run_once(self, limit: int = 20) -> list[tuple[int, str]]:
        """Send what is ready, in one relay session; returns (outbox id, new state) for each row
        handled."""
        db = self.archive.db
        with db.session() as s:
            ids = claim(s, self.name, self.clock(), limit, sending=True)
        if not ids:
            return []
        with db.session(read_only=True) as s:
            jobs = list(
                s.execute(
                    select(t.Outbox.id, t.Outbox.message, t.Outbox.mail_from, t.Outbox.rcpt_to)
                    .where(t.Outbox.id.in_(ids))
                    .order_by(t.Outbox.id)
                )
            )
        results: list[tuple[int, Attempt]] = []
        with self.open_session() as session:
            for number, message, mail_from, rcpt_to in jobs:
                if not message or not mail_from or not rcpt_to:
                    results.append((number, Unsendable("no message, sender or recipient")))
                    continue
                try:
                    attempt = session.deliver(message, mail_from=mail_from, rcpt_to=rcpt_to)
                except ValueError as err:  # a message we built wrongly: never retried as is
                    attempt = Unsendable(str(err))
                results.append((number, attempt))
        return self._record(results)

    def _record(self, results: list[tuple[int, Attempt]]) -> list[tuple[int, str]]:
        now = self.clock()
        out = []
        with self.archive.db.session() as s:
            rows = {
                row.id: row
                for row in s.scalars(
                    select(t.Outbox)
                    .where(t.Outbox.id.in_([number for number, _ in results]))
                    .options(defer(t.Outbox.message))  # megabytes, not needed here
                )
            }
            items = []
            for number, attempt in results:
                row = rows.get(number)
                if row is None or row.state != "sending" or row.worker != self.name:
                    continue
                row.attempts += 1
                row.last_reply, row.worker, row.lease_until, row.updated_at = (
                    attempt.reply[:2000],
                    None,
                    None,
                    now,
                )
                state = attempt.outcome
                if state == "retry" and now - row.created_at >= self.give_up_after:
                    state = "failed"
                if state == "retry":
                    row.state, row.next_attempt_at = "retry", now + backoff(row.attempts)
                    log.warning(
                        "outbox %s (%s) will be retried: %s", row.id, row.key, attempt.reply
                    )
                else:
                    row.state = state
                    items.append(
                        Item(
                            "outcome",
                            now,
                            {
                                "for_seq": row.entry_seq,
                                "outbox": row.key,
                                "status": state,
                                "reply": row.last_reply,
                                "attempts": row.attempts,
                            },
                            {},
                        )
                    )
                    if state == "failed":
                        log.error("outbox %s (%s) failed: %s", row.id, row.key, attempt.reply)
                        if row.kind != "alert" and self.admin:
                            s.add(alert(row.key, f"{row.kind} {row.key}: {attempt.reply}", now))
                out.append((number, row.state))
            if items:
                self.archive.file_in(s, items, at=now)
        return out
