"""Fetching OCSP responses for known certificates (an edge, like :mod:`keys.fetch` for CRLs).

For every unretired agency certificate and intermediate whose issuing CA the hub holds, an
OCSP request (RFC 6960 §4.1) is POSTed (``application/ocsp-request``, RFC 6960 Appendix A.1)
to the responder configured in ``[trust] ocsp_responder`` or else to the certificate's own
AIA OCSP URL (certificates whose AIA names no responder are skipped: the path validator would
not consult an answer about them). A response is stored only if :func:`verify_response` accepts it, so a responder
cannot feed the hub a forged or stale answer. Downloads are bounded in time and size. A stored
response that is still fresh (its nextUpdate is ahead) is not fetched again unless asked.

The core — :func:`build_request` and :func:`verify_response` — does no I/O and takes the time
as an argument; :func:`refresh` joins it to the key store and to a ``post`` function (the
transport seam: tests and callers may pass their own).

CertID hash: SHA-1. RFC 5019 §2.1.1 (the profile most CA responders implement, often with
pre-signed responses) requires clients to use SHA-1 for CertID, and older responders —
OpenSSL's ``ocsp`` before 1.1 among them — look up the issuer by SHA-1 CertID only and answer
"unknown" to anything else; OpenSSL 3's ``ocsp`` answers both. SHA-1 is an identifier here,
not a signature: the response is signed, and we recompute the CertID (issuer name hash,
issuer key hash, serial) with the response's own algorithm and compare, so forging a match
would need a SHA-1 *second preimage* of a CA's name and key. Responses with SHA-256/384/512
CertIDs are accepted too.

No nonce is sent: RFC 5019 §2.1 responders (pre-signed) ignore it, so it would prove nothing;
replay is bounded instead by the currency check (thisUpdate/nextUpdate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    SignatureAlgorithmOID,
)
from sqlalchemy.orm import Session

from formats.algorithms import signed_by
from formats.errors import InputError
from keys import evidence, http, store
from keys.trust import ALLOWED_HASHES

MAX_OCSP_BYTES = 256 * 1024
#: How far a responder's clock may run ahead of ours (thisUpdate in the future).
CLOCK_SKEW = timedelta(minutes=5)
#: RFC 5019 §2.1.1; see the module docstring.
CERT_ID_HASH: hashes.HashAlgorithm = hashes.SHA1()  # noqa: S303 — an identifier, not a signature
_CERT_ID_HASHES: tuple[hashes.HashAlgorithm, ...] = (
    hashes.SHA1(),  # noqa: S303
    hashes.SHA256(),
    hashes.SHA384(),
    hashes.SHA512(),
)

#: ``post(url, request_der) -> response_der``; raises :class:`InputError` on failure.
Poster = Callable[[str, bytes], bytes]


@dataclass(frozen=True)
class Outcome:
    subject: str  # the certificate asked about
    serial: str  # its serial, hex as `openssl x509 -serial` prints it (lower case)
    url: str
    status: str  # stored | unchanged | fresh | failed
    detail: str = ""


# --- the core: no I/O ----------------------------------------------------------------------------


def responder_urls(cert: x509.Certificate) -> list[str]:
    """The http(s) OCSP responder URLs in ``cert``'s authorityInfoAccess (RFC 5280 §4.2.2.1)."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.startswith(("http://", "https://"))
    ]


def build_request(
    cert: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm = CERT_ID_HASH
) -> bytes:
    """The DER OCSPRequest for ``cert`` (one CertID, no nonce, unsigned: RFC 5019 §2.1)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm)
    return builder.build().public_bytes(Encoding.DER)


def verify_response(
    der: bytes, cert: x509.Certificate, issuer: x509.Certificate, *, at: datetime
) -> ocsp.OCSPResponse:
    """Accept ``der`` as current evidence about ``cert`` at ``at``, or raise :class:`InputError`.

    The plan (RFC 6960 §3.2, in order):

    1. it parses as an OCSPResponse and its responseStatus is successful (§4.2.1);
    2. it carries exactly one SingleResponse, and its CertID is ``cert``'s — serial, issuer name
       hash and issuer key hash recomputed with the response's own hash algorithm;
    3. the signer named by responderID is the issuer itself, or a delegated responder
       certificate carried in the response, issued directly by the issuer, with extKeyUsage
       id-kp-OCSPSigning, valid at ``at`` (§4.2.2.2);
    4. the signature verifies with the signer's key and uses SHA-256 or stronger;
    5. it is current: thisUpdate is not later than ``at`` + :data:`CLOCK_SKEW`, nextUpdate is
       present and not passed (§4.2.2.1; without nextUpdate the trust store would treat it as
       current for ever, so it is refused);
    6. the status is good or revoked (``unknown`` is no evidence).
    """
    who = f"certificate serial {cert.serial_number:x}"
    # 1.
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError:
        raise InputError("the answer is not a DER OCSP response") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise InputError(
            f"the responder answered {resp.response_status.name.lower()} instead of a response; "
            "check that it serves this CA"
        )
    # 2.
    singles = list(resp.responses)
    if len(singles) != 1:
        raise InputError(f"the response carries {len(singles)} answers; one was asked for")
    single = singles[0]
    if single.serial_number != cert.serial_number or not _cert_id_matches(single, cert, issuer):
        raise InputError(
            f"the response is about serial {single.serial_number:x} of another or unknown "
            f"issuer, not {who} of {issuer.subject.rfc4514_string()}; refused"
        )
    # 3.
    signer = _signer(resp, issuer, at)
    # 4.
    _check_signature(resp, signer)
    # 5.
    if single.this_update_utc > at + CLOCK_SKEW:
        raise InputError(
            f"the response's thisUpdate {single.this_update_utc:%Y-%m-%d %H:%M:%SZ} is in the "
            "future; check the responder's clock (or ours)"
        )
    next_update = single.next_update_utc
    if next_update is None:
        raise InputError(
            "the response has no nextUpdate, so it could not be told when it stops being "
            "current; configure the responder to set one (openssl ocsp -nmin/-ndays)"
        )
    if next_update <= at:
        raise InputError(
            f"the response is stale: its nextUpdate {next_update:%Y-%m-%d %H:%M:%SZ} has passed; "
            "the responder may be serving a cached answer"
        )
    # 6.
    if single.certificate_status == ocsp.OCSPCertStatus.UNKNOWN:
        raise InputError(
            f"the responder does not know {who} (status unknown); it may serve another CA"
        )
    return resp


def describe_status(resp: ocsp.OCSPResponse) -> str:
    """``good`` or ``revoked 2026-11-01 10:00:00Z (keyCompromise)`` for a single response."""
    if resp.certificate_status != ocsp.OCSPCertStatus.REVOKED:
        return resp.certificate_status.name.lower()
    when = resp.revocation_time_utc
    reason = resp.revocation_reason
    text = f"revoked {when:%Y-%m-%d %H:%M:%SZ}" if when else "revoked"
    return text + (f" ({reason.value})" if reason else "")


def status_of(der: bytes) -> str:
    """:func:`describe_status` of a stored response (DER)."""
    return describe_status(ocsp.load_der_ocsp_response(der))


def _cert_id_matches(
    single: ocsp.OCSPSingleResponse, cert: x509.Certificate, issuer: x509.Certificate
) -> bool:
    algorithm = next((h for h in _CERT_ID_HASHES if h.name == single.hash_algorithm.name), None)
    if algorithm is None:
        return False
    ours = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm).build()
    return (
        ours.issuer_name_hash == single.issuer_name_hash
        and ours.issuer_key_hash == single.issuer_key_hash
    )


def _names(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    """Whether responderID (by name or by SHA-1 key hash, RFC 6960 §4.2.2.3) names ``cert``."""
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    key_id = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    return resp.responder_key_hash == key_id


def _signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate, at: datetime) -> x509.Certificate:
    if _names(resp, issuer):
        return issuer
    for candidate in resp.certificates:
        if not _names(resp, candidate):
            continue
        if not signed_by(candidate, issuer):
            raise InputError(
                f'the response is signed by "{candidate.subject.rfc4514_string()}", which was '
                f'not issued by "{issuer.subject.rfc4514_string()}"; refused'
            )
        try:
            eku = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise InputError(
                f'the delegated responder "{candidate.subject.rfc4514_string()}" lacks '
                "extKeyUsage OCSPSigning (RFC 6960 §4.2.2.2); refused"
            )
        if not candidate.not_valid_before_utc <= at <= candidate.not_valid_after_utc:
            raise InputError(
                f'the delegated responder certificate "{candidate.subject.rfc4514_string()}" is '
                f"not valid at {at:%Y-%m-%d %H:%M:%SZ}"
            )
        return candidate
    raise InputError(
        f'the response is signed neither by "{issuer.subject.rfc4514_string()}" nor by a '
        "responder certificate it carries; refused"
    )


def _check_signature(resp: ocsp.OCSPResponse, signer: x509.Certificate) -> None:
    try:
        algorithm = resp.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if algorithm is None or algorithm.name not in ALLOWED_HASHES:
        name = algorithm.name if algorithm else resp.signature_algorithm_oid.dotted_string
        raise InputError(f"the response is signed with {name}; SHA-256 or stronger is required")
    if resp.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
        raise InputError("the response is signed with RSASSA-PSS, which is not supported here")
    key = signer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(algorithm))
        else:
            raise InputError(f"the responder's {type(key).__name__} key is not supported")
    except InvalidSignature:
        raise InputError(
            f"the response's signature does not verify with the key of \""
            f'{signer.subject.rfc4514_string()}"; it is forged or corrupted — refused'
        ) from None


# --- the edge ------------------------------------------------------------------------------------


def post(url: str, body: bytes) -> bytes:
    """POST an OCSP request to ``url`` with a timeout and a size cap."""
    return http.fetch(
        url,
        limit=MAX_OCSP_BYTES,
        what="response",
        data=body,
        headers={
            "Content-Type": "application/ocsp-request",
            "Accept": "application/ocsp-response",
        },
    )


def refresh(
    s: Session,
    *,
    at: datetime,
    actor: str,
    responder: str = "",
    force: bool = False,
    post: Poster = post,
) -> list[Outcome]:
    """Fetch, verify and store an OCSP response for every certificate that has a responder.

    ``responder`` (``[trust] ocsp_responder``) replaces each certificate's AIA OCSP URL. It is
    not used for a certificate whose AIA names no OCSP responder: the path validator consults
    OCSP only for certificates that declare it (RFC 5280 §4.2.2.1; pyhanko-certvalidator), so
    such an answer would never count — and in soft-fail mode it would make the trust store
    demand a check that cannot succeed. Certificates without an OCSP URL, whose issuer the hub
    does not hold, or that are not valid at ``at`` are skipped.
    """
    issuers = [
        c.certificate
        for c in store.certificates(s, role=("anchor", "intermediate", "ca"), include_retired=False)
    ]
    fresh = {
        (r.issuer, r.number)
        for r in evidence.ocsp_rows(s)
        if r.next_update is not None and at < r.next_update
    }
    out = []
    for stored in store.certificates(s, role=("agency", "intermediate"), include_retired=False):
        cert = stored.certificate
        urls = responder_urls(cert)
        if urls and responder:
            urls = [responder]
        issuer = _issuer_of(cert, issuers)
        if not urls or issuer is None or not stored.not_before <= at <= stored.not_after:
            continue
        outcome = Outcome(stored.subject, stored.serial, urls[0], "")
        if not force and (stored.issuer, stored.serial) in fresh:
            out.append(
                _with(outcome, "fresh", "the stored response has not reached its nextUpdate")
            )
            continue
        try:
            der = post(urls[0], build_request(cert, issuer))
            resp = verify_response(der, cert, issuer, at=at)
            added = evidence.add_ocsp(
                s, der, issuer=cert.issuer, source=urls[0], at=at, actor=actor
            )
        except InputError as err:
            out.append(_with(outcome, "failed", err.message))
            continue
        out.append(_with(outcome, "stored" if added else "unchanged", describe_status(resp)))
    return out


def _with(outcome: Outcome, status: str, detail: str) -> Outcome:
    return Outcome(outcome.subject, outcome.serial, outcome.url, status, detail)


def _issuer_of(cert: x509.Certificate, issuers: list[x509.Certificate]) -> x509.Certificate | None:
    """The held CA certificate that signed ``cert`` (by name, then by signature)."""
    for issuer in issuers:
        if issuer.subject != cert.issuer or issuer == cert:
            continue
        if signed_by(cert, issuer):
            return issuer
    return None
