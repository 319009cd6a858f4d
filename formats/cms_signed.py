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
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asn1crypto import algos, cms
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
    GatewayError,
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
    #: The signer's SMIMECapabilities (RFC 8551 §2.5.2), in its order of preference: asn1crypto
    #: names of the algorithms it knows (``aes256_gcm`` …), dotted OIDs for the others; empty
    #: when it advertised nothing.
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Signed:
    """The fields of a SignedData, located in place (:mod:`formats.der`): asn1crypto only ever
    sees small pieces, and those that repeat from message to message (algorithm identifiers,
    certificates) are read once (bench/e2e_bench.py: parsing the whole structure with
    asn1crypto cost three times the signature check)."""

    buf: memoryview
    signer_infos: list[der.Tlv]
    certificates: list[der.Tlv]
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
        certificates: list[der.Tlv] | None = None
        for f in fields[3:-1]:
            if f.is_(der.CONTEXT, 0) and f.constructed and certificates is None:
                # CertificateChoices: the other choices (attribute certificates …) are not used.
                certificates = [c for c in children(buf, f) if c.is_(der.UNIVERSAL, der.SEQUENCE)]
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
            buf=buf,
            signer_infos=list(children(buf, fields[-1])),
            certificates=certificates or [],
            econtent_type=cms.ContentType.map(der.oid(buf, encap[0])),
            embedded=embedded,
        )


@dataclass(frozen=True, slots=True)
class _SignerInfo:
    """A SignerInfo (RFC 5652 §5.3), located: the signer's identifier, the algorithms (as
    DER), the signed attributes (located) and the signature value."""

    sid: der.Tlv
    digest_algorithm: bytes
    signed_attrs: der.Tlv | None
    signature_algorithm: bytes
    signature: bytes

    @classmethod
    def read(cls, buf: memoryview, tlv: der.Tlv) -> _SignerInfo:
        fields = list(children(buf, tlv)) if tlv.is_(der.UNIVERSAL, der.SEQUENCE) else []
        # version, sid, digestAlgorithm, [0] signedAttrs?, signatureAlgorithm, signature, [1]?
        rest = fields[3:]
        signed_attrs = rest.pop(0) if rest and rest[0].is_(der.CONTEXT, 0) else None
        if rest and rest[-1].is_(der.CONTEXT, 1):
            rest.pop()  # unsigned attributes: not used
        if not (
            len(fields) >= 5
            and len(rest) == 2
            and fields[0].is_(der.UNIVERSAL, der.INTEGER)
            and fields[2].is_(der.UNIVERSAL, der.SEQUENCE)
            and rest[0].is_(der.UNIVERSAL, der.SEQUENCE)
            and rest[1].is_(der.UNIVERSAL, der.OCTET_STRING)
            and (signed_attrs is None or signed_attrs.constructed)
        ):
            raise MalformedCMS("CMS signer info does not have the fields RFC 5652 requires")
        return cls(
            sid=fields[1],
            digest_algorithm=element(buf, fields[2]),
            signed_attrs=signed_attrs,
            signature_algorithm=element(buf, rest[0]),
            signature=b"".join(octets(buf, rest[1])),
        )


#: Pieces of a message kept from one message to the next (algorithm identifiers, certificates)
#: are kept only up to these sizes: a sender could otherwise fill the caches with megabytes.
_CACHED_ALGORITHM = 512
_CACHED_CERTIFICATE = 16 * 1024


def _read_digest_name(algorithm: bytes) -> str:
    return str(algos.DigestAlgorithm.load(algorithm)["algorithm"].native)


def _read_signature_name(algorithm: bytes) -> str:
    return str(algos.SignedDigestAlgorithm.load(algorithm)["algorithm"].native)


_digest_name = der.Remembered(_read_digest_name, limit=_CACHED_ALGORITHM, entries=64)
_signature_name = der.Remembered(_read_signature_name, limit=_CACHED_ALGORITHM, entries=64)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A certificate that may be the signer's, with what a SignerIdentifier names it by."""

    cert: x509.Certificate
    issuer: bytes  # the issuer Name's DER, as the certificate encodes it
    serial: int


def _read_candidate(data: bytes) -> _Candidate:
    """A certificate the message carries (or the hub knows)."""
    try:
        cert = x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise MalformedCMS(
            f"a certificate in the message does not parse ({short_reason(exc)})"
        ) from None
    buf = memoryview(data)
    tbs = next(children(buf, der.read_tlv(buf, 0, len(buf))), None)
    fields = [f for f in children(buf, tbs) if not f.is_(der.CONTEXT, 0)] if tbs else []
    if len(fields) < 3 or not fields[2].is_(der.UNIVERSAL, der.SEQUENCE):
        raise MalformedCMS("a certificate in the message does not have an issuer")
    return _Candidate(cert, element(buf, fields[2]), cert.serial_number)


#: Read once for all the messages that carry it (an agency's certificate, mostly).
_candidate = der.Remembered(_read_candidate, limit=_CACHED_CERTIFICATE, entries=256)


def _key_identifier(candidate: _Candidate) -> bytes | None:
    """The certificate's subjectKeyIdentifier, if it has one it can be read by."""
    try:
        extension = candidate.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except (
        x509.ExtensionNotFound,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        ValueError,
    ):
        return None
    return extension.value.digest


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
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        # asn1crypto parses lazily: structural damage deep inside surfaces here (a name nested
        # thousands deep, too, when it is compared or shown).
        raise MalformedCMS(f"CMS signed-data is damaged ({short_reason(exc)})") from None


def _verify(
    signed: _Signed, detached: bytes | memoryview | None, known: Sequence[x509.Certificate]
) -> SignatureCheck:
    buf = signed.buf
    # Step 2.
    if len(signed.signer_infos) != 1:
        raise SignerCountError(
            f"the message has {len(signed.signer_infos)} signatures; exactly one signer is required"
        )
    signer_info = _SignerInfo.read(buf, signed.signer_infos[0])

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
    digest_name = _digest_name(signer_info.digest_algorithm)
    hash_algo = algorithms.digest(digest_name)
    sig_name = _signature_name(signer_info.signature_algorithm)
    kind = algorithms.signature_kind(sig_name)

    # Step 5.
    carried = [_candidate(element(buf, c)) for c in signed.certificates]
    signer = _find_signer(buf, signer_info.sid, carried, known)
    public_key = _public_key(signer)
    algorithms.check_public_key(public_key)

    # Step 6.
    signed_attrs = signer_info.signed_attrs
    if signed_attrs is None or signed_attrs.body == signed_attrs.body_end:
        raise ProfileViolation("signature has no signed attributes (RFC 8551 §2.5 requires them)")
    attrs = _attributes(buf, signed_attrs)
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
    _check_signature(
        public_key,
        kind,
        signer_info.signature,
        retagged(buf, signed_attrs, 0x31),
        hash_algo,
        signer_info.signature_algorithm,
    )
    signing_time = attrs.get("signing_time")
    return SignatureCheck(
        signer=signer,
        carried=tuple(c.cert for c in carried),
        content=content,
        digest_algorithm=digest_name,
        signature_algorithm=sig_name,
        signing_time=signing_time[0] if signing_time else None,
        capabilities=_capabilities(buf, kept[0])
        if (kept := attrs.get("smime_capabilities"))
        else (),
    )


_CHANGED = "message digest does not match: the content was changed after it was signed"


def _digest_matches(
    content: bytes | memoryview, expected: bytes, algo: hashes.HashAlgorithm
) -> bool:
    h = hashes.Hash(algo)
    h.update(content)
    return hmac.compare_digest(h.finalize(), expected)


def _attributes(buf: memoryview, signed_attrs: der.Tlv) -> dict[str, list[Any]]:
    """The signed attributes we read (:data:`_READ_ATTRS`), by name; the rest (SMIMECapabilities
    …) are covered by the signature but not decoded."""
    out: dict[str, list[Any]] = {}
    seen: set[str] = set()
    for attr in children(buf, signed_attrs):
        parts = list(children(buf, attr)) if attr.is_(der.UNIVERSAL, der.SEQUENCE) else []
        if len(parts) != 2 or not parts[1].is_(der.UNIVERSAL, der.SET):
            raise MalformedCMS("a signed attribute is not a type and a set of values")
        oid = der.oid(buf, parts[0])
        name = cms.CMSAttributeType.map(oid)
        if oid in seen:
            # RFC 5652 §5.3: each attribute type appears at most once.
            raise SignatureInvalid(f"signed attribute {name} appears more than once")
        seen.add(oid)
        read = _READ_ATTRS.get(name)
        if read is not None:
            out[name] = [read(buf, value) for value in children(buf, parts[1])]
        elif name in _KEPT_ATTRS:  # read later, if at all: its SET of values as it is
            out[name] = [parts[1]]
    return out


def _content_type(buf: memoryview, value: der.Tlv) -> str:
    return str(cms.ContentType.map(der.oid(buf, value)))


def _message_digest(buf: memoryview, value: der.Tlv) -> bytes:
    if not value.is_(der.UNIVERSAL, der.OCTET_STRING):
        raise MalformedCMS("the message-digest attribute is not an OCTET STRING")
    return b"".join(octets(buf, value))


def _signing_time(buf: memoryview, value: der.Tlv) -> datetime:
    moment = cms.Time.load(element(buf, value)).native
    if not isinstance(moment, datetime):  # asn1crypto's year-0 stand-in
        raise MalformedCMS("the signing-time attribute is not a time")
    return moment


#: Capabilities kept of a signer's list: the first are its most preferred; real lists are short.
MAX_CAPABILITIES = 16


def _capabilities(buf: memoryview, values: der.Tlv) -> tuple[str, ...]:
    """The signer's SMIMECapabilities, from the attribute's SET of values (one value:
    SEQUENCE OF SEQUENCE { capabilityID OID, parameters ANY OPTIONAL }), read only once the
    signature has been checked. Only a hint for what to encrypt to the signer with, which
    OpenSSL does not even read: one that cannot be read counts as none advertised, never
    against the message; and only what is used is read (the first value, the first
    :data:`MAX_CAPABILITIES` capabilities, each one's identifier, not its parameters), so a
    huge list costs no more than a short one."""
    names: list[str] = []
    try:
        value = next(children(buf, values), None)
        if value is None or not value.is_(der.UNIVERSAL, der.SEQUENCE):
            return ()
        for capability in children(buf, value):
            if not capability.is_(der.UNIVERSAL, der.SEQUENCE):
                return ()
            first = next(children(buf, capability), None)
            if first is None or not first.is_(der.UNIVERSAL, der.OID):
                return ()
            names.append(str(algos.EncryptionAlgorithmId.map(der.oid(buf, first))))
            if len(names) == MAX_CAPABILITIES:
                break
    except (GatewayError, ValueError):  # malformed, or beyond a parsing limit
        return ()
    return tuple(names)


#: Signed attributes kept undecoded by :func:`_attributes` (their SET of values), to be read
#: once the signature has been checked.
_KEPT_ATTRS = frozenset({"smime_capabilities"})

#: The signed attributes we read, and how.
_READ_ATTRS: dict[str, Callable[[memoryview, der.Tlv], Any]] = {
    "content_type": _content_type,
    "message_digest": _message_digest,
    "signing_time": _signing_time,
}


def _find_signer(
    buf: memoryview,
    sid: der.Tlv,
    carried: list[_Candidate],
    known: Sequence[x509.Certificate],
) -> x509.Certificate:
    # The certificates the hub knows are looked at only when none the message carries is the
    # signer's: there is one per agency (old ones too), and each costs a DER encoding.
    candidates = itertools.chain(
        carried, (_candidate(k.public_bytes(serialization.Encoding.DER)) for k in known)
    )
    if sid.is_(der.UNIVERSAL, der.SEQUENCE):  # IssuerAndSerialNumber
        parts = list(children(buf, sid))
        if len(parts) != 2 or not (
            parts[0].is_(der.UNIVERSAL, der.SEQUENCE) and parts[1].is_(der.UNIVERSAL, der.INTEGER)
        ):
            raise MalformedCMS("the signer identifier is not an issuer and serial number")
        issuer = element(buf, parts[0])
        serial = int.from_bytes(buf[parts[1].body : parts[1].body_end], "big", signed=True)
        for c in candidates:
            if c.serial == serial and (c.issuer == issuer or _same_issuer(c.issuer, issuer)):
                return c.cert
        name = asn1_x509.Name.load(issuer).human_friendly
        wanted = f"issuer {name}, serial {serial:x}"
    elif sid.is_(der.CONTEXT, 0):  # [0] SubjectKeyIdentifier
        ski = b"".join(octets(buf, sid))
        for c in candidates:
            if _key_identifier(c) == ski:
                return c.cert
        wanted = f"subject key identifier {ski.hex()}"
    else:
        raise MalformedCMS("the signer identifier is neither an issuer and serial nor a key id")
    raise UntrustedSigner(
        f"the signer's certificate ({wanted}) is neither in the message nor known to the hub; "
        "include the certificate when signing"
    )


def _same_issuer(a: bytes, b: bytes) -> bool:
    """RFC 5280 §7.1 name equality of two Names encoded differently."""
    return same_name(asn1_x509.Name.load(a), asn1_x509.Name.load(b))


def _public_key(cert: x509.Certificate) -> PublicKeyTypes:
    """The certificate's key; one of an algorithm ``cryptography`` does not implement (which
    it reports as UnsupportedAlgorithm, not a ValueError) is off the allow-list too."""
    try:
        return cert.public_key()
    except UnsupportedAlgorithm:
        oid = cert.public_key_algorithm_oid.dotted_string
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
    sig_algo: bytes,
) -> None:
    try:
        if kind == "rsa" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hash_algo)
        elif kind == "pss" and isinstance(public_key, rsa.RSAPublicKey):
            params = algos.SignedDigestAlgorithm.load(sig_algo)["parameters"]
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
    chain: Sequence[x509.Certificate] = (),
) -> bytes:
    """A DER SignedData over ``content`` with the usual S/MIME signed attributes.

    ``content`` must already be the canonical CRLF MIME entity: it is signed byte for byte
    (``Binary``), which is exactly what a verifier canonicalising to CRLF will digest.
    ``chain`` (the CA certificates that issued ``cert``, as a PKCS#12 file carries them) goes
    into the certificates set beside the signer's, so that a verifier holding only the root
    can build the path (RFC 8550 §3: "Sending agents SHOULD include any certificates for the
    user's public key(s) and associated issuer certificates").
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
    for extra in chain:
        if extra != cert:
            builder = builder.add_certificate(extra)
    return builder.sign(serialization.Encoding.DER, options)
