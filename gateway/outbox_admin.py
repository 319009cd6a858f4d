"""What an admin does with the outbox: look at it, and send again what failed.

The outbox (:mod:`gateway.outbound`) holds every receipt, delivery, reminder and alert the hub
owes, with its state (``new`` → ``building`` → ``ready`` → ``sending`` → ``sent``, or ``retry``,
or ``failed``) and the relay's last reply. :func:`listing` reads it; :func:`requeue` puts
failed rows back, each change recorded as an admin event in the same transaction.

Requeueing a failed row:

- never built (no certificate, no mailbox, agency not active), or with ``rebuild``: built again
  from scratch, for the agency's mailboxes and certificates of now, less the mailboxes that
  took an earlier build (``new``). Should none be left — every mailbox of now took it, those
  that lacked it having left the agency — the builder sends nothing and ends the row ``sent``,
  its last reply saying so (:func:`gateway.builder.nothing_left`);
- built, and failed at the relay (5xx, or retried too long): sent again, the same bytes, to the
  recipients that did not take it (``retry``, due now); a recipient that took it is not sent it
  twice. If a certificate those bytes are encrypted to is no longer usable, it is built again
  instead (``new``), for those recipients. The time until the sender gives up counts from the
  requeue, not from the row's birth;
- a delivery or reminder (:data:`gateway.outbound.TO_AGENCY_MAILBOXES`) goes again only to
  those of the recipients that are still mailboxes of its agency in the directory of now
  (compared as the directory compares them, :func:`keys.directory.comparable`). Those that have
  left the agency are dropped, named in the result and in the admin event, and never sent it
  again (a row sent again keeps them in ``detail["left_agency"]``; the replies they had are no
  longer counted in its fate). Should every recipient that lacked it have left, the row is
  built again (``new``), as above: for a mailbox that joined the agency since, or, every
  mailbox of now having taken it, for nobody — the builder ends it ``sent``. Should the agency
  itself be gone from the directory, or not active today, it is built again too, and the
  builder fails it saying so, as it does with ``rebuild``. A receipt (and a resend of one) goes
  to the mailbox the message came from, as a build again would; an alert to the admin address:
  neither is narrowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import tables as t
from formats.errors import ConfigError, InputError
from gateway.outbound import ENCRYPTED_TO, LEFT_AGENCY, left_agency, to_build_again
from keys import evidence, store
from keys.directory import Directory
from keys.trust import TrustStore

STATES = ("new", "building", "ready", "sending", "retry", "sent", "failed")
#: The rows still owed something (what ``mailq`` would show): every state but ``sent``.
PENDING = tuple(s for s in STATES if s != "sent")
#: ``detail`` key: when an admin last requeued the row (ISO 8601); the sender's give-up
#: time counts from it.
REQUEUED_AT = "requeued_at"
#: Rows read per query when requeueing (SQLite's bound-parameter limit may be as low as 999).
CHUNK = 500


@dataclass(frozen=True)
class Row:
    id: int
    key: str
    kind: str
    organ_id: str | None
    state: str
    attempts: int
    next_attempt_at: datetime | None
    rcpt_to: list[str] | None
    last_reply: str | None
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "kind": self.kind,
            "agency": self.organ_id,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "rcpt_to": self.rcpt_to,
            "last_reply": self.last_reply,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclass(frozen=True)
class Requeued:
    """A row put back by :func:`requeue`: as it was, the state it goes back to (``new`` or
    ``retry``), and the recipients that lacked it and are no longer mailboxes of its agency
    (never sent it again)."""

    was: Row
    state: str
    left_agency: tuple[str, ...] = ()


def listing(
    s: Session,
    *,
    states: Sequence[str] = PENDING,
    kind: str | None = None,
    agency: str | None = None,
    limit: int = 100,
) -> list[Row]:
    """The newest ``limit`` rows in ``states`` (of ``kind``, to ``agency``), oldest first."""
    o = t.Outbox
    query = select(
        o.id, o.key, o.kind, o.organ_id, o.state, o.attempts, o.next_attempt_at, o.rcpt_to,
        o.last_reply, o.created_at, o.updated_at,
    ).where(o.state.in_(states))  # fmt: skip
    if kind is not None:
        query = query.where(o.kind == kind)
    if agency is not None:
        query = query.where(o.organ_id == agency)
    rows = s.execute(query.order_by(o.id.desc()).limit(limit)).all()
    return [Row(*r) for r in reversed(rows)]


def failed_ids(s: Session, *, agency: str | None = None) -> list[int]:
    query = select(t.Outbox.id).where(t.Outbox.state == "failed")
    if agency is not None:
        query = query.where(t.Outbox.organ_id == agency)
    return list(s.scalars(query.order_by(t.Outbox.id)))


def requeue(
    s: Session,
    ids: Sequence[int],
    *,
    rebuild: bool,
    at: datetime,
    actor: str,
    directory: Directory | None = None,
) -> list[Requeued]:
    """Put the failed rows ``ids`` back (see the module docstring); for each, the row as it
    was, what it goes back to (``new`` or ``retry``) and the recipients dropped for having left
    its agency. :class:`InputError` if any of them is unknown or not failed: then nothing
    changes.

    ``directory``: the agencies as the builder sees them now (the CLI passes
    :func:`gateway.loading.load_directory_merged`); by default the directory stored in the
    database (:func:`keys.store.directory`)."""
    rows: dict[int, t.Outbox] = {}
    for at_row in range(0, len(ids), CHUNK):  # within every database's bound parameters
        chunk = ids[at_row : at_row + CHUNK]
        rows |= {r.id: r for r in s.scalars(select(t.Outbox).where(t.Outbox.id.in_(chunk)))}
    for number in ids:
        row = rows.get(number)
        if row is None:
            raise InputError(f"no outbox row {number}; `gateway outbox list` shows them")
        if row.state != "failed":
            raise InputError(
                f"outbox row {number} ({row.key}) is {row.state}, not failed: only a failed row "
                "is sent again by hand"
            )
    out: list[Requeued] = []
    trust = _trust(s)
    directory = store.directory(s) if directory is None else directory
    for number in dict.fromkeys(ids):
        row = rows[number]
        before = _row(row)
        # Who lacks it: every recipient the relay answered (a 5xx one too: rcpt_to narrows to
        # those retried for a 4xx) and any not tried yet, less those that took it.
        recipients = dict(row.detail.get("recipients", {}))
        tried = dict.fromkeys([*(row.rcpt_to or ()), *recipients])
        untaken = [r for r in tried if recipients.get(r, {}).get("status") != "sent"]
        detail = {**row.detail, REQUEUED_AT: at.isoformat()}
        resend = not rebuild and row.message is not None and bool(untaken)
        # Never the old bytes to a mailbox that has left the agency: it may be someone else's.
        left = left_agency(row.kind, row.organ_id, untaken, directory, at) if resend else []
        lacking = [r for r in untaken if r not in (left or ())]
        if not resend or left is None or not lacking or _encrypted_to_unusable(s, row, at, trust):
            # A new message, to the mailboxes of now that did not take the old one: nobody,
            # should each of them have taken it (gateway.builder.nothing_left). Never the old
            # bytes to a certificate the hub would not encrypt to now. An agency gone or not
            # active: the builder fails it, saying so.
            row.state, row.message, row.mail_from, row.rcpt_to = "new", None, None, None
            # The old build is history (in the archive): a duplicate's resend must not send
            # it again, should the new build fail (gateway.builder.Builder._resend).
            row.entry_seq = None
            detail = to_build_again(detail, left or [])
        else:
            row.state, row.rcpt_to = "retry", lacking
            if left:  # no longer its recipients: their replies no longer decide its fate
                replies = detail.get("recipients", {})
                detail["recipients"] = {a: r for a, r in replies.items() if a not in left}
                detail[LEFT_AGENCY] = sorted({*detail.get(LEFT_AGENCY, ()), *left})
        row.detail, row.attempts, row.next_attempt_at = detail, 0, at
        row.worker, row.lease_until, row.updated_at = None, None, at
        dropped = {"left_agency": left} if left else {}
        store.record(
            s, at=at, actor=actor, action="outbox-requeue", subject=row.key,
            state=row.state, last_reply=before.last_reply, **dropped,
        )  # fmt: skip
        out.append(Requeued(before, row.state, tuple(left or ())))
    return out


def _trust(s: Session) -> TrustStore | None:
    try:
        return evidence.trust_store(s, revocation_mode="soft-fail")
    except ConfigError:  # no trust anchor: no evidence can be checked
        return None


def _encrypted_to_unusable(
    s: Session, row: t.Outbox, at: datetime, trust: TrustStore | None
) -> bool:
    """``row``'s built message is encrypted to a certificate its agency may no longer be
    encrypted to (revoked, retired, expired); a receipt to the certificate that signed the
    message counts as such too (it is built again: the builder decides)."""
    built_for = row.detail.get(ENCRYPTED_TO) or []
    if not built_for:
        return False
    organ_id = row.organ_id
    if row.kind == "resend":
        organ_id = s.scalar(
            select(t.Outbox.organ_id).where(t.Outbox.key == f"receipt:{row.for_seq}")
        )
    if organ_id is None:
        return True
    usable = store.encryption_certificates(s, organ_id, at, trust=trust).usable
    return not set(built_for) <= {store.fingerprint(c) for c in usable}


def _row(row: t.Outbox) -> Row:
    return Row(
        row.id, row.key, row.kind, row.organ_id, row.state, row.attempts, row.next_attempt_at,
        row.rcpt_to, row.last_reply, row.created_at, row.updated_at,
    )  # fmt: skip


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
