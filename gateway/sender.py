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
messages) and claims its rows in batches of ``limit``:

1. what the relay answered is recorded (one transaction, for the rows this sender still holds)
   once a batch is done, in the transaction that claims the next one, and before a message
   when :data:`RECORD_EVERY` has passed since the last record: a fast relay costs one commit a
   batch, a slow one is recorded as it goes;
2. a claim holds for :attr:`Sender.lease`: longer than the time until the next record, whatever
   the relay does meanwhile (:data:`RECORD_EVERY` and the message in flight,
   :attr:`Sender.per_message`), and each record renews it for the rows still to be sent — so
   no other instance takes over a row this one may still send;
3. a message's bytes are read just before it is sent, :data:`READ_BUDGET` bytes at a time (a
   bigger message alone), never a whole batch at once: the supervisor also runs the listeners;
4. ``stop`` set ends the run between two messages (the one in flight is answered first): what
   the relay answered is recorded and the rows not tried are given back as they were claimed,
   unclaimed (:func:`gateway.outbound.release_unsent`), so a graceful stop sends nothing twice.
   A run that fails (the database, a defect of ours) does the same on its way out, when it can.

The admin hears of delivery failures once a day per cause (:data:`CAUSES`, key
``alert:outbound-CAUSE:DAY``), with how many rows and the first :data:`FIRST` of them, counted
for :data:`GATHER` before that alert is built; the log and each row's ``outcome`` entry keep
every one. And once a day when a row to be retried has waited more than :data:`WAIT_ALERT`
(key ``alert:outbound-waiting:DAY``): the relay has been failing for an hour or more.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from archive import tables as t
from archive.db import update_rows
from archive.log import Item
from archive.service import Archive
from formats.vntime import local_day
from gateway.outbound import (
    Attempt,
    add_alert,
    anything_waiting,
    backoff,
    claim_from,
    release_unsent,
    renew_sending,
)
from gateway.outbox_admin import REQUEUED_AT

log = logging.getLogger("gateway.sender")

#: What the relay answered is recorded at least this often while a run sends.
RECORD_EVERY = timedelta(seconds=5)
#: Bytes of built messages read from the database at once (a bigger message is read alone).
READ_BUDGET = 8 * 2**20
#: Time beyond the relay's own for what surrounds a message: reading it, a record waiting for
#: the write lock (SQLite's busy timeout is 5 s), a clock that is read a little late.
SLACK = timedelta(minutes=1)
#: A row to be retried that has waited this long means the relay has been failing that long.
WAIT_ALERT = timedelta(hours=1)
#: Rows named in a day's alert of one cause (all of them are counted).
FIRST = 5
#: A day's alert of one cause waits this long to be built, counting what fails meanwhile (an
#: outage's rows fail together, over a run's batches); it is held as the builder holds a row
#: it builds later: ``building``, claimed by :data:`GATHERING` until then.
GATHER = timedelta(minutes=1)
GATHERING = "waiting"

Cause = Literal["refused", "given-up", "unsendable"]
#: Why rows failed (or a recipient did), each alerted once a day: ``alert:outbound-CAUSE:DAY``.
CAUSES: dict[Cause, str] = {
    "refused": "The relay refused outbound mail for good (a 5xx reply, or it cannot carry it)",
    "given-up": "Outbound mail was given up: the relay did not take it within [serve] "
    "give_up_after_hours",
    "unsendable": "Outbound mail was not offered to the relay: the gateway built it wrongly "
    "(a defect; the log has each)",
}


class Deliverer(Protocol):
    """What hands messages to the relay: :class:`gateway.relay.RelaySession` in ``serve``."""

    def deliver(self, message: bytes, *, mail_from: str, rcpt_to: Sequence[str]) -> Attempt: ...


#: Opens a session for one run (one relay connection), closed when the run is done.
OpenSession = Callable[[], AbstractContextManager[Deliverer]]

_Job = tuple[int, bytes | None, str | None, list[str] | None]


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
class _Run:
    """What a run holds: rows claimed and not tried yet (id → the state claimed from), and the
    answers not recorded yet."""

    held: dict[int, str]
    claims: int  # batches the run may still claim
    recorded: datetime  # the last record (or the first claim)
    answered: list[tuple[int, Attempt]] = field(default_factory=list)


@dataclass
class Sender:
    archive: Archive
    open_session: OpenSession
    clock: Callable[[], datetime]
    name: str
    admin: str = ""
    give_up_after: timedelta = timedelta(hours=48)
    #: ``Relay.deadline``: the seconds one try of a message may take at the relay.
    relay_deadline: float = 600.0
    #: Set, the run ends between two messages (``gateway serve``'s stop).
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def per_message(self) -> timedelta:
        """The longest one message may be in flight: a session tries it at most twice (once
        more on a new connection when the relay dropped the waiting one), each within
        ``relay_deadline``."""
        return timedelta(seconds=2 * self.relay_deadline)

    @property
    def lease(self) -> timedelta:
        """How long a claim holds: past the next record (at most :data:`RECORD_EVERY` and the
        message in flight away), with :data:`SLACK` to spare."""
        return RECORD_EVERY + self.per_message + SLACK

    def run_once(self, limit: int = 20, batches: int = 5) -> list[tuple[int, str]]:
        """Send what is ready, in one relay session; returns (outbox id, new state) for each row
        recorded. Up to ``batches`` batches of ``limit`` rows (the module docstring)."""
        if self.stop.is_set():
            return []
        now = self.clock()
        if not anything_waiting(self.archive.db, now, sending=True):
            return []  # an idle poll only looks: no write lock, no commit to sync
        with self.archive.db.session() as s:
            held = claim_from(s, self.name, now, limit, sending=True, lease=self.lease)
        if not held:
            return []
        run = _Run(held, batches - 1, now)
        out: list[tuple[int, str]] = []
        try:
            with self.open_session() as session:
                out += self._send(session, run, limit)
                out += self._settle(run)  # (before QUIT, which may take the relay's timeout)
        except BaseException:
            if run.answered or run.held:
                try:
                    self._settle(run)
                except Exception as exc:  # the database too: the claim runs out, as before
                    log.warning("sender: what the relay answered could not be recorded: %s", exc)
            raise
        return out

    def _send(self, session: Deliverer, run: _Run, limit: int) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        while run.held and not self.stop.is_set():
            jobs = self._read(run.held)
            while jobs and not self.stop.is_set():
                number, message, mail_from, rcpt_to = jobs.popleft()
                # Before each message, at least every RECORD_EVERY: what the relay answered is
                # recorded, and the claim renewed to outlast this message in flight (lease).
                if self.clock() - run.recorded >= RECORD_EVERY:
                    out += self._commit(run, limit)
                if number not in run.held:  # taken over meanwhile: no longer ours to send
                    continue
                attempt = self._attempt(session, message, mail_from, rcpt_to)
                message = None  # (the bytes go now, not when the next job replaces them)
                del run.held[number]
                run.answered.append((number, attempt))
                if not run.held:  # the batch is done: recorded, and the next one claimed
                    out += self._commit(run, limit)
        return out

    def _read(self, held: Mapping[int, str]) -> deque[_Job]:
        """The next rows to send, in order: :data:`READ_BUDGET` bytes of messages, at least one
        row. A row gone from the outbox comes with nothing (and is not recorded)."""
        o = t.Outbox
        take: list[int] = []
        listed: set[int] = set()
        size, full = 0, False
        with self.archive.db.session(read_only=True) as s:
            sizes = select(o.id, func.length(o.message)).where(o.id.in_(list(held))).order_by(o.id)
            for number, length in s.execute(sizes):
                listed.add(number)
                full = full or (bool(take) and size + (length or 0) > READ_BUDGET)
                if not full:
                    take.append(number)
                    size += length or 0
            query = select(o.id, o.message, o.mail_from, o.rcpt_to).where(o.id.in_(take))
            found: dict[int, _Job] = {r[0]: (r[0], r[1], r[2], r[3]) for r in s.execute(query)}
        gone = [n for n in held if n not in listed]
        return deque(found.get(n, (n, None, None, None)) for n in [*take, *gone])

    def _attempt(
        self,
        session: Deliverer,
        message: bytes | None,
        mail_from: str | None,
        rcpt_to: Sequence[str] | None,
    ) -> Attempt:
        if not message or not mail_from or not rcpt_to:
            return Unsendable("no message, sender or recipient")
        try:
            return session.deliver(message, mail_from=mail_from, rcpt_to=rcpt_to)
        except ValueError as err:  # a message we built wrongly: never retried as is
            return Unsendable(str(err))

    def _commit(self, run: _Run, limit: int) -> list[tuple[int, str]]:
        """Record what the relay answered, renew the claim of the rows still to be sent and,
        none being left, claim the next batch: one transaction."""
        now = self.clock()
        until = now + self.lease
        more = not run.held and run.claims > 0 and not self.stop.is_set()
        with self.archive.db.session() as s:
            out = self._record(s, run.answered, now)
            kept = renew_sending(s, self.name, list(run.held), until) if run.held else set()
            claimed = (
                claim_from(s, self.name, now, limit, sending=True, lease=self.lease) if more else {}
            )
        if lost := [n for n in run.held if n not in kept]:
            log.warning("sender: outbox %s taken over by another sender; not sent here", lost)
        run.held = {n: state for n, state in run.held.items() if n in kept} | claimed
        run.answered, run.claims = [], run.claims - more
        run.recorded = now
        return out

    def _settle(self, run: _Run) -> list[tuple[int, str]]:
        """The end of a run: what the relay answered is recorded, and the rows not tried are
        given back as they were claimed (one transaction)."""
        if not run.answered and not run.held:
            return []
        now = self.clock()
        with self.archive.db.session() as s:
            out = self._record(s, run.answered, now)
            if run.held:
                release_unsent(s, self.name, run.held, now)
        if run.held:
            log.info("sender: stopped; %d outbox rows not tried are given back", len(run.held))
        run.answered, run.held = [], {}
        return out

    def _record(
        self, s: Session, results: Sequence[tuple[int, Attempt]], now: datetime
    ) -> list[tuple[int, str]]:
        """Record the relay's answers, for the rows this sender still holds (one statement),
        and queue the day's alerts they call for."""
        if not results:
            return []
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
        alerts: dict[Cause, list[str]] = {}
        waited: tuple[Any, str, datetime] | None = None  # the first row waiting an hour or more
        for number, attempt in results:
            row = rows.get(number)
            if row is None or row.state != "sending" or row.worker != self.name:
                continue
            attempts = row.attempts + 1
            since = _since(row.detail, row.created_at)
            give_up = now - since >= self.give_up_after
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
                if waited is None and now - since >= WAIT_ALERT and row.kind != "alert":
                    waited = (row, reply, since)
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
            # while others are retried, else with the row's failure (in the day's alert).
            failed_now = any(v["status"] == "failed" for v in told.values())
            if (failed_now or (state == "failed" and not told)) and row.kind != "alert":
                more = "" if state == "failed" else f"; retrying {', '.join(rcpt_to or ())}"
                entry = f"{row.kind} {row.key}: {reply}"[:300] + more
                alerts.setdefault(_cause(attempt), []).append(entry)
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
            update_rows(s, t.Outbox, changes)  # by primary key, one executemany
        if items:
            self.archive.file_in(s, items, at=now)
        if self.admin:
            for cause, entries in sorted(alerts.items()):  # (in one order: no deadlock)
                self._alert(s, cause, entries, now)
            if waited is not None:
                self._alert_waiting(s, *waited, now)
        return out

    def _alert(self, s: Session, cause: Cause, entries: Sequence[str], now: datetime) -> None:
        """The day's alert of ``cause``, with ``entries`` counted in. A new one is held back
        from the builder for :data:`GATHER` (claimed by ``waiting``, as the builder holds a
        row it builds later), so that it counts what fails together; once taken to be built
        it says what it said, and the rest of the day is in the log."""
        day = local_day(now)
        about = f"outbound-{cause}:{day}"
        add_alert(s, about, "", now)  # insert-or-ignore: never the end of the record
        query = select(t.Outbox).where(t.Outbox.key == f"alert:{about}")
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()  # another instance counting in waits
        alert = s.scalars(query).one()
        fresh = alert.state == "new" and "rows" not in alert.detail
        if not fresh and (alert.state, alert.worker) != ("building", GATHERING):
            return
        count = int(alert.detail.get("rows", 0)) + len(entries)
        first = [*alert.detail.get("first", []), *entries][:FIRST]
        text = (
            f"{CAUSES[cause]}, {day}: {count} row(s); the first: {'; '.join(first)}. Any more "
            "of these today are only logged: `gateway outbox list --state failed` shows them "
            "(a row still retried for other recipients: `--state retry`); `gateway outbox "
            "retry` sends them again once the cause is fixed."
        )
        alert.detail = {"text": text, "rows": count, "first": first}
        alert.updated_at = now
        if fresh:
            alert.state, alert.worker, alert.lease_until = "building", GATHERING, now + GATHER

    def _alert_waiting(
        self, s: Session, row: Any, reply: str, since: datetime, now: datetime
    ) -> None:
        day = local_day(now)
        add_alert(
            s,
            f"outbound-waiting:{day}",
            f"Outbound mail has waited more than an hour to be taken by the relay ({day}): the "
            f"first, {row.kind} {row.key}, since {since:%Y-%m-%d %H:%M} UTC, last reply: "
            f"{reply[:300]}. It is "
            "tried again, at most an hour apart, until [serve] give_up_after_hours, then given "
            "up; `gateway outbox list --state retry` shows what waits.",
            now,
        )


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


def _cause(attempt: Attempt) -> Cause:
    """Why an attempt failed a row or a recipient: never offered, refused with a 5xx (or not
    carried), or only retried too long."""
    if isinstance(attempt, Unsendable):
        return "unsendable"
    if attempt.outcome == "failed" or any(r.startswith("5") for r in attempt.refused.values()):
        return "refused"
    return "given-up"


def _summary(recipients: Mapping[str, Mapping[str, Any]], reply: str) -> str:
    """The row's last reply: the attempt's, or each recipient's when they differ."""
    if len({str(v["reply"]) for v in recipients.values()}) <= 1:
        return reply
    return "; ".join(f"{addr}: {v['reply']}" for addr, v in sorted(recipients.items()))
