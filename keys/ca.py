"""The built-in certificate authority, for deployments without a national CA.

An edge (DESIGN §2) like :mod:`keys.store`: every function takes an open
:class:`~sqlalchemy.orm.Session`, the moment ``at`` and the CA passphrase; certificates are made
by the pure :mod:`keys.issuing`. Each function checks everything first and writes last, and
every change is an admin event in the same transaction, so a refused or failed command leaves
the database as it was.

How the CA lives in the key store:

* its root certificate is a trust **anchor** (role ``anchor``, source :data:`SOURCE`), so the
  pipeline trusts what it issues; its private key is a ``private_keys`` row of role ``ca``,
  PKCS#8-encrypted under the passphrase (DESIGN §5 rule 6). A certificate is stored once
  (fingerprints are unique), so the anchor row *is* the CA row;
* agency certificates it issues are stored as role ``agency`` for their OrganId. Their private
  keys are handed over in a PKCS#12 file and never stored by the hub;
* revocations are rows of :class:`archive.tables.Revocation`; every CRL it signs numbers from
  the :class:`archive.tables.Counter` :data:`CRL_COUNTER` and is kept as revocation evidence,
  which the trust store hands to path validation (hard-fail: the pipeline needs a current CRL,
  so ``gateway keys crl`` must run before the last one's nextUpdate).

After ``init --rotate`` several roots coexist: the newest issues, all of them keep signing
CRLs for what they issued until they are retired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import tables as t
from formats.algorithms import signed_by
from formats.errors import ConfigError, InputError
from formats.vntime import local_day
from keys import evidence, store
from keys.directory import normalize_email
from keys.issuing import Issued, issue_agency, make_crl, make_root

SOURCE = "built-in CA"
CRL_COUNTER = "ca.crl_number"
CAKeyKind = Literal["rsa4096", "rsa3072"]
AgencyKeyKind = Literal["rsa3072", "ec-p256"]
CA_KEY_KINDS: tuple[str, ...] = get_args(CAKeyKind)
AGENCY_KEY_KINDS: tuple[str, ...] = get_args(AgencyKeyKind)

#: RFC 5280 §5.3.1 reason codes by the names the CLI accepts.
REASONS: dict[str, x509.ReasonFlags] = {
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "unspecified": x509.ReasonFlags.unspecified,
}
#: Hanoi local time (UTC+7, no DST): an agency's validity dates are local calendar days.


@dataclass(frozen=True)
class Authority:
    """One root of the built-in CA, with its decrypted key."""

    stored: store.StoredCertificate
    issued: Issued
    cert_id: int

    @property
    def name(self) -> str:
        return self.stored.subject


@dataclass(frozen=True)
class Revoked:
    stored: store.StoredCertificate
    reason: str
    revoked_at: datetime
    crls: tuple[x509.CertificateRevocationList, ...]


# --- reading -------------------------------------------------------------------------------------


def _ca_rows(s: Session) -> list[t.PrivateKey]:
    """Unretired CA key rows, newest first (keys stay encrypted)."""
    return list(
        s.scalars(
            select(t.PrivateKey)
            .where(t.PrivateKey.role == "ca", t.PrivateKey.retired_at.is_(None))
            .order_by(t.PrivateKey.id.desc())
        )
    )


def authorities(s: Session, *, passphrase: bytes | None) -> list[Authority]:
    """Every unretired root of the built-in CA, newest first; fails on a wrong passphrase."""
    out = []
    for stored, key in store.private_keys(s, role="ca", passphrase=passphrase):
        row = s.scalar(select(t.Certificate.id).where(t.Certificate.sha256 == stored.sha256))
        assert row is not None
        out.append(Authority(stored, Issued(stored.certificate, key), row))
    if not out:
        raise ConfigError("there is no built-in CA yet; create it with `gateway keys ca init`")
    return out


def certificates(s: Session) -> list[store.StoredCertificate]:
    """The CA's own root certificates (unretired), newest first, without touching keys."""
    order = [r.certificate.sha256 for r in _ca_rows(s)]
    found = {c.sha256: c for c in store.certificates(s) if c.sha256 in order}
    return [found[sha] for sha in order]


# --- init ----------------------------------------------------------------------------------------


def init(
    s: Session,
    *,
    name: str,
    days: int,
    passphrase: bytes,
    at: datetime,
    actor: str,
    rotate: bool = False,
    key_kind: CAKeyKind = "rsa4096",
    crl_days: int = 7,
) -> tuple[Authority, x509.CertificateRevocationList]:
    """Create a root CA (or, with ``rotate``, a new one beside the existing ones) and its first
    CRL, so that what it issues validates at once under hard-fail revocation."""
    at = _second(at)
    if not passphrase:
        raise ConfigError("a passphrase is needed to keep the CA key encrypted at rest")
    _check_days(days, "--days", 36500)
    existing = certificates(s)
    if existing and not rotate:
        first = existing[0]
        raise InputError(
            f"the built-in CA already exists ({first.subject}, valid until "
            f"{first.not_after:%Y-%m-%d}); use --rotate to create a new root beside it"
        )
    if existing:
        authorities(s, passphrase=passphrase)  # every root must stay readable with one secret
    if not 1 <= len(name.strip()) <= 64:  # RFC 5280 Appendix A: ub-common-name 64
        raise InputError(f"the CA name must have 1 to 64 characters, not {len(name.strip())}")
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]).rfc4514_string()
    if any(r.subject == subject for r in store.certificates(s)):
        raise InputError(
            f"a certificate named {subject!r} is already stored; CRLs are matched by issuer "
            "name, so give the new root a different --name (e.g. add 'G2')"
        )
    bits = 4096 if key_kind == "rsa4096" else 3072
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    root = make_root(name, at=at, days=days, key=key)
    stored = store.add_certificate(s, root.cert, role="anchor", at=at, actor=actor, source=SOURCE)
    cert_row = s.scalar(select(t.Certificate).where(t.Certificate.sha256 == stored.sha256))
    assert cert_row is not None
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    s.add(t.PrivateKey(certificate_id=cert_row.id, role="ca", encrypted_pem=pem, created_at=at))
    s.flush()
    store.record(
        s,
        at=at,
        actor=actor,
        action="ca.rotate" if existing else "ca.init",
        subject=stored.subject,
        sha256=stored.sha256,
        serial=stored.serial,
        key=key_kind,
        not_after=stored.not_after.isoformat(),
    )
    authority = Authority(stored, root, cert_row.id)
    crl = _sign_crl(s, authority, at=at, days=crl_days, actor=actor)
    return authority, crl


# --- issue ---------------------------------------------------------------------------------------


def issue(
    s: Session,
    organ_id: str,
    *,
    passphrase: bytes | None,
    at: datetime,
    actor: str,
    email: str | None = None,
    days: int = 730,
    key_kind: AgencyKeyKind = "rsa3072",
    crl_url: str | None = None,
) -> tuple[Issued, store.StoredCertificate, Authority]:
    """An agency certificate and key from the newest root, registered to ``organ_id``.

    The key is returned for the caller to hand over (PKCS#12); only the certificate is stored.
    """
    at = _second(at)
    agency = store.get_agency(s, organ_id)
    if not agency.active_on(local_day(at)):
        raise InputError(
            f"agency {organ_id} is not active on {local_day(at)} (valid "
            f"{agency.valid_from or '…'} – {agency.valid_to or '…'}); no certificate issued"
        )
    address = _choose_email(organ_id, sorted(agency.emails), email)
    if key_kind not in AGENCY_KEY_KINDS:
        raise InputError(f"--key {key_kind!r}: use one of {', '.join(AGENCY_KEY_KINDS)}")
    _check_days(days, "--days", 3650)
    if crl_url is not None and not crl_url.startswith(("http://", "https://", "ldap://")):
        raise InputError(f"CRL URL {crl_url!r} must be an http(s) or ldap URL")
    authority = authorities(s, passphrase=passphrase)[0]
    ca_end = authority.stored.not_after
    if at + timedelta(days=days) > ca_end:
        raise InputError(
            f"a {days}-day certificate would outlive the CA ({authority.name}, valid until "
            f"{ca_end:%Y-%m-%d}); use fewer --days or rotate the CA with `gateway keys ca init "
            "--rotate`"
        )
    common_name = agency.name_en or agency.name_vi
    if len(common_name) > 64:  # RFC 5280 Appendix A: ub-common-name 64
        raise InputError(
            f"agency {organ_id}'s name {common_name!r} is longer than the 64 characters a "
            "certificate's CN may hold; give it a shorter English name in the directory"
        )
    issued = issue_agency(
        authority.issued,
        email=address,
        organ_id=organ_id,
        common_name=common_name,
        organization=agency.name_vi,
        at=at,
        days=days,
        key_kind=key_kind,
        crl_url=crl_url,
    )
    stored = store.add_certificate(
        s, issued.cert, role="agency", organ_id=organ_id, at=at, actor=actor, source=SOURCE
    )
    store.record(
        s,
        at=at,
        actor=actor,
        action="ca.issue",
        subject=organ_id,
        sha256=stored.sha256,
        serial=stored.serial,
        email=address,
        key=key_kind,
        ca=authority.stored.sha256,
        not_after=stored.not_after.isoformat(),
    )
    return issued, stored, authority


def _choose_email(organ_id: str, emails: Sequence[str], wanted: str | None) -> str:
    if not emails:
        raise InputError(
            f"agency {organ_id} has no e-mail address in the directory; add its official "
            "mailbox first (the certificate's subjectAltName must be that address)"
        )
    if wanted is None:
        if len(emails) > 1:
            raise InputError(
                f"agency {organ_id} has {len(emails)} mailboxes ({', '.join(emails)}); choose "
                "one with --email"
            )
        return emails[0]
    try:
        address = normalize_email(wanted)
    except ValueError as exc:
        raise InputError(f"--email: {exc}") from None
    if address not in emails:
        raise InputError(
            f"{address} is not a mailbox of agency {organ_id} ({', '.join(emails)}); add it to "
            "the directory first or choose one of these"
        )
    return address


# --- revoke and CRLs -----------------------------------------------------------------------------


def revoke(
    s: Session,
    serial: str,
    *,
    reason: str,
    passphrase: bytes | None,
    at: datetime,
    actor: str,
    revoked_at: datetime | None = None,
    crl_days: int = 7,
) -> Revoked:
    """Revoke a certificate our CA issued, retire it, and sign fresh CRLs at once."""
    at = _second(at)
    when = _second(revoked_at) if revoked_at else at
    if reason not in REASONS:
        raise InputError(f"unknown reason {reason!r}; use one of {', '.join(REASONS)}")
    if when > at:
        raise InputError(f"the revocation time {when:%Y-%m-%d %H:%M:%S} UTC is in the future")
    ref = serial.strip().lower().replace(":", "")
    try:
        number = int(ref, 16)
    except ValueError:
        raise InputError(f"{serial!r} is not a hexadecimal serial number") from None
    hexserial = f"{number:x}"
    authorities_ = authorities(s, passphrase=passphrase)
    rows = list(s.scalars(select(t.Certificate).where(t.Certificate.serial == hexserial)))
    if not rows:
        raise InputError(f"no stored certificate has serial {hexserial}; `gateway keys list`")
    target = authority = None
    for row in rows:
        cert = x509.load_der_x509_certificate(row.der)
        for a in authorities_:
            if row.sha256 == a.stored.sha256:
                raise InputError(
                    f"serial {hexserial} is the built-in CA's own root ({a.name}); a root is not "
                    "revoked by its own CRL: rotate it (`gateway keys ca init --rotate`)"
                )
            if cert.issuer == a.issued.cert.subject and signed_by(cert, a.issued.cert):
                target, authority = row, a
    if target is None or authority is None:
        raise InputError(
            f"serial {hexserial} was issued by {rows[0].issuer}, not by the built-in CA; revoke "
            "it at its own CA and import that CA's CRL"
        )
    done = s.scalar(
        select(t.Revocation).where(
            t.Revocation.ca_certificate_id == authority.cert_id, t.Revocation.serial == hexserial
        )
    )
    if done is not None:
        raise InputError(
            f"serial {hexserial} was already revoked on {done.revoked_at:%Y-%m-%d %H:%M} UTC "
            f"({done.reason})"
        )
    if when < target.not_before:
        raise InputError(
            f"the revocation time {when:%Y-%m-%d %H:%M} is before the certificate's notBefore"
        )
    s.add(
        t.Revocation(
            ca_certificate_id=authority.cert_id, serial=hexserial, reason=reason, revoked_at=when
        )
    )
    store.record(
        s,
        at=at,
        actor=actor,
        action="ca.revoke",
        subject=target.organ_id or target.subject,
        serial=hexserial,
        sha256=target.sha256,
        reason=reason,
        revoked_at=when.isoformat(),
    )
    if target.retired_at is None:
        stored = store.retire_certificate(s, target.sha256, at=at, actor=actor)
    else:
        stored = next(c for c in store.certificates(s) if c.sha256 == target.sha256)
    s.flush()
    crls = publish_crls(s, passphrase=passphrase, at=at, actor=actor, days=crl_days)
    return Revoked(stored, reason, when, tuple(crls))


def publish_crls(
    s: Session, *, passphrase: bytes | None, at: datetime, actor: str, days: int = 7
) -> list[x509.CertificateRevocationList]:
    """A fresh CRL from every unretired root, each kept as revocation evidence."""
    at = _second(at)
    _check_days(days, "--days", 366)
    return [
        _sign_crl(s, a, at=at, days=days, actor=actor)
        for a in authorities(s, passphrase=passphrase)
    ]


def revocations(s: Session) -> list[t.Revocation]:
    return list(s.scalars(select(t.Revocation).order_by(t.Revocation.id)))


def _sign_crl(
    s: Session, authority: Authority, *, at: datetime, days: int, actor: str
) -> x509.CertificateRevocationList:
    rows = s.scalars(
        select(t.Revocation)
        .where(t.Revocation.ca_certificate_id == authority.cert_id)
        .order_by(t.Revocation.id)
    )
    entries: list[tuple[int, datetime] | tuple[int, datetime, x509.ReasonFlags]] = []
    for r in rows:
        flag = REASONS[r.reason]
        # RFC 5280 §5.3.1: "the reason code CRL entry extension SHOULD be absent instead of
        # using the unspecified (0) reasonCode value".
        if flag is x509.ReasonFlags.unspecified:
            entries.append((int(r.serial, 16), r.revoked_at))
        else:
            entries.append((int(r.serial, 16), r.revoked_at, flag))
    number = _next(s, CRL_COUNTER)
    crl = make_crl(
        authority.issued,
        revoked=entries,
        this_update=at,
        next_update=at + timedelta(days=days),
        number=number,
    )
    evidence.add_crl(s, crl, source=SOURCE, at=at, actor=actor)
    store.record(
        s,
        at=at,
        actor=actor,
        action="ca.crl",
        subject=authority.name,
        number=number,
        entries=len(entries),
        next_update=(at + timedelta(days=days)).isoformat(),
    )
    return crl


def _next(s: Session, name: str) -> int:
    """Increment a named counter (RFC 5280 §5.2.3: CRL numbers increase monotonically)."""
    row = s.get(t.Counter, name, with_for_update=True)
    if row is None:
        row = t.Counter(name=name, value=0)
        s.add(row)
    row.value += 1
    s.flush()
    return row.value


# --- handing over --------------------------------------------------------------------------------


def describe(a: Authority | store.StoredCertificate) -> dict[str, Any]:
    c = a.stored if isinstance(a, Authority) else a
    return {
        "subject": c.subject,
        "serial": c.serial,
        "sha256": c.sha256,
        "not_before": c.not_before.isoformat(),
        "not_after": c.not_after.isoformat(),
    }


# --- helpers -------------------------------------------------------------------------------------


def _check_days(days: int, option: str, most: int) -> None:
    if not 1 <= days <= most:
        raise InputError(f"{option} {days}: give a number of days between 1 and {most}")


def _second(at: datetime) -> datetime:
    """Certificates and CRLs carry whole seconds; so do our rows, to compare equal."""
    if at.utcoffset() is None:
        raise ValueError(f"{at!r} is naive; pass a timezone-aware datetime")
    return at.astimezone(UTC).replace(microsecond=0)
