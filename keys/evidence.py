"""Revocation evidence in the key store, and the trust store made from it.

CRLs and OCSP responses are kept exactly as received (deduplicated by the SHA-256 of their
DER), each with its admin event in the same transaction (:func:`keys.store.record`); the
pipeline's :class:`~keys.trust.TrustStore` takes the anchors and intermediates of the key store
and the newest evidence of each issuer (CRL) or certificate (OCSP).
"""

from __future__ import annotations

import contextlib
import hashlib
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from archive import tables as t
from formats.errors import ConfigError, InputError
from keys.store import certificates, record
from keys.trust import RevocationMode, TrustStore


def add_crl(
    s: Session, crl: x509.CertificateRevocationList, *, source: str, at: datetime, actor: str
) -> bool:
    """Keep a CRL exactly as received. Returns False if it was already stored."""
    number = None
    with contextlib.suppress(x509.ExtensionNotFound):
        number = str(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    return _keep_evidence(
        s,
        t.RevocationEvidence(
            kind="crl",
            issuer=crl.issuer.rfc4514_string(),
            this_update=crl.last_update_utc,
            next_update=crl.next_update_utc,
            number=number,
            der=crl.public_bytes(serialization.Encoding.DER),
            source=source,
        ),
        at=at,
        actor=actor,
        number=number,
    )


def _keep_evidence(
    s: Session, row: t.RevocationEvidence, *, at: datetime, actor: str, **detail: Any
) -> bool:
    """Store ``row`` (deduplicated by the SHA-256 of its DER) with its admin event."""
    row.sha256 = hashlib.sha256(row.der).hexdigest()
    query = select(t.RevocationEvidence.id).where(t.RevocationEvidence.sha256 == row.sha256)
    if s.scalar(query):
        return False
    row.fetched_at = at
    s.add(row)
    record(
        s,
        at=at,
        actor=actor,
        action=f"evidence.{row.kind}",
        subject=row.issuer,
        sha256=row.sha256,
        **detail,
        source=row.source,
    )
    return True


def latest_crls(s: Session) -> list[bytes]:
    """The newest CRL (by thisUpdate) of each issuer."""
    newest = (
        select(t.RevocationEvidence.issuer, func.max(t.RevocationEvidence.this_update).label("tu"))
        .where(t.RevocationEvidence.kind == "crl")
        .group_by(t.RevocationEvidence.issuer)
        .subquery()
    )
    rows = s.scalars(
        select(t.RevocationEvidence)
        .join(
            newest,
            (t.RevocationEvidence.issuer == newest.c.issuer)
            & (t.RevocationEvidence.this_update == newest.c.tu),
        )
        .where(t.RevocationEvidence.kind == "crl")
    )
    return [r.der for r in rows]


def _evidence_rows(s: Session, kind: str, *order: Any) -> list[t.RevocationEvidence]:
    ev = t.RevocationEvidence
    return list(s.scalars(select(ev).where(ev.kind == kind).order_by(ev.issuer, *order)))


def crl_rows(s: Session) -> list[t.RevocationEvidence]:
    return _evidence_rows(s, "crl", t.RevocationEvidence.this_update)


def add_ocsp(
    s: Session, der: bytes, *, issuer: x509.Name, source: str, at: datetime, actor: str
) -> bool:
    """Keep an OCSP response exactly as received (``der``; the caller has verified it, see
    :func:`keys.ocsp.verify_response`). Returns False if it was already stored.

    Kept as :class:`~archive.tables.RevocationEvidence` of kind ``ocsp``: ``issuer`` is the DN
    of the CA that issued the certificate asked about (as for a CRL, so one issuer's evidence
    sits together), ``number`` the certificate's serial in hex (as in the certificates table),
    thisUpdate/nextUpdate those of its single response.
    """
    try:
        resp = ocsp.load_der_ocsp_response(der)
        if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise ValueError(resp.response_status.name)
        serial, status = f"{resp.serial_number:x}", resp.certificate_status.name.lower()
        this_update, next_update = resp.this_update_utc, resp.next_update_utc
    except ValueError:  # not a response, unsuccessful, or several single responses
        raise InputError("only a successful OCSP response about one certificate is kept") from None
    return _keep_evidence(
        s,
        t.RevocationEvidence(
            kind="ocsp",
            issuer=issuer.rfc4514_string(),
            this_update=this_update,
            next_update=next_update,
            number=serial,
            der=der,
            source=source,
        ),
        at=at,
        actor=actor,
        serial=serial,
        status=status,
    )


def latest_ocsps(s: Session) -> list[bytes]:
    """The newest OCSP response (by thisUpdate, then by arrival) about each certificate."""
    ev = t.RevocationEvidence
    newest = (
        select(ev.issuer, ev.number, func.max(ev.this_update).label("tu"))
        .where(ev.kind == "ocsp")
        .group_by(ev.issuer, ev.number)
        .subquery()
    )
    rows = s.scalars(
        select(ev)
        .join(
            newest,
            (ev.issuer == newest.c.issuer)
            & (ev.number == newest.c.number)
            & (ev.this_update == newest.c.tu),
        )
        .where(ev.kind == "ocsp")
        .order_by(ev.id)
    )
    # Two responses with the same thisUpdate (an ECDSA responder re-signing): keep the later.
    return list({(r.issuer, r.number): r.der for r in rows}.values())


def ocsp_rows(s: Session) -> list[t.RevocationEvidence]:
    ev = t.RevocationEvidence
    return _evidence_rows(s, "ocsp", ev.number, ev.this_update)


def trust_store(s: Session, *, revocation_mode: RevocationMode = "hard-fail") -> TrustStore:
    anchors = [c.certificate for c in certificates(s, role="anchor", include_retired=False)]
    if not anchors:
        raise ConfigError(
            "no trust anchors in the key store; import one with `gateway keys anchors import` "
            "or create the built-in CA with `gateway keys ca init`"
        )
    return TrustStore(
        anchors=tuple(anchors),
        intermediates=tuple(
            c.certificate for c in certificates(s, role="intermediate", include_retired=False)
        ),
        crls=tuple(latest_crls(s)),
        ocsps=tuple(latest_ocsps(s)),
        revocation_mode=revocation_mode,
    )
