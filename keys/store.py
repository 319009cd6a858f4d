"""The directory and key store in the database: rows in, pure values out.

An edge (DESIGN §2): functions here take an open :class:`~sqlalchemy.orm.Session` from
:meth:`archive.db.Database.session` and the moment ``at``; they turn rows into the pure values
the pipeline uses (:class:`~keys.directory.Directory`, :class:`~keys.trust.TrustStore`,
:class:`~formats.cms_envelope.RecipientKey`) and record every change as an
:class:`~archive.tables.AdminEvent` in the same transaction, so a change and its record commit
or fail together. Each check happens *before* anything is written: a refused change leaves the
database as it was.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import tables as t
from archive.log import Log
from archive.records import admin_item
from formats.cms_envelope import RecipientKey
from formats.errors import ConfigError, InputError
from keys.binding import Registered
from keys.directory import Agency, Directory, ascii_form, split_mailboxes
from keys.recipients import Recipients, choose
from keys.trust import TrustStore

ROLES = ("agency", "anchor", "intermediate", "hub", "ca")

log = logging.getLogger("keys.store")


# --- events --------------------------------------------------------------------------------------


def record(
    s: Session, *, at: datetime, actor: str, action: str, subject: str, **detail: Any
) -> t.AdminEvent:
    """Append one admin event (committed with the change it describes)."""
    log = Log()
    log.lock(s)  # events get their numbers in the same order as their log entries
    event = t.AdminEvent(at=at, actor=actor, action=action, subject=subject, detail=detail)
    s.add(event)
    s.flush()  # assigns event.seq
    # The archive chains the change into its tamper-evident log, in the same transaction.
    log.append_many(s, [admin_item(at, actor, action, subject, detail, event.seq)])
    return event


def events(s: Session, *, after: int = 0, limit: int | None = None) -> list[t.AdminEvent]:
    query = select(t.AdminEvent).where(t.AdminEvent.seq > after).order_by(t.AdminEvent.seq)
    return list(s.scalars(query.limit(limit) if limit else query))


# --- agencies ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unusable:
    """A mailbox stored for an agency that the current rules refuse: one an earlier version
    wrote before mailboxes had to be ASCII (:func:`keys.directory.normalize_email`). It is left
    out of every :class:`~keys.directory.Agency` this module gives (no mail can go to it, no
    sender be matched to it), and stays stored until the admin removes or replaces it."""

    organ_id: str
    address: str  # as stored
    why: str  # normalize_email's reason, with the ASCII form when the domain alone is not ASCII

    @property
    def short(self) -> str:
        """A few words for a listing."""
        return "not usable: not ASCII" if not self.address.isascii() else "not usable"

    @property
    def fix(self) -> str:
        """The command that fixes it: replaced by its ASCII form when it has one, else
        removed."""
        words = ["gateway", "agencies", "update", self.organ_id, "--remove-email", self.address]
        if (ace := ascii_form(self.address)) is not None:
            words += ["--add-email", ace]
        return shlex.join(words)


def _split(row: t.Agency) -> tuple[frozenset[str], list[Unusable]]:
    """The stored mailboxes of ``row`` the current rules accept, and those they refuse."""
    usable, refused = split_mailboxes(sorted(e.address for e in row.emails))
    return usable, [Unusable(row.organ_id, address, why) for address, why in refused]


def to_value(row: t.Agency) -> Agency:
    """The agency as the gateway uses it: a mailbox the current rules refuse is left out
    (:class:`Unusable`), so a database an earlier version wrote still loads."""
    return Agency(
        organ_id=row.organ_id,
        name_vi=row.name_vi,
        name_en=row.name_en,
        emails=_split(row)[0],
        supervisor=row.supervisor,
        valid_from=row.valid_from,
        valid_to=row.valid_to,
        contact=row.contact,
    )


def _agency_rows(s: Session) -> list[t.Agency]:
    return list(s.scalars(select(t.Agency).order_by(t.Agency.organ_id)))


def agencies(s: Session) -> list[Agency]:
    """Every agency (:func:`to_value`); :func:`load_agencies` also says what was left out."""
    return [to_value(r) for r in _agency_rows(s)]


def unusable_mailboxes(s: Session, organ_id: str | None = None) -> list[Unusable]:
    """The stored mailboxes (of ``organ_id``, or of every agency) the current rules refuse."""
    if organ_id is not None:
        row = s.get(t.Agency, organ_id)
        return _split(row)[1] if row is not None else []
    return [u for r in _agency_rows(s) for u in _split(r)[1]]


def load_agencies(s: Session) -> list[Agency]:
    """:func:`agencies`, for a directory the gateway is about to use: each stored mailbox left
    out (:class:`Unusable`) is logged as a warning, once in this load, naming the fix."""
    rows = _agency_rows(s)
    for row in rows:
        for u in _split(row)[1]:
            log.warning(
                "agency %s: its stored mailbox %s; it is left out of the directory (no mail "
                "goes to it, no sender is matched to it) until it is fixed: `%s`",
                u.organ_id,
                u.why,
                u.fix,
            )
    return [to_value(r) for r in rows]


def directory(s: Session) -> Directory:
    """The stored directory, to use (:func:`load_agencies`)."""
    return Directory.of(load_agencies(s))


def get_agency(s: Session, organ_id: str) -> Agency:
    row = s.get(t.Agency, organ_id)
    if row is None:
        raise InputError(
            f"no agency {organ_id!r} in the directory; `gateway agencies list` shows them"
        )
    return to_value(row)


def add_agency(s: Session, agency: Agency, *, at: datetime, actor: str) -> None:
    """Enrol a new agency; its OrganId and e-mail addresses must not clash with the directory."""
    if s.get(t.Agency, agency.organ_id) is not None:
        raise InputError(
            f"agency {agency.organ_id} already exists; use `gateway agencies update` to change it"
        )
    _check_directory([*agencies(s), agency])
    s.add(_row(agency, at))
    record(s, at=at, actor=actor, action="agency.add", subject=agency.organ_id, **_detail(agency))


def put_agency(
    s: Session, agency: Agency, *, at: datetime, actor: str, drop: Collection[str] = ()
) -> str:
    """Add ``agency`` or replace the entry with its OrganId (:func:`update_agency`, ``drop``);
    returns "added"/"updated"/"same"."""
    row = s.get(t.Agency, agency.organ_id)
    if row is None:
        add_agency(s, agency, at=at, actor=actor)
        return "added"
    if to_value(row) == agency and not {u.address for u in _split(row)[1]} & set(drop):
        return "same"
    update_agency(s, agency, at=at, actor=actor, drop=drop)
    return "updated"


def update_agency(
    s: Session, agency: Agency, *, at: datetime, actor: str, drop: Collection[str] = ()
) -> None:
    """Replace the directory entry for ``agency.organ_id`` with ``agency``.

    A stored mailbox the current rules refuse (:class:`Unusable`) is in no ``agency`` value: it
    stays stored unless ``drop`` names it (as stored). Its removal is recorded like any other
    change of the e-mails, from the stored list to the new one, so `gateway archive verify`
    replays the events to the rows."""
    row = s.get(t.Agency, agency.organ_id)
    if row is None:
        raise InputError(f"no agency {agency.organ_id!r}; use `gateway agencies add` first")
    before = to_value(row)
    _check_directory([a for a in agencies(s) if a.organ_id != agency.organ_id] + [agency])
    row.name_vi, row.name_en, row.contact = agency.name_vi, agency.name_en, agency.contact
    row.supervisor, row.valid_from, row.valid_to = (
        agency.supervisor,
        agency.valid_from,
        agency.valid_to,
    )
    row.updated_at = at
    current = {e.address: e for e in row.emails}
    kept = {u.address for u in _split(row)[1]} - set(drop)
    wanted = agency.emails | kept
    for address in set(current) - wanted:
        row.emails.remove(current[address])
    for address in sorted(wanted - set(current)):
        row.emails.append(t.AgencyEmail(address=address))
    old, new = _detail(before), _detail(agency)
    old["emails"], new["emails"] = sorted(current), sorted(wanted)
    changed = {k: [v, new[k]] for k, v in old.items() if new[k] != v}
    record(s, at=at, actor=actor, action="agency.update", subject=agency.organ_id, changed=changed)


def retire_agency(s: Session, organ_id: str, *, last_day: date, at: datetime, actor: str) -> None:
    """End an agency's validity on ``last_day`` (inclusive). Nothing is deleted."""
    agency = get_agency(s, organ_id)
    if agency.valid_from and last_day < agency.valid_from:
        raise InputError(
            f"{organ_id} starts on {agency.valid_from}; it cannot be retired on {last_day}"
        )
    row = s.get(t.Agency, organ_id)
    assert row is not None
    row.valid_to, row.updated_at = last_day, at
    record(s, at=at, actor=actor, action="agency.retire", subject=organ_id, last_day=str(last_day))


def _check_directory(all_agencies: Sequence[Agency]) -> None:
    directory_ = Directory.of(all_agencies)  # duplicate codes, e-mail claimed twice
    for agency in all_agencies:
        if agency.supervisor and directory_.get(agency.supervisor) is None:
            raise InputError(
                f"agency {agency.organ_id}: supervising body {agency.supervisor} is not in the "
                "directory; add it first or leave the supervisor empty"
            )
        seen = [agency.organ_id]
        up = directory_.get(agency.supervisor) if agency.supervisor else None
        while up is not None:
            if up.organ_id in seen:
                raise InputError(
                    f"agency {agency.organ_id}: supervisors form a loop "
                    f"({' → '.join([*seen, up.organ_id])}); a supervising body cannot report "
                    "to its own subordinate"
                )
            seen.append(up.organ_id)
            up = directory_.get(up.supervisor) if up.supervisor else None


def _row(agency: Agency, at: datetime) -> t.Agency:
    return t.Agency(
        organ_id=agency.organ_id,
        name_vi=agency.name_vi,
        name_en=agency.name_en,
        supervisor=agency.supervisor,
        contact=agency.contact,
        valid_from=agency.valid_from,
        valid_to=agency.valid_to,
        created_at=at,
        updated_at=at,
        emails=[t.AgencyEmail(address=a) for a in sorted(agency.emails)],
    )


def _detail(agency: Agency) -> dict[str, Any]:
    return {
        "name_vi": agency.name_vi,
        "name_en": agency.name_en,
        "emails": sorted(agency.emails),
        "supervisor": agency.supervisor,
        "contact": agency.contact,
        "valid_from": str(agency.valid_from) if agency.valid_from else None,
        "valid_to": str(agency.valid_to) if agency.valid_to else None,
    }


# --- certificates --------------------------------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def san_emails(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(e) for e in san.get_values_for_type(x509.RFC822Name)]


@dataclass(frozen=True)
class StoredCertificate:
    """A certificate row as a value."""

    sha256: str
    role: str
    organ_id: str | None
    subject: str
    issuer: str
    serial: str
    emails: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    use_from: datetime | None
    use_until: datetime | None
    source: str
    imported_at: datetime
    retired_at: datetime | None
    certificate: x509.Certificate

    def window(self) -> tuple[datetime, datetime]:
        """When it may be used, retirement aside: its own validity narrowed by the window the
        admin allows (``keys window --from/--until``)."""
        return (
            max(self.not_before, self.use_from or self.not_before),
            min(self.not_after, self.use_until or self.not_after),
        )

    def usable_at(self, at: datetime) -> bool:
        """Inside both its own validity and the window the admin allows."""
        start, end = self.window()
        return (self.retired_at is None or at < self.retired_at) and start <= at <= end

    def as_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "role": self.role,
            "organ_id": self.organ_id,
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "emails": list(self.emails),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "use_from": self.use_from.isoformat() if self.use_from else None,
            "use_until": self.use_until.isoformat() if self.use_until else None,
            "source": self.source,
            "imported_at": self.imported_at.isoformat(),
            "retired_at": self.retired_at.isoformat() if self.retired_at else None,
        }


def _utc(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError("naive datetime; pass an aware one")
    return value.astimezone(UTC)


def _stored(row: t.Certificate) -> StoredCertificate:
    return StoredCertificate(
        sha256=row.sha256,
        role=row.role,
        organ_id=row.organ_id,
        subject=row.subject,
        issuer=row.issuer,
        serial=row.serial,
        emails=tuple(e for e in row.emails.split(",") if e),
        not_before=row.not_before,
        not_after=row.not_after,
        use_from=row.use_from,
        use_until=row.use_until,
        source=row.source,
        imported_at=row.imported_at,
        retired_at=row.retired_at,
        certificate=x509.load_der_x509_certificate(row.der),
    )


def add_certificate(
    s: Session,
    cert: x509.Certificate,
    *,
    role: str,
    at: datetime,
    actor: str,
    organ_id: str | None = None,
    use_from: datetime | None = None,
    use_until: datetime | None = None,
    source: str = "",
) -> StoredCertificate:
    """Store ``cert`` (already checked by the caller, see :mod:`keys.inspect`)."""
    if role not in ROLES:
        raise ValueError(f"unknown certificate role {role!r}")
    sha = fingerprint(cert)
    existing = s.scalar(select(t.Certificate).where(t.Certificate.sha256 == sha))
    if existing is not None:
        holder = f" for {existing.organ_id}" if existing.organ_id else ""
        raise InputError(
            f"certificate {sha[:16]}… ({cert.subject.rfc4514_string()}) is already stored as "
            f"{existing.role}{holder}"
        )
    row = t.Certificate(
        sha256=sha,
        role=role,
        organ_id=organ_id,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        emails=",".join(san_emails(cert)),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        use_from=_utc(use_from) if use_from else None,
        use_until=_utc(use_until) if use_until else None,
        der=cert.public_bytes(serialization.Encoding.DER),
        source=source,
        imported_at=at,
        retired_at=None,
    )
    s.add(row)
    s.flush()
    record(
        s,
        at=at,
        actor=actor,
        action=f"certificate.add.{role}",
        subject=organ_id or row.subject,
        sha256=sha,
        serial=row.serial,
        not_after=row.not_after.isoformat(),
        source=source,
    )
    return _stored(row)


def certificates(
    s: Session,
    *,
    role: str | Iterable[str] | None = None,
    organ_id: str | None = None,
    include_retired: bool = True,
) -> list[StoredCertificate]:
    query = select(t.Certificate).order_by(t.Certificate.id)
    if role is not None:
        roles = [role] if isinstance(role, str) else list(role)
        query = query.where(t.Certificate.role.in_(roles))
    if organ_id is not None:
        query = query.where(t.Certificate.organ_id == organ_id)
    if not include_retired:
        query = query.where(t.Certificate.retired_at.is_(None))
    return [_stored(r) for r in s.scalars(query)]


def find_certificate(s: Session, ref: str) -> t.Certificate:
    """A certificate by SHA-256 fingerprint (or a unique prefix of at least 8 hex digits) or
    by serial number (hex)."""
    ref = ref.lower().replace(":", "")
    rows = list(s.scalars(select(t.Certificate).where(t.Certificate.serial == ref.lstrip("0"))))
    if not rows and len(ref) >= 8:
        rows = list(s.scalars(select(t.Certificate).where(t.Certificate.sha256.startswith(ref))))
    if not rows:
        raise InputError(f"no certificate with serial or fingerprint {ref!r}")
    if len(rows) > 1:
        raise InputError(f"{ref!r} matches {len(rows)} certificates; give the SHA-256 fingerprint")
    return rows[0]


def set_window(
    s: Session,
    ref: str,
    *,
    use_from: datetime | None = None,
    use_until: datetime | None = None,
    at: datetime,
    actor: str,
) -> StoredCertificate:
    """Narrow the window in which a certificate may be used (rollover overlap)."""
    row = find_certificate(s, ref)
    if use_from is not None:
        row.use_from = _utc(use_from)
    if use_until is not None:
        row.use_until = _utc(use_until)
    if row.use_from and row.use_until and row.use_until < row.use_from:
        raise InputError("the certificate's use window ends before it starts")
    record(
        s,
        at=at,
        actor=actor,
        action="certificate.window",
        subject=row.organ_id or row.subject,
        sha256=row.sha256,
        use_from=row.use_from.isoformat() if row.use_from else None,
        use_until=row.use_until.isoformat() if row.use_until else None,
    )
    return _stored(row)


def retire_certificate(s: Session, ref: str, *, at: datetime, actor: str) -> StoredCertificate:
    row = find_certificate(s, ref)
    if row.retired_at is not None:
        raise InputError(f"certificate {row.sha256[:16]}… was already retired on {row.retired_at}")
    row.retired_at = at
    key = s.scalar(select(t.PrivateKey).where(t.PrivateKey.certificate_id == row.id))
    if key is not None:
        key.retired_at = at
    record(
        s,
        at=at,
        actor=actor,
        action=f"certificate.retire.{row.role}",
        subject=row.organ_id or row.subject,
        sha256=row.sha256,
    )
    return _stored(row)


def enrolled(s: Session) -> dict[str, tuple[Registered, ...]]:
    """Agency certificates by OrganId, with the windows in which each may sign."""
    out: dict[str, list[Registered]] = {}
    for c in certificates(s, role="agency"):
        if c.organ_id is None:
            continue
        start = max(c.not_before, c.use_from or c.not_before)
        ends = [c.not_after] + [e for e in (c.use_until, c.retired_at) if e is not None]
        out.setdefault(c.organ_id, []).append(Registered(c.sha256, start, min(ends)))
    return {k: tuple(v) for k, v in out.items()}


def encryption_certificates(
    s: Session, organ_id: str, at: datetime, *, trust: TrustStore | None
) -> Recipients:
    """Every certificate of ``organ_id`` usable at ``at`` that the hub can encrypt to and the
    evidence in ``trust`` does not say is revoked (:func:`keys.recipients.choose`; ``None``
    when the key store has no trust anchor). During a rollover overlap that is both the old and
    the new one, so the agency can decrypt with either key."""
    current = [
        c.certificate
        for c in certificates(s, role="agency", organ_id=organ_id, include_retired=False)
        if c.usable_at(at)
    ]
    return choose(current, trust=trust, at=at)


# --- private keys (hub, built-in CA) -------------------------------------------------------------

PrivateKeyTypes = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def add_private_key(
    s: Session,
    cert: x509.Certificate,
    key: PrivateKeyTypes,
    *,
    role: str,
    passphrase: bytes,
    at: datetime,
    actor: str,
    source: str = "",
) -> StoredCertificate:
    """Store a certificate with its private key, encrypted under ``passphrase``."""
    if not passphrase:
        raise ConfigError("a passphrase is needed to store a private key encrypted at rest")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise InputError("the private key does not belong to the certificate")
    stored = add_certificate(s, cert, role=role, at=at, actor=actor, source=source)
    row = s.scalar(select(t.Certificate).where(t.Certificate.sha256 == stored.sha256))
    assert row is not None
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    s.add(t.PrivateKey(certificate_id=row.id, role=role, encrypted_pem=pem, created_at=at))
    return stored


def private_keys(
    s: Session, *, role: str, passphrase: bytes | None, at: datetime | None = None
) -> list[tuple[StoredCertificate, PrivateKeyTypes]]:
    """Unretired keys of ``role``, newest first, decrypted with ``passphrase``."""
    rows = s.scalars(
        select(t.PrivateKey)
        .where(t.PrivateKey.role == role, t.PrivateKey.retired_at.is_(None))
        .order_by(t.PrivateKey.id.desc())
    )
    out = []
    for row in rows:
        stored = _stored(row.certificate)
        if at is not None and not stored.usable_at(at):
            continue
        try:
            key = serialization.load_pem_private_key(row.encrypted_pem, passphrase)
        except (TypeError, ValueError):
            raise ConfigError(
                f"cannot decrypt the {role} private key for {stored.subject}: wrong or missing "
                "passphrase (set it in the environment variable or file named in gateway.toml)"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(f"the stored {role} key is of an unsupported type")
        out.append((stored, key))
    return out


def hub_key_usable(cert: x509.Certificate, stored: StoredCertificate | None, at: datetime) -> bool:
    """The one rule for whether a hub key pair decrypts and signs at ``at``.

    A pair whose certificate the key store holds follows that row: not retired (``keys hub
    retire`` ends a key for good), inside its own validity and inside the admin's window
    (``keys window``) — :meth:`StoredCertificate.usable_at`, as :func:`private_keys` applies it.
    A pair known only from the ``[hub]`` files has no row: its certificate's validity alone.
    """
    if stored is not None:
        return stored.retired_at is None and stored.usable_at(at)
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def certificate_row(s: Session, cert: x509.Certificate) -> StoredCertificate | None:
    """The stored row of ``cert`` (by SHA-256 fingerprint), if the key store holds it."""
    row = s.scalar(select(t.Certificate).where(t.Certificate.sha256 == fingerprint(cert)))
    return _stored(row) if row is not None else None


def hub_recipient_keys(
    s: Session, passphrase: bytes | None, *, at: datetime | None = None
) -> tuple[RecipientKey, ...]:
    """The stored hub keys usable at ``at`` (:func:`hub_key_usable`), newest first: during a
    rotation's overlap old and new both decrypt, so a rotation never strands a message. Without
    ``at``, every unretired one."""
    return tuple(
        RecipientKey(stored.certificate, key)
        for stored, key in private_keys(s, role="hub", passphrase=passphrase, at=at)
        if isinstance(key, rsa.RSAPrivateKey)
    )


# --- expiry --------------------------------------------------------------------------------------


def expiring(s: Session, *, at: datetime, until: datetime) -> list[StoredCertificate]:
    """Unretired certificates whose usable end falls before ``until`` (soonest first)."""
    out = [
        c
        for c in certificates(s, include_retired=False)
        if min(c.not_after, c.use_until or c.not_after) <= until
    ]
    return sorted(out, key=lambda c: min(c.not_after, c.use_until or c.not_after))
