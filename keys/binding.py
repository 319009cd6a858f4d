"""Agency binding: the validated signer must *be* the sending agency (DESIGN §5 rule 2).

Small policy objects, each ``verify(ctx) -> None`` or raise a
:class:`~formats.errors.BindingError`, combined with :class:`AllOf`::

    AllOf(
        EmailIs(from_addr),
        SenderIsAgency(directory),
        AgencyIs(payload_organ_id, directory),
    ).verify(BindingContext(signer=validated, from_addr=from_addr, at=received_on))

``at`` is a calendar date in the directory's (local) time zone: the caller converts the
receipt instant, so this module never decides a time zone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from cryptography.hazmat.primitives.serialization import Encoding

from formats.errors import (
    AgencyMismatch,
    GatewayError,
    SenderMismatch,
    UnknownAgency,
)
from keys.directory import Directory, normalize_email
from keys.trust import ValidatedSigner, describe


@dataclass(frozen=True)
class BindingContext:
    """What the binding policies look at: the validated signer, the From address, the day."""

    signer: ValidatedSigner
    from_addr: str
    at: date


class Policy(Protocol):
    def verify(self, ctx: BindingContext) -> None:
        """Return if the policy holds; raise a :class:`BindingError` naming the mismatch."""


class AllOf:
    """Every policy must hold. :meth:`verify` raises the first failure, in the given order."""

    def __init__(self, *policies: Policy) -> None:
        if not policies:
            raise ValueError("AllOf needs at least one policy; use UnsafeNoOp to check nothing")
        self._policies = policies

    def verify(self, ctx: BindingContext) -> None:
        for policy in self._policies:
            policy.verify(ctx)

    def failures(self, ctx: BindingContext) -> list[GatewayError]:
        """Every failure, for reports that list all that is wrong at once."""
        out: list[GatewayError] = []
        for policy in self._policies:
            if isinstance(policy, AllOf):
                out += policy.failures(ctx)
                continue
            try:
                policy.verify(ctx)
            except GatewayError as exc:
                out.append(exc)
        return out


@dataclass(frozen=True)
class EmailIs:
    """The certificate's SAN e-mail equals the single From address.

    RFC 5321 §2.4: the domain compares case-insensitively, the local part exactly.
    """

    from_addr: str

    def verify(self, ctx: BindingContext) -> None:
        try:
            wanted = normalize_email(self.from_addr)
            if self.from_addr != self.from_addr.strip():  # a quoted local part: "\ name"@…
                raise ValueError(self.from_addr)
        except ValueError:
            raise SenderMismatch(
                f"From {self.from_addr!r} is not a single bare address; send from the "
                "agency's mailbox only"
            ) from None
        emails = ctx.signer.emails
        if wanted in emails:
            return
        if not emails:
            raise SenderMismatch(
                f"From <{wanted}>: the signer {describe(ctx.signer.cert)} carries no e-mail "
                f"address; re-issue the certificate with subjectAltName rfc822Name {wanted}"
            )
        shown = ", ".join(f"<{e}>" for e in emails)
        raise SenderMismatch(
            f"From <{wanted}> does not match certificate e-mail {shown}; re-issue the "
            f"certificate or send from {emails[0]}"
        )


@dataclass(frozen=True)
class SenderIsAgency:
    """The From address belongs to an agency in the directory on that day."""

    directory: Directory

    def verify(self, ctx: BindingContext) -> None:
        if self.directory.by_email(ctx.from_addr, ctx.at) is None:
            raise UnknownAgency(
                f"From <{ctx.from_addr}> is not the mailbox of any agency in the directory on "
                f"{ctx.at.isoformat()}; register the mailbox for its agency or send from a "
                "registered one"
            )


@dataclass(frozen=True)
class AgencyIs:
    """The payload's ``From/OrganId`` is the agency that owns the From address and, when the
    certificate subject carries an OrganId, that one too."""

    organ_id: str
    directory: Directory

    def verify(self, ctx: BindingContext) -> None:
        owner = self.directory.by_email(ctx.from_addr, ctx.at)
        if owner is None:
            raise UnknownAgency(
                f"From <{ctx.from_addr}> is not the mailbox of any agency in the directory on "
                f"{ctx.at.isoformat()}, so payload OrganId {self.organ_id} cannot be checked"
            )
        if owner.organ_id != self.organ_id:
            raise AgencyMismatch(
                f"payload From/OrganId {self.organ_id} does not match {owner.organ_id} "
                f"({owner.name_vi}), the agency that owns <{ctx.from_addr}>; put "
                f"{owner.organ_id} in the payload or send from that agency's mailbox"
            )
        cert_organ = ctx.signer.organ_id
        if cert_organ is not None and cert_organ != self.organ_id:
            raise AgencyMismatch(
                f"payload From/OrganId {self.organ_id} does not match OrganId {cert_organ} in "
                f"the signer {describe(ctx.signer.cert)}; sign with {self.organ_id}'s "
                "certificate or correct the payload"
            )


@dataclass(frozen=True)
class Registered:
    """A certificate enrolled for an agency, with the window in which it may be used."""

    sha256: str
    usable_from: datetime
    usable_until: datetime

    def covers(self, instant: datetime) -> bool:
        return self.usable_from <= instant <= self.usable_until


@dataclass(frozen=True)
class CertificateEnrolled:
    """When the directory holds certificates for the sending agency, the signer must be one of
    them, inside its usable window at ``instant`` (the receipt time).

    This is what makes a rollover explicit: during the overlap both the old and the new
    certificate are enrolled and both pass; once the old one's window ends only the new one
    does. An agency with no enrolled certificate is bound by the chain and e-mail alone (the
    national-CA model, where any certificate the CA issues to the mailbox is acceptable).
    """

    enrolled: Mapping[str, tuple[Registered, ...]]
    directory: Directory
    instant: datetime

    def verify(self, ctx: BindingContext) -> None:
        owner = self.directory.by_email(ctx.from_addr, ctx.at)
        if owner is None:
            return  # SenderIsAgency reports this
        certs = self.enrolled.get(owner.organ_id, ())
        if not certs:
            return
        sha = hashlib.sha256(ctx.signer.cert.public_bytes(Encoding.DER)).hexdigest()
        mine = [c for c in certs if c.sha256 == sha]
        if not mine:
            raise SenderMismatch(
                f"the signer {describe(ctx.signer.cert)} is not one of the certificates enrolled "
                f"for {owner.organ_id}; enrol it with `gateway keys import --agency "
                f"{owner.organ_id}` or sign with an enrolled certificate"
            )
        if not any(c.covers(self.instant) for c in mine):
            window = ", ".join(
                f"{c.usable_from:%Y-%m-%d %H:%M}–{c.usable_until:%Y-%m-%d %H:%M} UTC" for c in mine
            )
            raise SenderMismatch(
                f"the signer {describe(ctx.signer.cert)} is enrolled for {owner.organ_id} only for "
                f"{window}; sign with the agency's current certificate"
            )


class UnsafeNoOp:
    """Checks nothing. For tests only — never configure it in a running gateway."""

    def verify(self, ctx: BindingContext) -> None:
        return None
