"""What the hub owes: receipts, deliveries and alerts — built, filed, then sent (the outbox).

Three steps, each idempotent, each resumable after a crash:

1. **Owed** (:func:`owed_for`, :func:`resend`): rows added in the same transaction that files
   the message, so nothing owed is ever forgotten. One receipt per authenticated message
   (accepted or rejected; a quarantined sender is not authenticated and gets nothing), one
   delivery per accepted message and recipient agency, one resend per duplicate.
2. **Built** (:class:`gateway.builder.Builder`, in the worker processes — signing and
   encrypting is CPU work): the receipt is a signed status payload encrypted to the sender's
   current certificates; a delivery is the sender's signed entity, byte for byte (so the
   recipient verifies the original signature), encrypted to each of the recipient agency's
   current certificates.
   The built message is filed in the archive (``receipt`` entries keep the bytes as the
   ``receipt`` blob; ``delivery`` entries keep their digest) and the row becomes ``ready``.
3. **Sent** (:class:`Sender`, a thread of ``gateway serve``): through the relay; 250 → ``sent``,
   4xx or no connection → ``retry`` with backoff, 5xx or too old → ``failed`` and the admin is
   alerted — per recipient, when the relay refuses some at RCPT: the row is retried for those
   refused with a 4xx alone, and is ``sent`` only if every recipient took it. Each final state
   is filed as an ``outcome`` entry. A failure is never recorded as sent. Sending is
   at-least-once: a crash after the relay's 250 and before it is recorded sends that message
   again once the claim expires.

   A built message waits encrypted to the certificates of the moment it was built
   (``detail["encrypted_to"]``). Should one of them stop being usable before the relay takes it
   (revoked, retired, expired: the agency may no longer hold that key, or someone else may), or
   a mailbox it waits for leave its agency, the builder takes the row back and builds it again
   for the certificates and mailboxes of now (:meth:`gateway.builder.Builder.rebuild_stale`,
   every :data:`gateway.builder.STALE_CHECK`, on lookups cached for
   :data:`gateway.builder.CERT_CACHE`), for the mailboxes that did not take the first build.
   The same goes for a row an admin has built again (:func:`gateway.outbox_admin.requeue`).
   Should every mailbox the agency has now have taken an earlier build (those that lacked it
   having left the agency), nothing is left to send: the row ends ``sent`` with no message, its
   last reply and ``detail["left_agency"]`` say why, and that end is filed as an ``outcome``
   entry (:func:`gateway.builder.nothing_left`). A build again never goes to a mailbox that
   took an earlier one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import Select, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from archive import tables as t
from archive.db import Database
from formats.errors import DatabaseDamaged, TransientError
from formats.vntime import local_day
from gateway.verdict import Verdict
from keys.directory import Directory, comparable

#: How long a builder's claim holds before another builder may take the rows over. The sender
#: holds its rows for longer, renewed as it goes (:attr:`gateway.sender.Sender.lease`).
LEASE = timedelta(minutes=5)

#: ``detail`` key: the SHA-256 fingerprints of the agency certificates a built message is
#: encrypted to (from the key store; absent when it is not encrypted to any).
ENCRYPTED_TO = "encrypted_to"
#: ``detail`` key: the mailboxes that had not taken a build when it was dropped to be built
#: again (:func:`without_build`); gone once the new build is ready.
NOT_TAKEN = "not_taken"
#: ``detail`` key of a row that ended with nothing left to send (:func:`nothing_left`): the
#: mailboxes that lacked it and are no longer the agency's.
LEFT_AGENCY = "left_agency"
#: The kinds of outbox row (:class:`archive.tables.Outbox`): what the hub owes whom.
KINDS = ("receipt", "resend", "delivery", "reminder", "alert")
#: The kinds of row the builder addresses to their agency's mailboxes of now (its directory
#: entry): sent, or sent again, only to those still its own (:func:`left_agency`). A receipt
#: goes to the mailbox the message came from, a resend to the receipt's, an alert to the admin
#: address.
TO_AGENCY_MAILBOXES = frozenset({"delivery", "reminder"})
#: Failures of the database or the disk, not of one message or row: raised, the claims in hand
#: are given back uncounted (gateway.claims.Unsettled) and the loop backs off (the worker's
#: filing and builder, serve's loops).
ENVIRONMENT: tuple[type[Exception], ...] = (
    TransientError,
    DatabaseDamaged,
    SQLAlchemyError,
    OSError,
)
#: The database refused a row: a value it cannot hold, a constraint. Not the database's
#: trouble (though an SQLAlchemyError) but a row's: the worker files its batch one by one.
ROW_REFUSED: tuple[type[Exception], ...] = (DataError, IntegrityError)


def environmental(exc: BaseException) -> bool:
    """Whether ``exc`` is the database's or the disk's trouble (:data:`ENVIRONMENT`), not a
    row's (:data:`ROW_REFUSED`)."""
    return isinstance(exc, ENVIRONMENT) and not isinstance(exc, ROW_REFUSED)


def pause(failures: int, *, first: float, most: float) -> float:
    """Seconds to wait after ``failures`` in a row: ``first``, doubling, at most ``most``.
    (An uncapped ``2.0 ** failures`` overflows at the 1,025th: hours into an outage, the
    loop that waits would end.)"""
    return min(most, first * 2.0 ** min(max(0, failures - 1), 64))


class Attempt(Protocol):
    @property
    def outcome(self) -> Literal["sent", "retry", "failed"]: ...
    @property
    def reply(self) -> str: ...
    @property
    def refused(self) -> Mapping[str, str]:
        """Recipients refused at RCPT (address → reply) while others were not."""
        ...


Deliver = Callable[[bytes, str, Sequence[str]], Attempt]


def owed_for(
    verdict: Verdict, seq: int, recipients: Sequence[str], at: datetime
) -> list[dict[str, Any]]:
    """What filing ``verdict`` as entry ``seq`` obliges the hub to send: outbox rows, as the
    column values of one ``insert(t.Outbox)`` for the whole batch."""
    authenticated = verdict.agency is not None and verdict.signer is not None
    if not authenticated or verdict.disposition not in ("accepted", "rejected"):
        return []
    assert verdict.agency is not None
    rows = []
    if not unanswered(verdict):
        rows.append(_values(f"receipt:{seq}", "receipt", seq, verdict.agency.organ_id, at))
    if verdict.disposition == "accepted":
        rows += [
            _values(f"delivery:{seq}:{organ}", "delivery", seq, organ, at) for organ in recipients
        ]
    return rows


def unanswered(verdict: Verdict) -> bool:
    """Whether ``verdict``'s message is one no receipt answers: a status (a receipt, from a
    gateway or a system that answers as this one does), or a message that says it is an
    automatic answer (``Auto-Submitted: auto-replied``: a status this hub's schema refused
    says so too, when this hub's kind sent it). Filed, and delivered if accepted, but never
    receipted (RFC 3834): two gateways receipting each other's receipts would never stop. A
    submission an agency's system sends (``auto-generated``) is receipted as any."""
    status = verdict.payload is not None and verdict.payload.exchange.category == "status"
    return status or verdict.auto_replied


def resend(intake_id: int, original_seq: int, organ_id: str | None, at: datetime) -> dict[str, Any]:
    """A duplicate gets the original receipt again (the same bytes): its outbox row's values.
    ``organ_id``: the agency that sent it (what `outbox list --agency` finds it by)."""
    return _values(f"resend:{intake_id}", "resend", original_seq, organ_id, at)


def alert(about: str, text: str, at: datetime, *, copy: bool = False) -> t.Outbox:
    """An admin alert about outbox row ``about``: that it failed (key ``alert:ABOUT``) or, with
    ``copy``, a copy of what it tells an agency (key ``alert:copy:ABOUT``). The keys differ: a
    certificate reminder copied to the admin may fail later, and that alert is owed too."""
    key = f"alert:copy:{about}" if copy else f"alert:{about}"
    return t.Outbox(**_values(key, "alert", None, None, at, {"text": text}))


def add_alert(s: Session, about: str, text: str, at: datetime) -> None:
    """Queue the alert that outbox row ``about`` failed, unless it is queued already.

    Insert-or-ignore (``ON CONFLICT DO NOTHING``: SQLite ≥ 3.24, PostgreSQL ≥ 9.5): the alert
    rides in the transaction that records the failure, and a key already taken must never roll
    that back — the batch's rows would stay claimed and be sent again after every lease."""
    values = _values(f"alert:{about}", "alert", None, None, at, {"text": text})
    if s.get_bind().dialect.name == "postgresql":
        s.execute(postgresql.insert(t.Outbox).values(values).on_conflict_do_nothing())
    else:
        s.execute(sqlite.insert(t.Outbox).values(values).on_conflict_do_nothing())


def _values(
    key: str,
    kind: str,
    seq: int | None,
    organ: str | None,
    at: datetime,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "key": key,
        "kind": kind,
        "for_seq": seq,
        "organ_id": organ,
        "detail": detail or {},
        "state": "new",
        "attempts": 0,
        "created_at": at,
        "updated_at": at,
    }


def waiting(now: datetime, *, sending: bool) -> Select[int]:
    """Rows to build (``new``) or to send (``ready``, due ``retry``), and expired claims."""
    busy = "sending" if sending else "building"
    state = (
        or_(
            t.Outbox.state == "ready",
            (t.Outbox.state == "retry") & (t.Outbox.next_attempt_at <= now),
        )
        if sending
        else t.Outbox.state == "new"
    )
    return select(t.Outbox.id).where(
        or_(state, (t.Outbox.state == busy) & (t.Outbox.lease_until < now))
    )


def anything_waiting(db: Database, now: datetime, *, sending: bool) -> bool:
    """A read-only look first, so that an idle poll never takes the write lock."""
    with db.session(read_only=True) as s:
        return s.execute(waiting(now, sending=sending).limit(1)).first() is not None


def claim(
    s: Session,
    worker: str,
    now: datetime,
    limit: int,
    *,
    sending: bool,
) -> list[int]:
    """Claim rows to build (``new``) or to send (``ready``, due ``retry``); expired claims too."""
    return list(claim_from(s, worker, now, limit, sending=sending))


def claim_from(
    s: Session,
    worker: str,
    now: datetime,
    limit: int,
    *,
    sending: bool,
    lease: timedelta = LEASE,
) -> dict[int, str]:
    """:func:`claim`, saying the state each row was claimed from (``ready``, ``retry``, or the
    busy state of an expired claim), so that :func:`release_unsent` can put it back.

    Claims to build are counted on the row (``claims``; the builder's settling resets it): a
    row claimed before and never built (its worker died, or its lease ran out) is claimed
    alone, so that if building it is what stops its workers, it stops no other row with it
    (:data:`gateway.builder.MAX_CLAIMS`)."""
    busy = "sending" if sending else "building"
    query = (
        waiting(now, sending=sending)
        .add_columns(t.Outbox.state, t.Outbox.claims)
        .order_by(t.Outbox.id)
        .limit(limit)
    )
    if s.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    claimed: dict[int, str] = {}
    for number, state, claims in s.execute(query):
        if claimed and claims and not sending:
            break
        claimed[number] = state
        if claims and not sending:
            break  # alone
    if claimed:
        values: dict[str, Any] = {
            "state": busy, "worker": worker, "lease_until": now + lease, "updated_at": now
        }  # fmt: skip
        if not sending:
            values["claims"] = t.Outbox.claims + 1
        s.execute(update(t.Outbox).where(t.Outbox.id.in_(list(claimed))).values(values))
    return claimed


def renew_sending(s: Session, worker: str, ids: Sequence[int], until: datetime) -> set[int]:
    """Hold the rows ``ids`` that ``worker`` still holds (``sending``) until ``until``; returns
    those: a row missing was taken over after its lease ran out, and is no longer its to send."""
    o = t.Outbox
    query = select(o.id).where(o.id.in_(ids), o.state == "sending", o.worker == worker)
    if s.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()  # a claim taking them over waits, then skips them
    held = set(s.scalars(query))
    if held:
        s.execute(update(o).where(o.id.in_(held)).values(lease_until=until))
    return held


def release_unsent(s: Session, worker: str, claimed: Mapping[int, str], now: datetime) -> None:
    """Give back rows ``worker`` claimed to send and did not try: unclaimed, in the state each
    was claimed from (:func:`claim_from`); one taken over from an expired claim goes back to
    ``ready``, as start-up puts back what a stopped process held."""
    o = t.Outbox
    by_state: dict[str, list[int]] = {}
    for number, state in claimed.items():
        by_state.setdefault("ready" if state == "sending" else state, []).append(number)
    for state, ids in sorted(by_state.items()):
        s.execute(
            update(o)
            .where(o.id.in_(ids), o.state == "sending", o.worker == worker)
            .values(state=state, worker=None, lease_until=None, updated_at=now)
        )


def backoff(attempts: int) -> timedelta:
    """1, 2, 4 … minutes between tries, at most an hour (as mail servers do)."""
    return timedelta(minutes=min(60, 2 ** max(0, attempts - 1)))


def without_build(detail: Mapping[str, Any]) -> dict[str, Any]:
    """A row's ``detail`` once its built message is dropped, to be built again for the
    certificates of now: what it was encrypted to goes; of the recipients' replies, only
    those of mailboxes that took it stay (they are not sent it again); those that had not
    taken it are named in :data:`NOT_TAKEN` (for :func:`gateway.builder.nothing_left` to say
    which left)."""
    out = {k: v for k, v in detail.items() if k not in (ENCRYPTED_TO, "recipients", NOT_TAKEN)}
    recipients = detail.get("recipients", {})
    taken = {a: r for a, r in recipients.items() if r.get("status") == "sent"}
    if taken:
        out["recipients"] = taken
    lacking = {*detail.get(NOT_TAKEN, ()), *(a for a in recipients if a not in taken)}
    if lacking:
        out[NOT_TAKEN] = sorted(lacking)
    return out


def to_build_again(detail: Mapping[str, Any], left: Sequence[str]) -> dict[str, Any]:
    """``detail`` once the built message is dropped (:func:`without_build`), the mailboxes that
    left the agency without it — ``left`` now, and those of an earlier requeue — named among
    those that had not taken it, for the builder's :func:`gateway.builder.nothing_left` to say
    so."""
    out = without_build(detail)
    gone = {*out.pop(LEFT_AGENCY, ()), *left}
    if gone:
        out[NOT_TAKEN] = sorted({*out.get(NOT_TAKEN, ()), *gone})
    return out


def took_build(detail: Mapping[str, Any]) -> set[str]:
    """The mailboxes that took an earlier build of a row (the relay answered 250 for them)."""
    return {a for a, r in detail.get("recipients", {}).items() if r.get("status") == "sent"}


def left_agency(
    kind: str, organ_id: str | None, recipients: Sequence[str], directory: Directory, at: datetime
) -> list[str] | None:
    """Those of ``recipients`` that are no longer mailboxes of agency ``organ_id`` (none, for a
    row not addressed to its agency's mailboxes: :data:`TO_AGENCY_MAILBOXES`); ``None`` when
    the agency is not in ``directory`` or not active on the day of ``at`` (as the builder sees
    it). An address that is not a bare one matches no mailbox."""
    if kind not in TO_AGENCY_MAILBOXES or organ_id is None:
        return []
    agency = directory.get(organ_id)
    if agency is None or not agency.active_on(local_day(at)):
        return None
    return [r for r in recipients if not comparable((r,)) & agency.emails]
