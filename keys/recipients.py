"""Which certificates the hub encrypts to: a choice with no I/O, and the reason for each one
left out.

Of the certificates offered (an agency's current ones, see
:func:`keys.store.encryption_certificates`, or the one that signed a message, for its
receipt), the hub encrypts to those that pass, in order:

0. valid at ``at`` (between notBefore and notAfter);
1. an RSA key, for key transport (RFC 8551 §2.3, RSA PKCS#1 v1.5), or an EC key on P-256 or
   P-384, for ECDH key agreement (RFC 5753; :func:`formats.cms_encrypt.encrypt`);
2. a keyUsage that allows keyEncipherment (RSA) or keyAgreement (EC), if the certificate has
   one (RFC 5280 §4.2.1.3; RFC 8550 §4.4.2): a signing-only certificate is left out;
3. not revoked at ``at`` by the stored evidence: the trust store's own check
   (:meth:`keys.trust.TrustStore.validate_signer` in soft-fail mode), so a CRL or OCSP response
   that makes the pipeline refuse a signer also stops the hub encrypting to it; and a
   revocation that older evidence records (a CRL past its next update still proves what it
   lists: :meth:`keys.trust.TrustStore.revoked_on_record`). A certificate without evidence is
   not judged revoked; one the trust store cannot judge at all (no anchors, no path) was
   checked when it was enrolled and is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from formats.algorithms import ALLOWED_CURVES
from formats.errors import GatewayError, SignerRevoked
from keys.trust import TrustStore, describe


@dataclass(frozen=True)
class Recipients:
    """The certificates to encrypt to, and why each other one offered is left out."""

    usable: tuple[x509.Certificate, ...] = ()
    left_out: tuple[str, ...] = ()

    def none_usable(self, organ_id: str) -> str:
        """Why nothing can be encrypted to ``organ_id``, and the fix (when :attr:`usable` is
        empty)."""
        why = f": {'; '.join(self.left_out)}" if self.left_out else ""
        return (
            f"agency {organ_id} has no usable encryption certificate{why}; import a current "
            "encryption certificate of the agency, RSA or EC P-256/P-384 (`gateway keys import`)"
        )


def choose(
    certs: Iterable[x509.Certificate], *, trust: TrustStore | None, at: datetime
) -> Recipients:
    """The certificates of ``certs`` the hub encrypts to at ``at`` (see the module docstring);
    ``trust=None`` when the key store has no trust anchor (no evidence can then be checked)."""
    usable: list[x509.Certificate] = []
    left_out: list[str] = []
    for cert in certs:
        problem = _not_valid(cert, at) or encryption_problem(cert) or _revoked(cert, trust, at)
        if problem is None:
            usable.append(cert)
        else:
            left_out.append(problem)
    return Recipients(tuple(usable), tuple(left_out))


def _not_valid(cert: x509.Certificate, at: datetime) -> str | None:
    """Step 0: outside its validity period, a certificate's key may no longer be the agency's
    (a key store's current certificates are within it already; the certificate that signed a
    message, a receipt's fallback, may not be)."""
    if at > cert.not_valid_after_utc:
        return f"{describe(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
    if at < cert.not_valid_before_utc:
        return f"{describe(cert)} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}"
    return None


def encryption_problem(cert: x509.Certificate) -> str | None:
    """Why the hub cannot encrypt to ``cert``'s key (steps 1–2), or ``None``."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            return f"{describe(cert)} has an EC key on {key.curve.name}; the hub encrypts to P-256 and P-384"
        needed = "keyAgreement"
    elif isinstance(key, rsa.RSAPublicKey):
        needed = "keyEncipherment"
    else:
        return (
            f"{describe(cert)} has a {type(key).__name__} key; the hub encrypts to RSA and EC keys"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    allowed = usage.key_agreement if needed == "keyAgreement" else usage.key_encipherment
    if not allowed:
        return f"{describe(cert)} does not allow {needed} (a signing-only certificate)"
    return None


def _revoked(cert: x509.Certificate, trust: TrustStore | None, at: datetime) -> str | None:
    """Step 3: the trust store's message when the evidence says ``cert`` is revoked."""
    if trust is None:
        return None
    try:
        trust.validate_signer(cert, at=at)
    except SignerRevoked as err:
        return err.message
    except GatewayError:  # not a signer now for another reason (path, usage): not ours to judge
        pass
    # Evidence past its next update is not read above (soft-fail: no current evidence), but a
    # revocation it records still holds.
    return trust.revoked_on_record(cert, at)
