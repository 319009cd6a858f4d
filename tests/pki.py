"""Test PKI made at test time: plain functions, shared by the session fixtures in conftest.

Keys are the slow part (RSA-3072 takes 100–300 ms), so :func:`key` hands out one key per name
for the whole test session; certificates are cheap and made fresh where a test needs a variant.

Fixed instants, never the clock: ``T0`` is "now" for every test.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from asn1crypto import algos
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keys.issuing import (
    Issued,
    KeyKind,
    PrivateKey,
    generate_key,
    issue_agency,
    make_crl,
    make_intermediate,
    make_root,
)
from keys.trust import RevocationMode, TrustStore

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
ROOT_FROM = T0 - timedelta(days=365)
CRL_THIS = T0 - timedelta(days=1)
CRL_NEXT = T0 + timedelta(days=7)
AGENCY_EMAIL = "vanthu@sotuphap.hanoi.gov.vn"
AGENCY_ORGAN_ID = "000.00.12.H26"
CRL_URL = "http://ca.example.vn/crl"


@functools.cache
def key(name: str, kind: KeyKind = "rsa2048") -> PrivateKey:
    """One key per ``(name, kind)`` for the whole session."""
    return generate_key(kind)


@dataclass(frozen=True)
class Pki:
    root: Issued
    inter: Issued
    agency: Issued
    root_crl: x509.CertificateRevocationList
    inter_crl: x509.CertificateRevocationList

    def store(
        self, *, mode: RevocationMode = "hard-fail", crls: bool = True, intermediates: bool = True
    ) -> TrustStore:
        return TrustStore(
            anchors=(self.root.cert,),
            intermediates=(self.inter.cert,) if intermediates else (),
            crls=(self.root_crl, self.inter_crl) if crls else (),
            revocation_mode=mode,
        )

    def leaf(self, **kwargs: object) -> Issued:
        """An agency certificate from the intermediate; ``kwargs`` override the defaults."""
        args: dict[str, object] = {
            "email": AGENCY_EMAIL,
            "organ_id": AGENCY_ORGAN_ID,
            "common_name": "Sở Tư pháp Hà Nội",
            "at": T0 - timedelta(days=30),
            "key": key("leaf"),
            "crl_url": CRL_URL,
        }
        args.update(kwargs)
        return issue_agency(self.inter, **args)  # type: ignore[arg-type]

    def inter_crl_with(
        self,
        *revoked: tuple[int, datetime] | tuple[int, datetime, x509.ReasonFlags],
        this_update: datetime = CRL_THIS,
        next_update: datetime = CRL_NEXT,
    ) -> x509.CertificateRevocationList:
        return make_crl(
            self.inter, revoked=revoked, this_update=this_update, next_update=next_update, number=2
        )


def build_pki() -> Pki:
    root = make_root("Test Root CA G1", at=ROOT_FROM, key=key("root", "rsa3072"))
    inter = make_intermediate(
        root, "Test Agency CA G1", at=ROOT_FROM, key=key("inter", "rsa3072"), crl_url=CRL_URL
    )
    agency = issue_agency(
        inter,
        email=AGENCY_EMAIL,
        organ_id=AGENCY_ORGAN_ID,
        common_name="Sở Tư pháp Hà Nội",
        at=T0 - timedelta(days=30),
        key=key("agency", "rsa3072"),
        crl_url=CRL_URL,
    )
    return Pki(
        root=root,
        inter=inter,
        agency=agency,
        root_crl=make_crl(root, this_update=CRL_THIS, next_update=CRL_NEXT, number=1),
        inter_crl=make_crl(inter, this_update=CRL_THIS, next_update=CRL_NEXT, number=1),
    )


def resign(cert: x509.Certificate, ca: Issued, algorithm: str = "sha1") -> x509.Certificate:
    """``cert`` re-signed by ``ca`` with an old hash (``cryptography`` refuses to build one).

    Both signature-algorithm fields are rewritten, so the result is a well-formed certificate
    that merely uses a weak hash — the shape of a legacy CA's output.
    """
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    parsed = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    sig_alg = algos.SignedDigestAlgorithm({"algorithm": f"{algorithm}_rsa"})
    tbs = parsed["tbs_certificate"].copy()
    tbs["signature"] = sig_alg
    digest = {"sha1": hashes.SHA1(), "md5": hashes.MD5()}[algorithm]
    signature = ca.key.sign(tbs.dump(force=True), padding.PKCS1v15(), digest)
    rebuilt = asn1_x509.Certificate(
        {"tbs_certificate": tbs, "signature_algorithm": sig_alg, "signature_value": signature}
    )
    return x509.load_der_x509_certificate(rebuilt.dump())


def self_signed_agency(at: datetime = T0 - timedelta(days=30)) -> Issued:
    """A certificate that looks exactly like an agency's but vouches for itself."""
    k = key("selfsigned")
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Sở Tư pháp Hà Nội"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, AGENCY_ORGAN_ID),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at)
        .not_valid_after(at + timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(AGENCY_EMAIL)]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .sign(k, hashes.SHA256())
    )
    return Issued(cert, k)


def ocsp_response(
    cert: x509.Certificate,
    issuer: Issued,
    *,
    this_update: datetime = CRL_THIS,
    next_update: datetime = CRL_NEXT,
    revoked_at: datetime | None = None,
) -> bytes:
    """A DER OCSP response about ``cert``, signed by its issuing CA itself (RFC 6960 §4.2.2.2)."""
    status = ocsp.OCSPCertStatus.REVOKED if revoked_at else ocsp.OCSPCertStatus.GOOD
    reason = x509.ReasonFlags.key_compromise if revoked_at else None
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=issuer.cert,
            algorithm=hashes.SHA256(),
            cert_status=status,
            this_update=this_update,
            next_update=next_update,
            revocation_time=revoked_at,
            revocation_reason=reason,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.cert)
        .sign(issuer.key, hashes.SHA256())
    )
    return response.public_bytes(serialization.Encoding.DER)


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path
