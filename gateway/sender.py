"""The sender: hands what the outbox holds to the relay, and records what the relay said.

Part of :mod:`gateway.outbound` (step 3): ``ready`` rows go to the relay; 250 → ``sent``, 4xx or
no connection → ``retry`` with backoff, 5xx or too old → ``failed`` and the admin is alerted;
each final state is filed as an ``outcome`` entry. A failure is never recorded as sent.

The relay's answer is decided per recipient (:func:`fates`): a recipient refused at RCPT has
its own reply, the others share the one that decided the attempt. A row whose recipients were
refused in part stays in ``retry`` for those refused with a 4xx alone (``rcpt_to`` narrows to
them), and the admin is alerted at once for those refused with a 5xx; it ends ``sent`` only if
every recipient took the message, ``failed`` otherwise. The reply of each recipient is kept in
``detail["recipients"]`` across attempts and filed with the outcome.

A run (:meth:`Sender.run_once`) goes over one session (one relay connection, RSET between
messages) in batches; a batch is recorded in one transaction, for the rows this sender still
holds, and that transaction claims the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from archive import tables as t
from archive.log import Item
from archive.service import Archive
from gateway.outbound import Attempt, add_alert, backoff, claim
from gateway.outbox_admin import REQUEUED_AT

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
    refused: Mapping[str, str] = field(default_factory=dict)

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
            o.entry_seq, o.key, o.kind, o.rcpt_to, o.detail,
        ).where(o.id.in_([number for number, _ in results]))  # fmt: skip
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()  # held to the commit: a lease takeover waits
        rows = {row.id: row for row in s.execute(query)}
        out: list[tuple[int, str]] = []
        items, changes = [], []
        for number, attempt in results:
            row = rows.get(number)
            if row is None or row.state != "sending" or row.worker != self.name:
                continue
            attempts = row.attempts + 1
            give_up = now - _since(row.detail, row.created_at) >= self.give_up_after
            told = fates(attempt, row.rcpt_to or (), give_up=give_up)
            # Recipients settled by earlier attempts keep their reply; this attempt's override.
            recipients = {**row.detail.get("recipients", {}), **told}
            state = _overall(recipients, attempt.outcome, give_up)
            reply = _summary(recipients, attempt.reply)[:2000]
            retry_at, rcpt_to = row.next_attempt_at, row.rcpt_to
            if state == "retry":  # for the recipients to retry alone
                retry_at = now + backoff(attempts)
                rcpt_to = [r for r in row.rcpt_to or () if told[r]["status"] == "retry"]
                log.warning("outbox %s (%s) will be retried: %s", row.id, row.key, reply)
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
                            "recipients": recipients,
                        },
                        {},
                    )
                )
                if state == "failed":
                    log.error("outbox %s (%s) failed: %s", row.id, row.key, reply)
            # The admin hears once of each recipient refused for good, when it is: at once
            # while others are retried (under that attempt's key), else with the row's failure.
            failed_now = any(v["status"] == "failed" for v in told.values())
            if failed_now or (state == "failed" and not told):
                final = state == "failed"
                about = row.key if final else f"{row.key}:attempt-{attempts}"
                more = "" if final else f"; retrying {', '.join(rcpt_to or ())}"
                if row.kind != "alert" and self.admin:
                    add_alert(s, about, f"{row.kind} {row.key}: {reply}{more}", now)
            changes.append(
                {
                    "id": number,
                    "state": state,
                    "attempts": attempts,
                    "last_reply": reply,
                    "next_attempt_at": retry_at,
                    "rcpt_to": rcpt_to,
                    "detail": {**row.detail, "recipients": recipients},
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


Fate = Literal["sent", "retry", "failed"]


def _since(detail: Mapping[str, Any], created_at: datetime) -> datetime:
    """Since when a row has been tried: its birth, or when an admin last requeued it."""
    requeued = detail.get(REQUEUED_AT)
    return datetime.fromisoformat(requeued) if isinstance(requeued, str) else created_at


def fates(attempt: Attempt, rcpt_to: Sequence[str], *, give_up: bool) -> dict[str, dict[str, str]]:
    """What ``attempt`` did for each recipient: ``{address: {"status", "reply"}}``.

    A recipient refused at RCPT has its own reply — 4xx: ``retry``, 5xx: ``failed`` (RFC 5321
    §4.2.1); the others share the outcome and reply that decided the attempt (DATA's, MAIL's,
    or why nothing was offered). ``give_up``: what would be retried fails instead."""
    out: dict[str, dict[str, str]] = {}
    for rcpt in rcpt_to:
        reply = attempt.refused.get(rcpt)
        status: Fate = attempt.outcome
        if reply is not None:
            status = "retry" if reply.startswith("4") else "failed"
        if status == "retry" and give_up:
            status = "failed"
        out[rcpt] = {"status": status, "reply": (reply or attempt.reply)[:500]}
    return out


def _overall(recipients: Mapping[str, Mapping[str, Any]], outcome: Fate, give_up: bool) -> Fate:
    """A row is retried while a recipient is to be retried, and ``sent`` only if every
    recipient took it: a failure is never recorded as sent."""
    statuses = {str(v["status"]) for v in recipients.values()}
    if not statuses:  # a row with no recipient, never offered (:class:`Unsendable`)
        return "failed" if give_up and outcome == "retry" else outcome
    return "retry" if "retry" in statuses else "failed" if "failed" in statuses else "sent"


def _summary(recipients: Mapping[str, Mapping[str, Any]], reply: str) -> str:
    """The row's last reply: the attempt's, or each recipient's when they differ."""
    if len({str(v["reply"]) for v in recipients.values()}) <= 1:
        return reply
    return "; ".join(f"{addr}: {v['reply']}" for addr, v in sorted(recipients.items()))
