"""Filing a received message and the gateway's verdict in the archive (pure).

A message — accepted, rejected or quarantined — is kept with everything needed to show years
later what arrived and why the gateway decided as it did:

- blobs: ``raw`` (the bytes as received), ``decrypted`` (the signed S/MIME entity, which
  ``openssl cms -verify`` checks by itself), ``payload`` (the XML), ``attachment-N``,
  ``chain`` (the signer's certificate path, PEM), ``evidence-N`` (each CRL/OCSP response used);
- fields: the verdict and every reason, the transport facts, the signer, the agency, the
  payload's business identifiers, and digests.

The searchable fields (:data:`archive.log.SEARCH_FIELDS`) are set here so that `archive search`
finds entries by agency, category, period, status, DocumentId, MessageId and digest.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archive.log import Item
from archive.records import Transport
from gateway.verdict import Verdict, dn


def period_label(verdict: Verdict) -> str | None:
    """The reporting period as YYYY-MM of its last day (16 Sep – 15 Oct is "2026-10")."""
    p = verdict.payload
    if p is None or p.exchange.period_end is None:
        return None
    return f"{p.exchange.period_end:%Y-%m}"


@functools.lru_cache(maxsize=256)
def _described(cert: x509.Certificate) -> tuple[str, str, str, str]:
    """A signer's certificate as its entries name it: subject, issuer, serial (hex), SHA-256.
    Kept for the certificates an agency's messages come with, one after another."""
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    return dn(cert.subject), dn(cert.issuer), f"{cert.serial_number:x}", digest


@functools.lru_cache(maxsize=64)
def _pem(path: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in path)


def message_item(verdict: Verdict, raw: bytes, transport: Transport) -> Item:
    """The archive entry for one received message and the gateway's verdict on it."""
    fields: dict[str, Any] = {
        "status": verdict.disposition,
        "digest": verdict.raw_sha256,
        "size": len(raw),
        "from": verdict.from_addr,
        "message_id": verdict.message_id,
        "subject": verdict.subject,
        "transport": transport.as_dict(),
        "steps": {s.name: s.outcome for s in verdict.steps},
        "reasons": [e.as_dict() for e in verdict.errors],
    }
    blobs: dict[str, bytes] = {"raw": raw}
    opened = verdict.opened
    if opened is not None:
        fields["crypto"] = {
            "cipher": opened.cipher,
            "key_transport": opened.key_transport,
            "signature": opened.signature.signature_algorithm,
            "digest": opened.signature.digest_algorithm,
            "style": opened.style,
            # What its signer reads (SMIMECapabilities): why what the hub sends back to its
            # agency is encrypted as it is (keys.capabilities).
            "capabilities": list(opened.signature.capabilities),
        }
        blobs["decrypted"] = bytes(opened.decrypted)
        blobs["payload"] = opened.payload
        fields["payload_sha256"] = opened.payload_sha256
        for n, att in enumerate(opened.attachments, start=1):
            blobs[f"attachment-{n}"] = att.data
    if verdict.signer is not None:
        signer = verdict.signer
        subject, issuer, serial, digest = _described(signer.cert)
        fields["signer"] = {
            "subject": subject,
            "issuer": issuer,
            "serial": serial,
            "sha256": digest,
            "emails": list(signer.emails),
            "organ_id": signer.organ_id,
            "revocation_checked": signer.revocation_checked,
        }
        blobs["chain"] = _pem(signer.path)
        for n, evidence in enumerate(signer.evidence, start=1):
            blobs[f"evidence-{n}"] = evidence
    if verdict.agency is not None:
        fields["agency"] = verdict.agency.organ_id
    if verdict.payload is not None:
        h, x = verdict.payload.header, verdict.payload.exchange
        fields["category"] = x.category
        fields["period"] = period_label(verdict)
        fields["document_id"] = str(h.document_id)
        fields["payload"] = {
            "message_id": str(h.message_id),
            "from": h.sender.organ_id,
            "to": [o.organ_id for o in h.recipients],
            "business": h.business.name.lower(),
            "records": len(verdict.payload.records),
            "period_start": x.period_start.isoformat() if x.period_start else None,
            "period_end": x.period_end.isoformat() if x.period_end else None,
            # What gateway.compliance matches on: corrections, replies, request deadlines.
            "cadence": x.cadence,
            "replaces": str(h.replaces) if h.replaces else None,
            "response_for": str(h.response_for) if h.response_for else None,
            "due_date": h.due_date.isoformat() if h.due_date else None,
            "request_ref": x.request_ref,
        }
    # What decrypted was an encrypted message: base64 of ciphertext, beyond its headers.
    dense = frozenset({"raw"}) if opened is not None else frozenset()
    return Item("message", transport.received_at, fields, blobs, dense)
