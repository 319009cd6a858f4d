"""Certificate issuing: roots, intermediates, agency and hub certificates, CRLs.

Used by the demo, the tests and (later) a built-in CA. Everything here is pure: keys and the
issuing instant ``at`` are passed in, nothing is read from disk or from the clock.

Profile (RFC 5280 and RFC 8550 §4.4, checked against ``openssl verify -purpose smimesign`` and
``-purpose smimeencrypt``):

* CA certificates: ``basicConstraints`` CA (critical), ``keyUsage`` keyCertSign + cRLSign
  (critical), SKI, and AKI when issued by another CA.
* Agency / hub certificates: subject ``CN``, ``O`` and the agency's OrganId in the
  **serialNumber** attribute (2.5.4.5, :data:`ORGAN_ID_ATTRIBUTE`: it is the X.520 attribute
  meant for an identifier of the subject, whereas ``OU`` is free text); ``subjectAltName``
  rfc822Name = the agency's mailbox (RFC 8550 §3: the address lives in the SAN);
  ``keyUsage`` digitalSignature + keyEncipherment for RSA, digitalSignature + keyAgreement for
  EC (RFC 8550 §4.4.2); ``extKeyUsage`` emailProtection; AKI/SKI; optional CRL distribution
  point; optional OCSP responder in AIA (pyhanko consults OCSP only when it is declared).

Key generation is slow (RSA-3072 takes 100–300 ms), so every function accepts a pre-made key;
:func:`generate_key` makes one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KeyKind = Literal["rsa2048", "rsa3072", "rsa1024", "ec-p256", "ec-p384"]
KeyUsageKind = Literal["sign+encrypt", "sign", "encrypt"]

#: The subject attribute that carries the agency's OrganId (edXML organisation code).
ORGAN_ID_ATTRIBUTE = NameOID.SERIAL_NUMBER

_RSA_BITS = {"rsa1024": 1024, "rsa2048": 2048, "rsa3072": 3072}
_CURVES: dict[str, type[ec.EllipticCurve]] = {"ec-p256": ec.SECP256R1, "ec-p384": ec.SECP384R1}


@dataclass(frozen=True)
class Issued:
    """A certificate together with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#8 PEM; encrypted with the best available scheme when a passphrase is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


def generate_key(kind: KeyKind = "rsa3072") -> PrivateKey:
    """A fresh private key. ``rsa1024`` exists only to test that such keys are refused."""
    if kind in _RSA_BITS:
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[kind])
    if kind in _CURVES:
        return ec.generate_private_key(_CURVES[kind]())
    raise ValueError(f"unknown key kind {kind!r}; use one of {sorted([*_RSA_BITS, *_CURVES])}")


def make_root(
    name: str,
    *,
    at: datetime,
    days: int = 3650,
    key: PrivateKey | None = None,
    key_kind: KeyKind = "rsa3072",
) -> Issued:
    """A self-signed root CA valid from ``at`` for ``days`` days."""
    _require_aware(at)
    key = key or generate_key(key_kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        _base(subject, subject, key.public_key(), at, at + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
    )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def make_intermediate(
    parent: Issued,
    name: str,
    *,
    at: datetime,
    days: int = 1825,
    key: PrivateKey | None = None,
    key_kind: KeyKind = "rsa3072",
    crl_url: str | None = None,
    path_length: int | None = 0,
) -> Issued:
    """A subordinate CA signed by ``parent``; ``path_length=0`` lets it issue only end entities."""
    _require_aware(at)
    key = key or generate_key(key_kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        _base(subject, parent.cert.subject, key.public_key(), at, at + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_aki(parent), critical=False)
    )
    if crl_url:
        builder = builder.add_extension(_crl_dp(crl_url), critical=False)
    return Issued(builder.sign(parent.key, hashes.SHA256()), key)


def issue_agency(
    ca: Issued,
    *,
    email: str,
    organ_id: str | None,
    common_name: str,
    at: datetime,
    days: int = 730,
    key_kind: KeyKind = "rsa3072",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
    with_email_san: bool = True,
    key_usage: KeyUsageKind = "sign+encrypt",
    key: PrivateKey | None = None,
    crl_url: str | None = None,
    ocsp_url: str | None = None,
    organization: str | None = None,
    signature_hash: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None = None,
) -> Issued:
    """An agency's S/MIME certificate issued by ``ca``.

    Validity is ``[not_before or at, not_after or at + days]``. ``eku=()`` omits the extension;
    ``signature_hash`` defaults to SHA-256 (``cryptography`` refuses to sign with SHA-1 or MD5).
    """
    _require_aware(at)
    key = key or generate_key(key_kind)
    start = not_before or at
    end = not_after or at + timedelta(days=days)
    attrs = [
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization or common_name),
    ]
    if organ_id:
        attrs.append(x509.NameAttribute(ORGAN_ID_ATTRIBUTE, organ_id))
    builder = (
        _base(x509.Name(attrs), ca.cert.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ee_key_usage(key, key_usage), critical=True)
        .add_extension(_aki(ca), critical=False)
    )
    if with_email_san:
        san = x509.SubjectAlternativeName([x509.RFC822Name(email)])
        builder = builder.add_extension(san, critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if crl_url:
        builder = builder.add_extension(_crl_dp(crl_url), critical=False)
    if ocsp_url:
        access = x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
        )
        builder = builder.add_extension(x509.AuthorityInformationAccess([access]), critical=False)
    return Issued(builder.sign(ca.key, signature_hash or hashes.SHA256()), key)


def issue_hub(
    ca: Issued,
    *,
    email: str,
    at: datetime,
    days: int = 730,
    common_name: str = "Official-mail exchange hub",
    organ_id: str | None = None,
    key_kind: KeyKind = "rsa3072",
    key: PrivateKey | None = None,
    crl_url: str | None = None,
) -> Issued:
    """The hub's own certificate: it signs receipts and receives encrypted submissions."""
    return issue_agency(
        ca,
        email=email,
        organ_id=organ_id,
        common_name=common_name,
        at=at,
        days=days,
        key_kind=key_kind,
        key=key,
        crl_url=crl_url,
    )


RevokedEntry: TypeAlias = tuple[int, datetime] | tuple[int, datetime, x509.ReasonFlags]


def make_crl(
    ca: Issued,
    *,
    revoked: Sequence[RevokedEntry] = (),
    this_update: datetime,
    next_update: datetime,
    number: int,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca`` listing ``(serial, revocation date[, reason])`` entries.

    RFC 5280 §5.2.1/§5.2.3: carries AKI and a CRL number; reasons go in a CRL entry extension.
    """
    _require_aware(this_update)
    _require_aware(next_update)
    if next_update <= this_update:
        raise ValueError("next_update must be after this_update")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(_aki(ca), critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in revoked:
        serial, when, *reason = entry
        _require_aware(when)
        rc = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        if reason:
            rc = rc.add_extension(x509.CRLReason(reason[0]), critical=False)
        builder = builder.add_revoked_certificate(rc.build())
    return builder.sign(ca.key, hashes.SHA256())


def pkcs12_bundle(
    issued: Issued, chain: Sequence[x509.Certificate], *, passphrase: bytes, name: str
) -> bytes:
    """A PKCS#12 file mail clients import: AES-256-CBC with PBKDF2-SHA256 for key and
    certificates, an HMAC-SHA256 MAC (``openssl pkcs12`` 3.x opens it without ``-legacy``)."""
    if len(passphrase) < 8:
        raise ValueError("the PKCS#12 passphrase must have at least 8 characters")
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(100_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(passphrase)
    )
    return pkcs12.serialize_key_and_certificates(
        name.encode(), issued.key, issued.cert, list(chain), encryption
    )


# --- helpers ----------------------------------------------------------------------------------


def _require_aware(at: datetime) -> None:
    if at.utcoffset() is None:
        raise ValueError(f"{at!r} is naive; pass a timezone-aware datetime (e.g. tzinfo=UTC)")


def _base(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    start: datetime,
    end: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _aki(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _crl_dp(url: str) -> x509.CRLDistributionPoints:
    point = x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)
    return x509.CRLDistributionPoints([point])


def _ca_key_usage() -> x509.KeyUsage:
    return _key_usage(key_cert_sign=True, crl_sign=True)


def _ee_key_usage(key: PrivateKey, kind: KeyUsageKind) -> x509.KeyUsage:
    sign = kind in ("sign+encrypt", "sign")
    encrypt = kind in ("sign+encrypt", "encrypt")
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    return _key_usage(
        digital_signature=sign,
        key_encipherment=encrypt and is_rsa,
        key_agreement=encrypt and not is_rsa,
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
