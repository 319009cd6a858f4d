"""Building what the hub owes (step 2 of :mod:`gateway.outbound`), in the worker processes.

:class:`Builder` claims ``new`` outbox rows and turns each into the message the relay will be
handed, filed in the archive first: a receipt (a signed status payload, Vietnamese and English,
encrypted to the sender agency's current certificates), a delivery (the sender's signed entity,
byte for byte, encrypted to the recipient agency's), a duplicate's receipt again, a reminder or
an admin alert. Signing and encrypting is CPU work, hence the workers; the row becomes
``ready`` for :class:`gateway.sender.Sender`.

A built message waits encrypted to the certificates, and addressed to the mailboxes, of the
moment it was built. Should one of those certificates stop being usable, or one of those
mailboxes leave its agency, before the relay takes it, :meth:`Builder.rebuild_stale` takes the
row back and builds it again for the certificates and mailboxes of now, for the mailboxes that
did not take the first build; :func:`nothing_left` ends a row that no mailbox of now still
lacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import tables as t
from archive.bundle import RECEIPT_BLOB, RECEIPT_FOR, RECEIPT_KIND
from archive.log import Entry, Item, Log
from archive.service import Archive, SigningKey
from formats import cms_encrypt
from formats.algorithms import outbound_cipher
from formats.errors import ConfigError, GatewayError
from formats.limits import DEFAULT_LIMITS, Limits
from formats.payload import Organ
from formats.smime import (
    b64_lines,
    enveloped_type,
    message_headers,
    payload_entity,
    sign_entity,
    wrap_enveloped,
)
from formats.vntime import local_day
from gateway import receipts
from gateway.claims import Unsettled
from gateway.outbound import (
    ENCRYPTED_TO,
    ENVIRONMENT,
    LEFT_AGENCY,
    NOT_TAKEN,
    add_alert,
    anything_waiting,
    claim,
    left_agency,
    to_build_again,
    took_build,
)
from keys import capabilities, evidence, store
from keys.directory import Directory
from keys.recipients import Recipients, choose
from keys.trust import TrustStore

log = logging.getLogger("gateway.outbound")

#: A resend whose receipt is being built again waits this long before it is built itself.
RETRY_LATER = timedelta(seconds=30)
#: Claims to build one row may end with nothing built (its worker died, or its lease ran out)
#: before the row fails unbuilt, and the admin is alerted (as the worker sets a message aside:
#: :data:`gateway.worker.MAX_CLAIMS`).
MAX_CLAIMS = 3
#: How long the builder trusts its lookup of an agency's certificates and of the revocation
#: evidence (a retired or newly revoked certificate stops being encrypted to within this time).
CERT_CACHE = timedelta(seconds=10)
#: How often the builder looks for built messages waiting for the relay whose certificates are
#: no longer usable (:meth:`Builder.rebuild_stale`).
STALE_CHECK = timedelta(seconds=60)
#: A receipt entry's blob is the receipt as sent, encrypted: base64 of ciphertext.
_SEALED = frozenset({RECEIPT_BLOB})


@dataclass(frozen=True)
class Hub:
    """Who the hub is on the wire."""

    address: str
    organ: Organ
    signer: SigningKey
    admin: str = ""


@dataclass
class _Built:
    message: bytes | None = None
    rcpt_to: tuple[str, ...] = ()
    item: Item | None = None
    failure: str | None = None
    #: The failure is the agency's setup (no mailbox, not active, no certificate to use): the
    #: same for every row to it until an admin fixes it, so it is alerted once a day.
    setup: bool = False
    later: bool = False
    #: Fingerprints of the key store's certificates it is encrypted to (:data:`ENCRYPTED_TO`).
    encrypted_to: tuple[str, ...] = ()
    #: Nothing left to send, and why (:func:`nothing_left`): the row ends ``sent``; ``item``
    #: is then its ``outcome`` entry and ``rcpt_to`` the mailboxes that lacked it and left.
    done: str | None = None


@dataclass
class _Preloaded:
    """What a batch's receipts and deliveries read, fetched in one query each."""

    #: The log entries they answer, by sequence number.
    entries: dict[int, Entry] = field(default_factory=dict)
    #: The signed entities the deliveries forward: held here, ``Session.get`` finds them in
    #: the session (its identity map holds weak references).
    blobs: list[t.Blob] = field(default_factory=list)


def _preload(s: Session, log: Log, rows: Sequence[t.Outbox]) -> _Preloaded:
    seqs = {r.for_seq for r in rows if r.kind in ("receipt", "delivery") and r.for_seq is not None}
    if not seqs:
        return _Preloaded()
    entries = log.entries(s, seqs)
    delivered = {r.for_seq for r in rows if r.kind == "delivery"}
    wanted = {
        address
        for seq, e in entries.items()
        if seq in delivered and (address := e.blobs.get("decrypted"))
    }
    blobs = list(s.scalars(select(t.Blob).where(t.Blob.sha256.in_(wanted)))) if wanted else []
    return _Preloaded(entries, blobs)


@dataclass
class Builder:
    archive: Archive
    hub: Hub
    directory: Callable[[], Directory]
    clock: Callable[[], datetime]
    name: str
    #: What a message it builds may be (:func:`outbound_limits`).
    limits: Limits = field(default_factory=lambda: outbound_limits(DEFAULT_LIMITS))
    _certs: dict[str, tuple[datetime, Recipients]] = field(default_factory=dict)
    _trust: tuple[datetime, TrustStore | None] | None = None
    _stale_check: datetime | None = None
    #: What the batch being built reads (:func:`_preload`); empty between batches.
    _loaded: _Preloaded = field(default_factory=_Preloaded)
    #: Claims a failed run left, to give back uncounted.
    unsettled: Unsettled = field(default_factory=lambda: Unsettled(t.Outbox, "building", "new"))

    def _entry(self, s: Session, seq: int) -> Entry:
        """Log entry ``seq``: the batch's, read with the others, or read now."""
        entry = self._loaded.entries.get(seq)
        return entry if entry is not None else self.archive.log.entry(s, seq)

    def run_once(self, limit: int = 32) -> int:
        """Build what is owed now; returns how many rows it handled. A failure after the claim
        gives the claim back (uncounted if it is the database's or the disk's) and is raised
        (:class:`gateway.claims.Unsettled`)."""
        db = self.archive.db
        self.unsettled.give_back(db, self.name)  # what a failed run could not give back
        now = self.clock()
        if self._stale_check is None or now >= self._stale_check:
            self._stale_check = now + STALE_CHECK
            self.rebuild_stale()
        if not anything_waiting(db, self.clock(), sending=False):
            return 0
        with db.session() as s:
            ids = claim(s, self.name, self.clock(), limit, sending=False)
        if not ids:
            return 0
        try:
            self._build_claimed(ids)
        except Exception as exc:
            self.unsettled.keep(db, self.name, ids, exc)
            raise
        return len(ids)

    def _build_claimed(self, ids: list[int]) -> None:
        """Build, file and settle the rows ``ids`` this builder has just claimed."""
        db = self.archive.db
        now = self.clock()
        built: dict[int, _Built] = {}
        with db.session(read_only=True) as s:
            rows = list(
                s.scalars(select(t.Outbox).where(t.Outbox.id.in_(ids)).order_by(t.Outbox.id))
            )
            self._loaded = _preload(s, self.archive.log, rows)
            try:
                for r in rows:  # in order: a resend may use a receipt built just before it
                    if r.claims > MAX_CLAIMS:
                        built[r.id] = given_up(r.claims - 1)
                        continue
                    built[r.id] = self._build(s, r, now, built)
            finally:
                self._loaded = _Preloaded()
            for r in rows:
                built[r.id] = nothing_left(r, built[r.id], now)
        self.archive.prepare(b.item for b in built.values() if b.item is not None)
        with db.session() as s:
            mine = [
                r
                for r in s.scalars(
                    select(t.Outbox).where(t.Outbox.id.in_(ids)).order_by(t.Outbox.id)
                )
                if r.state == "building" and r.worker == self.name
            ]
            filed = [(r, built[r.id]) for r in mine if built[r.id].item is not None]
            entries = self.archive.file_in(s, [b.item for _, b in filed if b.item], at=now)
            for (row, b), entry in zip(filed, entries, strict=True):
                if b.done is None:  # an outcome entry is not a build to send or resend
                    row.entry_seq = entry.seq
            for row in mine:
                self._settle(s, row, built[row.id], now)

    def _settle(self, s: Session, row: t.Outbox, b: _Built, now: datetime) -> None:
        row.worker, row.lease_until, row.updated_at, row.claims = None, None, now, 0
        if b.later:  # keep the claim, released in a while: built again then
            row.state, row.worker, row.lease_until = "building", "waiting", now + RETRY_LATER
            return
        if b.failure is not None:
            row.state, row.last_reply = "failed", b.failure
            # An agency's setup (alerted once a day) is a warning; anything else an error.
            (log.warning if b.setup else log.error)(
                "outbox %s (%s) cannot be built: %s", row.id, row.key, b.failure
            )
            if row.kind == "alert" or not self.hub.admin:
                return
            if b.setup and row.organ_id:
                day = local_day(now)
                add_alert(
                    s,
                    f"agency:{row.organ_id}:{day}",
                    f"Mail for {row.organ_id} cannot be built ({day}): {b.failure}. The first: "
                    f"{row.kind} {row.key}; any more today fail for the same reason without "
                    f"another alert. `gateway outbox list --state failed --agency {row.organ_id}` "
                    "shows them; `gateway outbox retry --rebuild` builds them again once fixed.",
                    now,
                )
            else:
                add_alert(s, row.key, f"{row.kind} {row.key}: {b.failure}", now)
            return
        if b.done is not None:  # every mailbox of now took an earlier build
            log.warning("outbox %s (%s): %s", row.id, row.key, b.done)
            row.state, row.message, row.mail_from, row.rcpt_to = "sent", None, None, []
            row.last_reply = b.done
            detail = {k: v for k, v in row.detail.items() if k not in (ENCRYPTED_TO, NOT_TAKEN)}
            row.detail = {**detail, LEFT_AGENCY: list(b.rcpt_to)}
            return
        # A build again goes only to the mailboxes that did not take an earlier one (there is
        # at least one: nothing_left saw to that).
        taken = took_build(row.detail)
        row.state, row.message = "ready", b.message
        row.mail_from = self.hub.address
        row.rcpt_to = [a for a in b.rcpt_to if a not in taken]
        detail = {
            k: v for k, v in row.detail.items() if k not in (ENCRYPTED_TO, NOT_TAKEN, LEFT_AGENCY)
        }
        if b.encrypted_to:
            detail[ENCRYPTED_TO] = list(b.encrypted_to)
        row.detail = detail

    def rebuild_stale(self) -> list[int]:
        """Built messages waiting for the relay (``ready``, ``retry``) that must not go as
        built: encrypted to a certificate that is no longer usable, or (a delivery or reminder)
        addressed to a mailbox that has left the agency, or to an agency no longer active. Back
        to ``new``, built again for the agency's certificates and mailboxes of now (the module
        docstring); the builder fails a row whose agency is not active, saying so. Returns
        their ids."""
        now = self.clock()
        o = t.Outbox
        waiting_rows = (o.state.in_(("ready", "retry"))) & o.worker.is_(None)
        stale: dict[int, tuple[list[str], list[str], str]] = {}  # built for, left, why
        directory = self.directory()
        with self.archive.db.session(read_only=True) as s:
            # Columns only: the built messages themselves (up to the size limit each) stay put.
            query = select(o.id, o.kind, o.for_seq, o.organ_id, o.detail, o.rcpt_to).where(
                waiting_rows
            )
            for number, kind, for_seq, organ_id, detail, rcpt_to in s.execute(query):
                built_for = detail.get(ENCRYPTED_TO) or []
                # The old bytes never to a mailbox that may be someone else's by now.
                left = left_agency(kind, organ_id, rcpt_to or [], directory, now)
                if left is None:
                    why = f"agency {organ_id} is not in the directory or not active today"
                    stale[number] = (built_for, [], f"{why}: built again, to say so")
                    continue
                if left:
                    why = (
                        f"addressed to {', '.join(left)}, no longer a mailbox of {organ_id}: "
                        "built again for the agency's mailboxes of now"
                    )
                    stale[number] = (built_for, left, why)
                    continue
                if not built_for:
                    continue
                try:
                    usable = self._targets(s, kind, for_seq, organ_id, now)
                except ENVIRONMENT:
                    raise
                except Exception:  # a defect of ours on one row: the others are still looked at
                    log.exception("outbox %s: cannot tell what it would be encrypted to", number)
                    continue
                if gone := [fp for fp in built_for if fp not in usable]:
                    why = (
                        f"built for certificate {gone[0][:16]}…, no longer usable (revoked, "
                        "retired or expired): built again for the agency's certificates of now"
                    )
                    stale[number] = (built_for, [], why)
        if not stale:
            return []
        done: list[int] = []
        with self.archive.db.session() as s:
            query = select(o).where(o.id.in_(stale), waiting_rows)
            if s.get_bind().dialect.name == "postgresql":
                # A row the sender is claiming now is its to send; one claimed and released
                # meanwhile is looked at again next time (SQLite writers are serialised).
                query = query.with_for_update(skip_locked=True)
            for row in s.scalars(query):
                built_for, left, reason = stale[row.id]
                if (row.detail.get(ENCRYPTED_TO) or []) != built_for:
                    continue  # built again meanwhile (another builder)
                log.warning("outbox %s (%s): %s", row.id, row.key, reason)
                detail = to_build_again(row.detail, left)
                row.state, row.message, row.mail_from, row.rcpt_to = "new", None, None, None
                row.entry_seq = None  # that build is history (in the archive), not to be resent
                row.detail, row.last_reply = detail, reason
                row.attempts, row.next_attempt_at, row.updated_at = 0, now, now
                done.append(row.id)
        return done

    def _targets(
        self, s: Session, kind: str, for_seq: int | None, organ_id: str | None, now: datetime
    ) -> set[str]:
        """The fingerprints the builder would encrypt a row of ``kind`` to now: the agency's
        usable certificates or, for a receipt (or a resend of one) to an agency with none,
        those of the certificate that signed the message."""
        if kind == "resend":
            kind = "receipt"
            organ_id = s.scalar(
                select(t.Outbox.organ_id).where(t.Outbox.key == f"receipt:{for_seq}")
            )
        if organ_id is None:
            return set()
        certs = self._certificates(s, organ_id, now).usable
        if not certs and kind == "receipt" and for_seq is not None:
            entry = self._entry(s, for_seq)
            signer = self._signer_cert(s, entry.blobs)
            certs = choose(signer, trust=self._trust_store(s, now), at=now).usable
        return {store.fingerprint(c) for c in certs}

    def _build(self, s: Session, row: t.Outbox, now: datetime, batch: dict[int, _Built]) -> _Built:
        try:
            if row.kind == "receipt":
                return self._receipt(s, row, now)
            if row.kind == "delivery":
                return self._delivery(s, row, now)
            if row.kind == "resend":
                return self._resend(s, row, batch, now)
            if row.kind == "alert":
                return self._alert(row, now)
            if row.kind == "reminder":
                return self._reminder(s, row, now)
            return _Built(failure=f"unknown outbox kind {row.kind!r}")
        except ENVIRONMENT:
            raise
        except GatewayError as err:
            return _Built(failure=err.message)
        except Exception as exc:  # a defect of ours: this row fails, and the others go on
            log.exception("outbox %s (%s) cannot be built: a defect", row.id, row.key)
            # Never the exception's text, which may quote what is being sent (formats.errors).
            return _Built(
                failure=f"the gateway failed while building it ({type(exc).__name__}); the "
                f"traceback is in the log (outbox {row.id})"
            )

    def _addresses(self, organ_id: str, now: datetime) -> tuple[str, ...]:
        """The mailboxes of an agency active today. A mailbox outlives its agency (handed on to
        a successor after a merger), so an agency outside its validity window gets nothing."""
        agency = self.directory().get(organ_id)
        if agency is None or not agency.emails:
            raise _NoAddress(f"agency {organ_id} has no e-mail address in the directory")
        day = local_day(now)
        if not agency.active_on(day):
            when = (
                f"its directory entry ended on {agency.valid_to}"
                if agency.valid_to and agency.valid_to < day
                else f"its directory entry starts on {agency.valid_from}"
            )
            raise _NoAddress(
                f"agency {organ_id} is not active on {day} ({when}): nothing is sent to its "
                "mailboxes; forward the message to the agency now responsible, or correct the "
                "directory's dates"
            )
        return tuple(sorted(agency.emails))

    def _receipt(self, s: Session, row: t.Outbox, now: datetime) -> _Built:
        assert row.for_seq is not None and row.organ_id is not None
        entry = self._entry(s, row.for_seq)
        fields = entry.fields
        to_addr = str(fields["from"])  # authenticated: the certificate's and directory's address
        agency = self.directory().get(row.organ_id)
        organ = Organ(row.organ_id, agency.name_vi if agency else None, to_addr)
        payload = receipts.receipt_payload(
            fields,
            seq=row.for_seq,
            hub=self.hub.organ,
            to=organ,
            origin=self.archive.origin,
            at=now,
        )
        certs = self._certificates(s, row.organ_id, now)
        if not certs.usable:  # none enrolled (or none to use): the certificate that signed
            trust = self._trust_store(s, now)
            signer = choose(self._signer_cert(s, entry.blobs), trust=trust, at=now)
            certs = Recipients(signer.usable, certs.left_out + signer.left_out)
        if not certs.usable:
            return _Built(failure=certs.none_usable(row.organ_id), setup=True)
        # What the client that sent the message reads: the list its signature advertised (an
        # entry filed before the list was recorded: what its agency advertises).
        advertised = (fields.get("crypto") or {}).get("capabilities")
        cipher = (
            outbound_cipher(advertised)
            if isinstance(advertised, list)
            else capabilities.cipher_for(s, row.organ_id)
        )
        message = self._seal(
            payload_entity(payload.to_xml()),
            certs.usable,
            cipher=cipher,
            to=(to_addr,),
            message_id=f"<receipt.{row.for_seq}.{payload.header.message_id}@{_domain(self.hub.address)}>",
            subject=receipts.subject(str(fields["status"]), row.for_seq),
            at=now,
            auto_submitted="auto-replied",  # RFC 3834: an answer no one is to answer
        )
        item = Item(
            RECEIPT_KIND,
            now,
            {
                RECEIPT_FOR: row.for_seq,
                "status": fields["status"],
                "agency": row.organ_id,
                "to": [to_addr],
                "message_id": str(payload.header.message_id),
                "cipher": cipher,
                "digest": hashlib.sha256(message).hexdigest(),
            },
            {RECEIPT_BLOB: message},
            _SEALED,
        )
        return _Built(
            message, (to_addr,), item, encrypted_to=tuple(map(store.fingerprint, certs.usable))
        )

    def _delivery(self, s: Session, row: t.Outbox, now: datetime) -> _Built:
        assert row.for_seq is not None and row.organ_id is not None
        try:
            addresses = self._addresses(row.organ_id, now)
        except _NoAddress as err:
            return _Built(failure=str(err), setup=True)
        certs = self._certificates(s, row.organ_id, now)
        if not certs.usable:
            return _Built(failure=certs.none_usable(row.organ_id), setup=True)
        entry = self._entry(s, row.for_seq)
        signed = self.archive.blobs.get(s, entry.blobs["decrypted"])
        message_id = f"<delivery.{row.for_seq}.{row.id}@{_domain(self.hub.address)}>"
        cipher = capabilities.cipher_for(s, row.organ_id)
        message = self._seal(
            signed,
            certs.usable,
            cipher=cipher,
            to=addresses,
            message_id=message_id,
            subject=f"Chuyển tiếp dữ liệu (số {row.for_seq}) / Forwarded data (entry {row.for_seq})",
            at=now,
            sign=False,
        )
        item = Item(
            "delivery",
            now,
            {
                "for_seq": row.for_seq,
                "agency": row.organ_id,
                "to": list(addresses),
                "message_id": message_id,
                "cipher": cipher,
                "digest": hashlib.sha256(message).hexdigest(),
                "size": len(message),
            },
            {},
        )
        fingerprints = tuple(store.fingerprint(c) for c in certs.usable)
        return _Built(message, addresses, item, encrypted_to=fingerprints)

    def _resend(self, s: Session, row: t.Outbox, batch: dict[int, _Built], now: datetime) -> _Built:
        """The original receipt again, the same bytes; built anew (and kept in the entry)
        when a certificate it was encrypted to is no longer usable."""
        assert row.for_seq is not None
        original = s.scalar(select(t.Outbox).where(t.Outbox.key == f"receipt:{row.for_seq}"))
        if original is None:
            return _Built(failure=f"entry {row.for_seq} has no receipt to send again")
        just_built = batch.get(original.id)
        if just_built is not None and just_built.message is None:  # built again just now
            if just_built.failure is None:
                return _Built(later=True)
            return _Built(
                failure=f"the receipt for entry {row.for_seq} could not be built: "
                f"{just_built.failure}",
                setup=just_built.setup,
            )
        if just_built is not None and just_built.message is not None:
            item = Item(
                "resend",
                self.clock(),
                {
                    "for_seq": row.for_seq,
                    "receipt": original.key,
                    "to": list(just_built.rcpt_to),
                    "cipher": just_built.item.fields.get("cipher") if just_built.item else None,
                },
                {},
            )
            return _Built(
                just_built.message, just_built.rcpt_to, item, encrypted_to=just_built.encrypted_to
            )
        if original.entry_seq is None:
            if original.state in ("new", "building"):
                return _Built(later=True)  # the original receipt is not built yet
            # The original's failure was alerted when it failed; every duplicate of the message
            # (a mail client sending it again and again) is counted in the agency's alert of
            # the day, not alerted one by one.
            why = f": {original.last_reply}" if original.last_reply else ""
            return _Built(
                failure=f"the receipt for entry {row.for_seq} could not be built{why}", setup=True
            )
        built_for = tuple(original.detail.get(ENCRYPTED_TO) or ())
        if built_for and not set(built_for) <= self._targets(
            s, "receipt", original.for_seq, original.organ_id, now
        ):
            fresh = self._receipt(s, original, now)
            if fresh.message is None:
                return fresh
            fields = {
                "for_seq": row.for_seq,
                "receipt": original.key,
                "to": list(fresh.rcpt_to),
                "rebuilt": "a certificate the receipt was encrypted to is no longer usable",
                "cipher": fresh.item.fields["cipher"] if fresh.item else None,
                "digest": hashlib.sha256(fresh.message).hexdigest(),
            }
            item = Item("resend", now, fields, {RECEIPT_BLOB: fresh.message}, _SEALED)
            return _Built(fresh.message, fresh.rcpt_to, item, encrypted_to=fresh.encrypted_to)
        entry = self._entry(s, original.entry_seq)
        message = self.archive.blobs.get(s, entry.blobs[RECEIPT_BLOB])
        to = tuple(entry.fields["to"])
        item = Item(
            "resend",
            self.clock(),
            {"for_seq": row.for_seq, "receipt_seq": entry.seq, "to": list(to)},
            {},
        )
        return _Built(message, to, item, encrypted_to=built_for)

    def _reminder(self, s: Session, row: t.Outbox, now: datetime) -> _Built:
        """A reminder: plain text (Vietnamese, then English) signed by the hub, encrypted to
        the agency's current certificates when it has any (the words are not secret)."""
        assert row.organ_id is not None
        try:
            addresses = self._addresses(row.organ_id, now)
        except _NoAddress as err:
            return _Built(failure=str(err), setup=True)
        text = str(row.detail.get("text", ""))
        subject = str(row.detail.get("subject", "Nhắc việc / Reminder"))
        entity = _text_entity(text)
        message_id = f"<reminder.{row.id}@{_domain(self.hub.address)}>"
        certs = self._certificates(s, row.organ_id, now).usable
        cipher = capabilities.cipher_for(s, row.organ_id) if certs else None
        if cipher is not None:
            message = self._seal(
                entity,
                certs,
                cipher=cipher,
                to=addresses,
                message_id=message_id,
                subject=subject,
                at=now,
            )
        else:
            cert, key = self.hub.signer
            head = message_headers(
                from_addr=self.hub.address,
                to_addrs=addresses,
                message_id=message_id,
                date=now,
                subject=subject,
                auto_submitted="auto-generated",
            )
            message = head + sign_entity(entity, cert=cert, key=key)
        item = Item(
            "reminder",
            now,
            {
                "reminder": str(row.detail.get("kind", "")),
                "agency": row.organ_id,
                "to": list(addresses),
                "key": row.key,
                "obligation": row.detail.get("obligation"),
                "period": row.detail.get("period"),
                "message_id": message_id,
                "cipher": cipher,
                "digest": hashlib.sha256(message).hexdigest(),
            },
            {"reminder": message},
        )
        return _Built(message, addresses, item, encrypted_to=tuple(map(store.fingerprint, certs)))

    def _alert(self, row: t.Outbox, now: datetime) -> _Built:
        if not self.hub.admin:
            return _Built(failure="no admin address is configured ([serve] admin_address)")
        text = str(row.detail.get("text", ""))
        body = _text_entity(f"{text}\n")
        cert, key = self.hub.signer
        signed = sign_entity(body, cert=cert, key=key)
        head = message_headers(
            from_addr=self.hub.address,
            to_addrs=(self.hub.admin,),
            message_id=f"<alert.{row.id}@{_domain(self.hub.address)}>",
            date=now,
            subject=f"Gateway alert: {_gist(text)}",
            auto_submitted="auto-generated",
        )
        item = Item("alert", now, {"to": [self.hub.admin], "text": text}, {})
        return _Built(head + signed, (self.hub.admin,), item)

    def _certificates(self, s: Session, organ_id: str, now: datetime) -> Recipients:
        """An agency's current encryption certificates, looked up at most every few seconds."""
        cached = self._certs.get(organ_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        trust = self._trust_store(s, now)
        certs = store.encryption_certificates(s, organ_id, now, trust=trust)
        self._certs[organ_id] = (now + CERT_CACHE, certs)
        return certs

    def _trust_store(self, s: Session, now: datetime) -> TrustStore | None:
        """The key store's anchors and revocation evidence, loaded at most every few seconds;
        soft-fail, since only what the evidence says counts here (:mod:`keys.recipients`).
        ``None`` without a trust anchor: no evidence can then be checked."""
        if self._trust is None or self._trust[0] <= now:
            try:
                trust: TrustStore | None = evidence.trust_store(s, revocation_mode="soft-fail")
            except ConfigError:
                trust = None
            self._trust = (now + CERT_CACHE, trust)
        return self._trust[1]

    def _signer_cert(self, s: Session, blobs: dict[str, str]) -> list[x509.Certificate]:
        if "chain" not in blobs:
            return []
        chain = x509.load_pem_x509_certificates(self.archive.blobs.get(s, blobs["chain"]))
        return chain[:1]

    def _seal(
        self,
        entity: bytes,
        certs: Sequence[x509.Certificate],
        *,
        cipher: str,
        to: Sequence[str],
        message_id: str,
        subject: str,
        at: datetime,
        sign: bool = True,
        auto_submitted: str = "auto-generated",
    ) -> bytes:
        if not certs:
            raise _NoCertificate("no certificate to encrypt to")
        if sign:
            cert, key = self.hub.signer
            entity = sign_entity(entity, cert=cert, key=key)
        der = cms_encrypt.encrypt(entity, list(certs), cipher=cipher)
        return wrap_enveloped(
            der,
            smime_type=enveloped_type(cipher),
            from_addr=self.hub.address,
            to_addrs=list(to),
            message_id=message_id,
            date=at,
            subject=subject,
            limits=self.limits,
            auto_submitted=auto_submitted,
        )


#: What re-encrypting a message may add to it: a recipient info per certificate (an agency in
#: a key rollover has two; each is under 1 KiB in base64) and the hub's headers.
OUTBOUND_MARGIN = 64 * 1024


def outbound_limits(inbound: Limits) -> Limits:
    """The limits a message the hub builds is held to: those it takes messages in with, the
    size with :data:`OUTBOUND_MARGIN` more. A delivery is the accepted message re-encrypted,
    a little larger: held to the inbound size, one accepted near the limit could never be
    delivered (and how large a relay takes is its own to say, at MAIL)."""
    return dataclasses.replace(
        inbound, max_message_bytes=inbound.max_message_bytes + OUTBOUND_MARGIN
    )


class _NoAddress(GatewayError):
    code = "no-address"


class _NoCertificate(GatewayError):
    code = "no-certificate"


def _text_entity(text: str) -> bytes:
    """A text/plain MIME entity (UTF-8, base64, CRLF lines) to sign."""
    body = "\r\n".join(text.splitlines()) + "\r\n"
    return (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64_lines(body.encode())
    )


def _domain(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


def _gist(text: str, limit: int = 100) -> str:
    """An alert's subject: the start of its text, one line (alerts are about many things: a
    failed delivery, messages waiting, a refused IMAP message, a certificate expiring)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def given_up(claims: int) -> _Built:
    """What a row claimed ``claims`` times and never built comes to: a failure, not built
    again (the admin is alerted; ``gateway outbox retry`` builds it once more)."""
    return _Built(
        failure=f"the worker building it stopped {claims} times before finishing it (its "
        "process died, or took longer than its lease); not built again"
    )


def nothing_left(row: t.Outbox, built: _Built, now: datetime) -> _Built:
    """``built``, unless every mailbox it would go to took an earlier build of ``row``.

    A build again (a certificate no longer usable, or `outbox retry --rebuild`) goes only to
    the mailboxes of now that did not take an earlier one. When there are none — the mailboxes
    that lacked it have left the agency since — nothing is left to send, and nobody is sent
    it twice: the row ends ``sent`` (each mailbox it is for now has it), the reason in its last
    reply, and that end is filed as an ``outcome`` entry in place of the build."""
    taken = took_build(row.detail)
    if built.message is None or not taken or any(a not in taken for a in built.rcpt_to):
        return built
    agency = row.organ_id or "its addressee"
    left = sorted(a for a in row.detail.get(NOT_TAKEN, ()) if a not in built.rcpt_to)
    if left:
        gone = (
            f"{left[0]}, which lacked it, is no longer a mailbox of {agency}"
            if len(left) == 1
            else f"{', '.join(left)}, which lacked it, are no longer mailboxes of {agency}"
        )
    else:
        gone = f"those that lacked it are no longer mailboxes of {agency}"
    reason = (
        f"nothing left to send: {', '.join(built.rcpt_to)} (every mailbox of {agency} now) "
        f"took an earlier build, and {gone}; not sent again to anyone"
    )
    item = Item(
        "outcome",
        now,
        {
            "for_seq": None,
            "outbox": row.key,
            "status": "sent",
            "reply": reason,
            "attempts": row.attempts,
            "recipients": row.detail.get("recipients", {}),
        },
        {},
    )
    return _Built(rcpt_to=tuple(left), item=item, done=reason)
