"""CMS SignedData: verify (asn1crypto for structure, ``cryptography`` for the math) and sign.

``cryptography`` signs but has no public verifier, so verification follows RFC 5652 §5.4/§5.6
step by step:

1. the DER parses as ContentInfo → SignedData (anything else: :class:`MalformedCMS`);
2. exactly one SignerInfo (:class:`SignerCountError`);
3. the encapsulated content type is id-data and the content is present exactly once — either
   encapsulated (opaque signing) or given detached (multipart/signed), never both;
4. digest and signature algorithms are on the allow-list (:class:`WeakAlgorithm`), checked
   before any public-key operation;
5. the signer certificate is found by its SignerIdentifier among the certificates the message
   carries or those we already know; its key is large enough (:class:`KeyTooSmall`). Finding it
   here says nothing about trust — that is ``keys.trust``'s job;
6. signed attributes are present; content-type equals the encapsulated type and message-digest
   equals the digest of the content (RFC 5652 §11.1, §11.2);
7. the signature verifies over the DER ``SET OF`` encoding of the signed attributes as they
   arrived (RFC 5652 §5.4: the [0] IMPLICIT tag is replaced by the SET tag).

Any failure in 6–7 is :class:`SignatureInvalid`: the content changed after it was signed.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7

from formats import algorithms, der
from formats.der import children, content_info, element, octets, retagged, same_name, short_reason
from formats.errors import (
    MalformedCMS,
    NotSigned,
    ProfileViolation,
    SignatureInvalid,
    SignerCountError,
    UntrustedSigner,
    WeakAlgorithm,
)

_BARE_LF = re.compile(rb"(?<!\r)\n")


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """What a verified signature tells us. Trust in ``signer`` is still to be established."""

    signer: x509.Certificate
    #: Every certificate the message carried (untrusted path-building candidates).
    carried: tuple[x509.Certificate, ...]
    #: The signed content: the detached content as given (or its CRLF-canonical form), or the
    #: encapsulated content (a view of the SignedData when it is one contiguous span).
    content: bytes | memoryview
    digest_algorithm: str
    signature_algorithm: str
    signing_time: datetime | None


@dataclass(frozen=True, slots=True)
class _Signed:
    """The fields of a SignedData: small ones parsed, the encapsulated content as a view."""

    signer_infos: cms.SignerInfos
    certificates: cms.CertificateSet | None
    econtent_type: str
    embedded: bytes | memoryview | None

    @classmethod
    def locate(cls, buf: memoryview) -> _Signed:
        _, fields = content_info(buf, expect=("signed_data",))
        if len(fields) < 4 or not (
            fields[0].is_(der.UNIVERSAL, der.INTEGER)
            and fields[1].is_(der.UNIVERSAL, der.SET)
            and fields[2].is_(der.UNIVERSAL, der.SEQUENCE)
            and fields[-1].is_(der.UNIVERSAL, der.SET)
        ):
            raise MalformedCMS("CMS signed-data does not have the fields RFC 5652 requires")
        certificates = None
        for f in fields[3:-1]:
            if f.is_(der.CONTEXT, 0) and certificates is None:
                certificates = cms.CertificateSet.load(retagged(buf, f, 0x31))
            elif not f.is_(der.CONTEXT, 1):  # [1] crls: not used
                raise MalformedCMS("CMS signed-data has an unexpected field")
        encap = list(children(buf, fields[2]))
        if not 1 <= len(encap) <= 2 or not encap[0].is_(der.UNIVERSAL, der.OID):
            raise MalformedCMS("CMS signed-data has a malformed encapsulated content")
        embedded: bytes | memoryview | None = None
        if len(encap) == 2:
            wrapper = list(children(buf, encap[1])) if encap[1].is_(der.CONTEXT, 0) else []
            if len(wrapper) != 1 or not wrapper[0].is_(der.UNIVERSAL, der.OCTET_STRING):
                raise MalformedCMS("CMS signed-data has a malformed encapsulated content")
            spans = octets(buf, wrapper[0])
            embedded = spans[0] if len(spans) == 1 else b"".join(spans)
        return cls(
            signer_infos=cms.SignerInfos.load(element(buf, fields[-1])),
            certificates=certificates,
            econtent_type=cms.ContentType.load(element(buf, encap[0])).native,
            embedded=embedded,
        )


def verify_signed_data(
    der: bytes | bytearray | memoryview,
    *,
    detached: bytes | memoryview | None = None,
    known: Sequence[x509.Certificate] = (),
) -> SignatureCheck:
    """Verify a SignedData blob (steps 1–7 above) and return what it proves.

    ``der`` is not copied: an encapsulated content is returned as a view of it.
    """
    try:
        signed = _Signed.locate(memoryview(der).toreadonly())
        return _verify(signed, detached, known)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # asn1crypto parses lazily: structural damage deep inside surfaces here.
        raise MalformedCMS(f"CMS signed-data is damaged ({short_reason(exc)})") from None


def _verify(
    signed: _Signed, detached: bytes | memoryview | None, known: Sequence[x509.Certificate]
) -> SignatureCheck:
    # Step 2.
    signer_infos = signed.signer_infos
    if len(signer_infos) != 1:
        raise SignerCountError(
            f"the message has {len(signer_infos)} signatures; exactly one signer is required"
        )
    signer_info: cms.SignerInfo = signer_infos[0]

    # Step 3.
    econtent_type = signed.econtent_type
    if econtent_type != "data":
        raise ProfileViolation(f"signed content type is {econtent_type}; expected id-data")
    embedded = signed.embedded
    if embedded is not None and detached is not None:
        raise ProfileViolation("signature carries its content and is also detached; send one")
    content = embedded if embedded is not None else detached
    if content is None:
        raise NotSigned("detached signature without the content it signs")

    # Step 4.
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    hash_algo = algorithms.digest(digest_name)
    sig_algo = signer_info["signature_algorithm"]
    sig_name = sig_algo["algorithm"].native
    kind = algorithms.signature_kind(sig_name)

    # Step 5.
    carried_asn1 = [c.chosen for c in signed.certificates or () if c.name == "certificate"]
    signer_asn1 = _find_signer(signer_info["sid"], carried_asn1, known)
    signer = x509.load_der_x509_certificate(signer_asn1.dump())
    public_key = _public_key(signer, signer_asn1)
    algorithms.check_public_key(public_key)
    carried = tuple(x509.load_der_x509_certificate(c.dump()) for c in carried_asn1)

    # Step 6.
    signed_attrs = signer_info["signed_attrs"]
    if not signed_attrs:
        raise ProfileViolation("signature has no signed attributes (RFC 8551 §2.5 requires them)")
    attrs = _attributes(signed_attrs)
    if attrs.get("content_type") != [econtent_type]:
        raise SignatureInvalid("signed content-type attribute does not match the content")
    digests = attrs.get("message_digest") or []
    if len(digests) != 1:
        raise SignatureInvalid("signature must carry exactly one message-digest attribute")
    if not _digest_matches(content, digests[0], hash_algo):
        if detached is not None and _BARE_LF.search(content):
            # RFC 8551 §3.1.1: the signed form is canonical CRLF; a relay may have turned it
            # into bare LFs. Check the canonical form — the signature still covers every byte.
            canonical = _BARE_LF.sub(b"\r\n", content)
            if _digest_matches(canonical, digests[0], hash_algo):
                content = canonical
            else:
                raise SignatureInvalid(_CHANGED)
        else:
            raise SignatureInvalid(_CHANGED)

    # Step 7.
    attrs_der = b"\x31" + signed_attrs.dump()[1:]
    _check_signature(
        public_key, kind, signer_info["signature"].native, attrs_der, hash_algo, sig_algo
    )
    signing_time = attrs.get("signing_time")
    return SignatureCheck(
        signer=signer,
        carried=carried,
        content=content,
        digest_algorithm=digest_name,
        signature_algorithm=sig_name,
        signing_time=signing_time[0] if signing_time else None,
    )


_CHANGED = "message digest does not match: the content was changed after it was signed"


def _digest_matches(
    content: bytes | memoryview, expected: bytes, algo: hashes.HashAlgorithm
) -> bool:
    h = hashes.Hash(algo)
    h.update(content)
    return hmac.compare_digest(h.finalize(), expected)


#: The signed attributes we read; the rest (SMIMECapabilities …) are covered by the signature
#: but not decoded.
_READ_ATTRS = frozenset({"content_type", "message_digest", "signing_time"})


def _attributes(signed_attrs: cms.CMSAttributes) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    seen: set[str] = set()
    for attr in signed_attrs:
        oid = attr["type"].dotted
        if oid in seen:
            # RFC 5652 §5.3: each attribute type appears at most once.
            raise SignatureInvalid(f"signed attribute {attr['type'].native} appears more than once")
        seen.add(oid)
        name = attr["type"].native
        if name in _READ_ATTRS:
            out[name] = list(attr["values"].native)
    return out


def _find_signer(
    sid: cms.SignerIdentifier,
    carried: list[asn1_x509.Certificate],
    known: Sequence[x509.Certificate],
) -> asn1_x509.Certificate:
    candidates = carried + [
        asn1_x509.Certificate.load(k.public_bytes(serialization.Encoding.DER)) for k in known
    ]
    if sid.name == "issuer_and_serial_number":
        issuer, serial = sid.chosen["issuer"], sid.chosen["serial_number"].native
        for cert in candidates:
            if cert.serial_number == serial and same_name(cert.issuer, issuer):
                return cert
        wanted = f"issuer {issuer.human_friendly}, serial {serial:x}"
    else:
        ski = sid.chosen.native
        for cert in candidates:
            if cert.key_identifier == ski:
                return cert
        wanted = f"subject key identifier {ski.hex()}"
    raise UntrustedSigner(
        f"the signer's certificate ({wanted}) is neither in the message nor known to the hub; "
        "include the certificate when signing"
    )


def _public_key(cert: x509.Certificate, asn1: asn1_x509.Certificate) -> PublicKeyTypes:
    """The certificate's key; one of an algorithm ``cryptography`` does not implement (which
    it reports as UnsupportedAlgorithm, not a ValueError) is off the allow-list too."""
    try:
        return cert.public_key()
    except UnsupportedAlgorithm:
        oid = asn1.public_key["algorithm"]["algorithm"].dotted
        raise WeakAlgorithm(
            f"signer key algorithm {oid} is not allowed; use RSA (at least 2048 bits) or "
            "ECDSA P-256"
        ) from None


def _pss_salt_length(
    params: Any, public_key: rsa.RSAPublicKey, pss_hash: hashes.HashAlgorithm
) -> int:
    """The declared salt length, if a signature by ``public_key`` can have it at all.

    RFC 8017 §9.1.2 step 3: with emLen = ⌈(modBits − 1)/8⌉, a salt longer than
    emLen − hLen − 2 is "inconsistent" — and a sender's 2³¹ overflowed ``cryptography``.
    """
    salt = params["salt_length"].native
    most = (public_key.key_size + 6) // 8 - pss_hash.digest_size - 2
    if not 0 <= salt <= most:
        raise SignatureInvalid(
            f"RSA-PSS salt length {salt} is impossible for an RSA-{public_key.key_size} key "
            f"and a {pss_hash.digest_size}-byte hash (RFC 8017 §9.1.2: 0 to {most}); the "
            "signature was altered or made wrongly"
        )
    return int(salt)


def _check_signature(
    public_key: object,
    kind: str,
    signature: bytes,
    data: bytes,
    hash_algo: hashes.HashAlgorithm,
    sig_algo: Any,
) -> None:
    try:
        if kind == "rsa" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hash_algo)
        elif kind == "pss" and isinstance(public_key, rsa.RSAPublicKey):
            params = sig_algo["parameters"]
            pss_hash = algorithms.digest(params["hash_algorithm"]["algorithm"].native)
            mgf = params["mask_gen_algorithm"]
            if mgf["algorithm"].native != "mgf1":
                raise SignatureInvalid("RSA-PSS with a mask generation function other than MGF1")
            mgf_hash = algorithms.digest(mgf["parameters"]["algorithm"].native)
            public_key.verify(
                signature,
                data,
                padding.PSS(
                    mgf=padding.MGF1(mgf_hash),
                    salt_length=_pss_salt_length(params, public_key, pss_hash),
                ),
                pss_hash,
            )
        elif kind == "ecdsa" and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hash_algo))
        else:
            raise SignatureInvalid(
                f"signature algorithm {kind} does not fit the signer's {type(public_key).__name__}"
            )
    except InvalidSignature:
        raise SignatureInvalid(
            "signature does not verify: the signed attributes were altered or the wrong key signed"
        ) from None


# --- signing -------------------------------------------------------------------------------------


def sign(
    content: bytes,
    *,
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    detached: bool = True,
    pss: bool = False,
) -> bytes:
    """A DER SignedData over ``content`` with the usual S/MIME signed attributes.

    ``content`` must already be the canonical CRLF MIME entity: it is signed byte for byte
    (``Binary``), which is exactly what a verifier canonicalising to CRLF will digest.
    """
    if _BARE_LF.search(content):
        raise ValueError("sign() takes a canonical CRLF MIME entity; convert LF line ends first")
    rsa_padding: padding.PSS | padding.PKCS1v15 | None = None
    if pss:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("RSA-PSS needs an RSA key")
        rsa_padding = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    options = [pkcs7.PKCS7Options.Binary]
    if detached:
        options.append(pkcs7.PKCS7Options.DetachedSignature)
    builder = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(content)
        .add_signer(cert, key, hashes.SHA256(), rsa_padding=rsa_padding)
    )
    return builder.sign(serialization.Encoding.DER, options)
