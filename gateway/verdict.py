"""The verdict on one message, and the message state machine.

States (DESIGN §5, STYLE habit 2)::

    received ──> accepted ──> delivered
        │
        ├──────> rejected      the sender is authenticated; the payload is refused
        │                      (a signed rejection receipt goes back to the agency)
        └──────> quarantined   the sender could not be authenticated (no decryption, bad or
                               untrusted signature, From not bound to the signer); nothing is
                               sent to an unverified address, an admin reviews it

A transient failure leaves the message ``received`` to be processed again (SMTP 451).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from formats.errors import GatewayError, InternalError, is_transient
from formats.payload import Payload
from formats.smime import OpenedMessage
from keys.directory import Agency
from keys.trust import ValidatedSigner

Disposition = Literal["accepted", "rejected", "quarantined", "retry"]

#: The message state machine: state → states it may move to.
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "received": frozenset({"accepted", "rejected", "quarantined"}),
    "accepted": frozenset({"delivered"}),
    "rejected": frozenset(),
    "quarantined": frozenset({"received"}),  # an admin may release it for reprocessing
    "delivered": frozenset(),
    # Never taken in (an IMAP message over the size limit, or one the server cannot return):
    # filed with what could be read of it, and final (gateway.imap).
    "refused": frozenset(),
}

#: The status a message's archive entry may carry: a decision, or ``refused`` (never taken in).
FILED: Final = ("accepted", "rejected", "quarantined", "refused")

#: edXML Status codes for the receipt (QCVN 102:2016 StatusCode).
RECEIPT_STATUS: Final[dict[str, str]] = {"accepted": "03", "rejected": "02", "quarantined": "02"}


def dn(name: x509.Name) -> str:
    """RFC 4514 text with readable names for the attributes agency certificates use."""
    return name.rfc4514_string({NameOID.SERIAL_NUMBER: "serialNumber"})


def can_move(from_state: str, to_state: str) -> bool:
    return to_state in TRANSITIONS.get(from_state, frozenset())


@dataclass(frozen=True)
class StepOutcome:
    name: str
    outcome: Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Verdict:
    disposition: Disposition
    errors: tuple[GatewayError, ...]
    steps: tuple[StepOutcome, ...]
    raw_sha256: str
    from_addr: str | None = None
    message_id: str | None = None
    subject: str | None = None
    opened: OpenedMessage | None = None
    signer: ValidatedSigner | None = None
    agency: Agency | None = None
    payload: Payload | None = None
    #: The message said it is an automatic answer (``Auto-Submitted: auto-replied``).
    auto_replied: bool = False

    @property
    def accepted(self) -> bool:
        return self.disposition == "accepted"

    @property
    def advertised(self) -> tuple[str, tuple[str, ...]] | None:
        """The agency and the SMIMECapabilities its signature advertised (RFC 8551 §2.5.2),
        when the message was decided, its signature verified and its signer bound to the
        agency: what the hub encrypts to that agency with (:mod:`keys.capabilities`)."""
        decided = self.disposition in ("accepted", "rejected")
        if not decided or self.agency is None or self.signer is None or self.opened is None:
            return None
        return self.agency.organ_id, self.opened.signature.capabilities

    @property
    def smtp_reply(self) -> str:
        """The reply the verdict stands for: 250; a 4xx when it is to be retried (the transient
        error's own, though a permanent one was found before it); else the first reason's."""
        if self.accepted:
            return "250 2.6.0 accepted"
        if self.disposition == "retry":
            return next(e for e in self.errors if is_transient(e)).smtp_reply
        return self.errors[0].smtp_reply

    @property
    def receipt_status(self) -> str | None:
        return RECEIPT_STATUS.get(self.disposition)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "disposition": self.disposition,
            "raw_sha256": self.raw_sha256,
            "from": self.from_addr,
            "message_id": self.message_id,
            "subject": self.subject,
            "steps": {s.name: s.outcome for s in self.steps},
            "reasons": [e.as_dict() for e in self.errors],
        }
        if self.opened is not None:
            out["crypto"] = {
                "cipher": self.opened.cipher,
                "key_transport": self.opened.key_transport,
                "signature": self.opened.signature.signature_algorithm,
                "digest": self.opened.signature.digest_algorithm,
                "style": self.opened.style,
                "capabilities": list(self.opened.signature.capabilities),
            }
        if self.signer is not None:
            out["signer"] = {
                "subject": dn(self.signer.cert.subject),
                "serial": f"{self.signer.cert.serial_number:X}",
                "emails": list(self.signer.emails),
                "issuer": dn(self.signer.cert.issuer),
                "revocation_checked": self.signer.revocation_checked,
            }
        elif self.opened is not None:
            out["signer"] = {
                "subject": dn(self.opened.signer.subject),
                "serial": f"{self.opened.signer.serial_number:X}",
                "trusted": False,
            }
        if self.agency is not None:
            out["agency"] = {"organ_id": self.agency.organ_id, "name": self.agency.name_vi}
        if self.payload is not None:
            out["payload"] = payload_summary(self.payload)
        return out


def payload_summary(p: Payload) -> dict[str, Any]:
    h, x = p.header, p.exchange
    return {
        "category": x.category,
        "cadence": x.cadence,
        "period_start": x.period_start.isoformat() if x.period_start else None,
        "period_end": x.period_end.isoformat() if x.period_end else None,
        "document_id": str(h.document_id),
        "message_id": str(h.message_id),
        "from": h.sender.organ_id,
        "to": [o.organ_id for o in h.recipients],
        "business": h.business.name.lower(),
        "records": len(p.records),
    }


def disposition_for(errors: tuple[GatewayError, ...], *, authenticated: bool) -> Disposition:
    if not errors:
        return "accepted"
    if any(isinstance(e, InternalError) for e in errors):
        return "quarantined"  # an admin looks first: no receipt is built from half a result
    if any(is_transient(e) for e in errors):
        return "retry"
    return "rejected" if authenticated else "quarantined"


def failed_inside(raw: bytes, what: str, exc: BaseException) -> Verdict:
    """The verdict on a message the gateway's own code failed on (:class:`InternalError`):
    quarantined, with nothing taken from the message but its bytes and their digest."""
    return Verdict(
        disposition="quarantined",
        errors=(InternalError.during(what, exc),),
        steps=(),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
    )
