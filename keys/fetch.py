"""Fetching CRLs from the distribution points named in known certificates (an edge).

A CRL is stored only if a CA certificate the hub already holds signed it, so a distribution
point cannot feed the hub a forged list. Downloads are bounded in time and size. A list that
is still fresh (its nextUpdate is ahead) is not fetched again unless asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy.orm import Session

from formats.errors import InputError
from keys import evidence, http, store

MAX_CRL_BYTES = 16 * 1024 * 1024

Fetcher = Callable[[str], bytes]


@dataclass(frozen=True)
class Outcome:
    url: str
    status: str  # stored | unchanged | fresh | failed
    detail: str = ""


def distribution_points(cert: x509.Certificate) -> list[str]:
    """The http(s) URLs of ``cert``'s CRL distribution points."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith(
                ("http://", "https://")
            ):
                urls.append(name.value)
    return urls


def download(url: str) -> bytes:
    """GET ``url`` with a timeout and a size cap."""
    return http.fetch(url, limit=MAX_CRL_BYTES, what="CRL")


def refresh(
    s: Session, *, at: datetime, actor: str, force: bool = False, fetch: Fetcher = download
) -> list[Outcome]:
    """Fetch the CRL of every distribution point named by a certificate in the store."""
    certs = store.certificates(s, include_retired=False)
    issuers = [c.certificate for c in store.certificates(s, role=("anchor", "intermediate", "ca"))]
    fresh_issuers = {
        r.issuer for r in evidence.crl_rows(s) if r.next_update is not None and at < r.next_update
    }
    urls: dict[str, x509.Name] = {}
    for c in certs:
        for url in distribution_points(c.certificate):
            urls.setdefault(url, c.certificate.issuer)
    out = []
    for url, issuer in sorted(urls.items()):
        if not force and issuer.rfc4514_string() in fresh_issuers:
            out.append(Outcome(url, "fresh", "the stored CRL has not reached its nextUpdate"))
            continue
        try:
            crl = _parse(fetch(url))
            _check_signed(crl, issuers)
            added = evidence.add_crl(s, crl, source=url, at=at, actor=actor)
        except InputError as err:
            out.append(Outcome(url, "failed", err.message))
            continue
        out.append(Outcome(url, "stored" if added else "unchanged"))
    return out


def _parse(data: bytes) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise InputError("the response is not a CRL (PEM or DER)") from None


def _check_signed(crl: x509.CertificateRevocationList, issuers: list[x509.Certificate]) -> None:
    for issuer in issuers:
        if issuer.subject != crl.issuer:
            continue
        key = issuer.public_key()
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) and (
            crl.is_signature_valid(key)
        ):
            return
    raise InputError(
        f"the CRL of {crl.issuer.rfc4514_string()} is not signed by any CA certificate the hub "
        "holds; refused"
    )
