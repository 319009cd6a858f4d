"""Checks on a certificate before it is imported: say exactly what is wrong, all at once.

Pure: the certificate, the agency and the moment come in; a list of problems (or an
:class:`~formats.errors.InputError` naming them all) goes out. The same rules that path
validation applies to a signer (:mod:`keys.trust`) are applied here at import time, so that an
admin learns about a certificate the gateway would refuse before any agency sends with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from formats import algorithms
from formats.errors import CryptoError, InputError
from keys.directory import Agency
from keys.trust import emails_of

_E = TypeVar("_E", bound=x509.ExtensionType)
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


def describe(cert: x509.Certificate) -> str:
    return f"certificate {cert.subject.rfc4514_string() or '(empty subject)'} (serial {cert.serial_number:x})"


def agency_problems(cert: x509.Certificate, agency: Agency | None, at: datetime) -> list[str]:
    """Everything that stops ``cert`` from being an S/MIME certificate of ``agency`` at ``at``."""
    problems = _common_problems(cert, at)
    if is_ca(cert):
        problems.append("it is a CA certificate, not an end-entity (agency) certificate")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is None:
        problems.append(
            "it has no extended key usage; S/MIME certificates need emailProtection "
            "(1.3.6.1.5.5.7.3.4)"
        )
    elif ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku:
        usages = ", ".join(_EKU_NAMES.get(u, u.dotted_string) for u in eku)
        problems.append(f"its extended key usage is {usages}; it needs emailProtection for S/MIME")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        problems.append("its key usage does not allow digitalSignature, so it cannot sign mail")
    emails = emails_of(cert)
    if not emails:
        problems.append(
            "it has no e-mail address (rfc822Name) in subjectAltName; the address must equal "
            "the agency's mailbox"
        )
    elif agency is not None:
        if not agency.emails:
            problems.append(
                f"agency {agency.organ_id} has no e-mail address in the directory; add "
                f"{emails[0]} with `gateway agencies update {agency.organ_id} --add-email`"
            )
        elif not set(emails) & agency.emails:
            problems.append(
                f"its e-mail address {', '.join(emails)} is not one of agency "
                f"{agency.organ_id}'s addresses ({', '.join(sorted(agency.emails))})"
            )
    return problems


def ca_problems(cert: x509.Certificate, at: datetime) -> list[str]:
    """Everything that stops ``cert`` from being a trust anchor or intermediate."""
    problems = _common_problems(cert, at)
    if not is_ca(cert):
        problems.append("it is not a CA certificate (basicConstraints cA is not true)")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        problems.append("its key usage does not allow keyCertSign")
    return problems


def require(problems: list[str], cert: x509.Certificate, what: str) -> None:
    """Raise one :class:`InputError` naming every problem, or return."""
    if problems:
        raise InputError(f"{describe(cert)} cannot be imported as {what}: " + "; ".join(problems))


def _common_problems(cert: x509.Certificate, at: datetime) -> list[str]:
    problems = []
    if cert.not_valid_after_utc < at:
        problems.append(f"it expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    try:
        algorithms.check_public_key(cert.public_key(), what="its key")
    except CryptoError as err:
        problems.append(err.message)
    algo = cert.signature_hash_algorithm
    if isinstance(algo, _WEAK_HASHES):
        problems.append(
            f"it is signed with {algo.name.upper()}, which is refused; reissue it with SHA-256"
        )
    return problems


def is_ca(cert: x509.Certificate) -> bool:
    constraints = _extension(cert, x509.BasicConstraints)
    return bool(constraints is not None and constraints.ca)


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
