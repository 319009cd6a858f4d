"""CMS EnvelopedData (RFC 5652 §6) and AuthEnvelopedData (RFC 5083): decrypt (encrypting is
:mod:`formats.cms_encrypt`).

``cryptography``'s ``pkcs7_decrypt_*`` handles only AES-CBC with RSA PKCS#1 v1.5, so opening is
done here: asn1crypto for the structure, ``cryptography`` primitives for RSA and AES.

Opening plan:

1. parse ContentInfo → EnvelopedData or AuthEnvelopedData (:class:`MalformedCMS`);
2. the content-encryption algorithm is on the allow-list (:class:`WeakAlgorithm`) and the
   ciphertext within the size limit — both before any private-key operation;
3. find the KeyTransRecipientInfo addressed to one of the hub's keys, by issuer and serial or by
   subject key identifier (:class:`NotForUs` if none is);
4. unwrap the content-encryption key. For PKCS#1 v1.5 a failed unwrap is replaced by a random key
   (RFC 3218 §2.3.2) so that a bad padding and a bad ciphertext look the same to a prober;
5. decrypt: AES-CBC with a checked PKCS#7 pad, or AES-GCM with the tag and the authenticated
   attributes as AAD (RFC 5083 §2.1). Any failure is :class:`DecryptionFailed`.

CBC is malleable (EFAIL): nothing decrypted here is trusted until the signature inside verifies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    Cipher,
    CipherContext,
    modes,
)
from cryptography.hazmat.primitives.ciphers.algorithms import AES

from formats import algorithms, der
from formats.der import (
    Tlv,
    children,
    content_info,
    element,
    octets,
    retagged,
    same_name,
    short_reason,
)
from formats.errors import DecryptionFailed, LimitExceeded, MalformedCMS, NotForUs, WeakAlgorithm


class GCMParameters(core.Sequence):  # type: ignore[misc]
    """RFC 5084 §3.2: GCMParameters ::= SEQUENCE { aes-nonce OCTET STRING, aes-ICVlen DEFAULT 12 }"""

    _fields = [  # noqa: RUF012 — asn1crypto's declaration style
        ("aes_nonce", core.OctetString),
        ("aes_icvlen", core.Integer, {"default": 12}),
    ]


@dataclass(frozen=True)
class RecipientKey:
    """One of the hub's decryption keys with its certificate (several overlap during rotation)."""

    cert: x509.Certificate
    key: rsa.RSAPrivateKey
    _asn1: asn1_x509.Certificate = field(init=False, repr=False, compare=False)
    #: Answers of :meth:`matches_der` so far: every message names the hub's certificate the
    #: same way, so the identifier is read once, not once per message.
    _answers: dict[bytes, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        der = self.cert.public_bytes(serialization.Encoding.DER)
        object.__setattr__(self, "_asn1", asn1_x509.Certificate.load(der))
        object.__setattr__(self, "_answers", {})

    def matches(self, rid: cms.RecipientIdentifier) -> bool:
        if rid.name == "issuer_and_serial_number":
            chosen = rid.chosen
            return bool(
                self._asn1.serial_number == chosen["serial_number"].native
                and same_name(self._asn1.issuer, chosen["issuer"])
            )
        return bool(self._asn1.key_identifier == rid.chosen.native)

    def matches_der(self, rid: bytes) -> bool:
        """:meth:`matches` for a RecipientIdentifier's DER."""
        answer = self._answers.get(rid)
        if answer is None:
            answer = self.matches(cms.RecipientIdentifier.load(rid))
            if len(self._answers) < _MAX_ANSWERS and len(rid) <= _MAX_ANSWERED_BYTES:
                self._answers[rid] = answer
        return answer


#: Recipient identifiers remembered per key, and how long one may be (a real one is an
#: issuer's name and a serial number, a few hundred bytes): a sender cannot fill memory.
_MAX_ANSWERS = 256
_MAX_ANSWERED_BYTES = 2048


@dataclass(frozen=True, slots=True)
class Decrypted:
    #: The plaintext: the caller's buffer, decrypted in place and cut to the content.
    content: bytearray
    cipher: str
    key_transport: str
    recipient: x509.Certificate


#: Ciphertext is decrypted through a scratch buffer this large, back into the received buffer.
_SCRATCH = 1 << 20


def decrypt(der: bytearray, keys: Sequence[RecipientKey], *, max_bytes: int) -> Decrypted:
    """Open an EnvelopedData or AuthEnvelopedData addressed to one of ``keys``.

    ``der`` is consumed: the plaintext is written over it (at most one more copy of a message
    is ever held, whatever its size), and ``Decrypted.content`` is that same buffer.
    """
    buf = memoryview(der)
    try:
        ctype, fields = content_info(buf, expect=("enveloped_data", "authenticated_enveloped_data"))
        parts = _Parts.locate(buf, fields, authenticated=ctype == "authenticated_enveloped_data")
        return _decrypt(der, buf, parts, keys, max_bytes)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise MalformedCMS(f"CMS enveloped-data is damaged ({short_reason(exc)})") from None
    finally:
        buf.release()


@dataclass(frozen=True, slots=True)
class _Parts:
    """The fields of an (Auth)EnvelopedData, located in place (:mod:`formats.der`)."""

    authenticated: bool
    recipient_infos: list[Tlv]
    cipher: str
    parameters: Tlv | None
    ciphertext: list[memoryview]
    auth_attrs: bytes | None = None  # DER, re-tagged as SET OF for the AAD (RFC 5083 §2.1)
    mac: bytes | None = None

    @classmethod
    def locate(cls, buf: memoryview, fields: list[Tlv], *, authenticated: bool) -> _Parts:
        rest = [f for f in fields if not f.is_(der.CONTEXT, 0)]  # originatorInfo: not used
        if len(rest) < 3 or not rest[0].is_(der.UNIVERSAL, der.INTEGER):
            raise MalformedCMS("CMS enveloped-data does not have the fields RFC 5652 requires")
        ris, eci = rest[1], rest[2]
        if not ris.is_(der.UNIVERSAL, der.SET) or not eci.is_(der.UNIVERSAL, der.SEQUENCE):
            raise MalformedCMS("CMS enveloped-data does not have the fields RFC 5652 requires")
        eci_fields = list(children(buf, eci))
        if len(eci_fields) != 3 or not eci_fields[2].is_(der.CONTEXT, 0):
            raise MalformedCMS("enveloped-data without encrypted content")
        algorithm = eci_fields[1]
        alg_fields = list(children(buf, algorithm)) if algorithm.constructed else []
        if not 1 <= len(alg_fields) <= 2 or not algorithm.is_(der.UNIVERSAL, der.SEQUENCE):
            raise MalformedCMS("CMS content-encryption algorithm is malformed")
        auth_attrs = mac = None
        if authenticated:
            tail = rest[3:]
            if tail and tail[0].is_(der.CONTEXT, 1):
                auth_attrs = retagged(buf, tail.pop(0), 0x31)
            if not tail or not tail[0].is_(der.UNIVERSAL, der.OCTET_STRING):
                raise DecryptionFailed("AES-GCM tag is missing or shorter than 12 bytes")
            mac = b"".join(octets(buf, tail[0]))
        return cls(
            authenticated=authenticated,
            recipient_infos=list(children(buf, ris)),
            cipher=str(algos.EncryptionAlgorithmId.map(der.oid(buf, alg_fields[0]))),
            parameters=alg_fields[1] if len(alg_fields) == 2 else None,
            ciphertext=octets(buf, eci_fields[2]),
            auth_attrs=auth_attrs,
            mac=mac,
        )


def _decrypt(
    out: bytearray,
    buf: memoryview,
    parts: _Parts,
    keys: Sequence[RecipientKey],
    max_bytes: int,
) -> Decrypted:
    # Step 2.
    cipher_name = parts.cipher
    key_size = algorithms.content_key_size(cipher_name)
    if cipher_name.endswith("_gcm") != parts.authenticated:
        kind = "authenticated_enveloped_data" if parts.authenticated else "enveloped_data"
        raise WeakAlgorithm(f"{cipher_name} in {kind} is not allowed")
    size = sum(len(chunk) for chunk in parts.ciphertext)
    if size > max_bytes:
        raise LimitExceeded(f"encrypted content is {size} bytes, limit is {max_bytes}")

    # Step 3.
    recipient, ktri = _find_recipient(buf, parts.recipient_infos, keys)

    # Step 4.
    transport = element(buf, ktri[2])
    transport_name = _transport_name(transport)
    wrapped = b"".join(octets(buf, ktri[3]))
    cek = _unwrap(recipient.key, transport_name, transport, wrapped, key_size)

    # Step 5.
    if parts.authenticated:
        if parts.parameters is None:
            raise MalformedCMS("AES-GCM parameters are missing")
        params = GCMParameters.load(element(buf, parts.parameters))
        nonce, tag_len = params["aes_nonce"].native, params["aes_icvlen"].native
        tag = parts.mac or b""
        if len(tag) != tag_len or tag_len < 12:
            raise DecryptionFailed("AES-GCM tag is missing or shorter than 12 bytes")
        gcm = Cipher(AES(cek), modes.GCM(nonce, tag, min_tag_length=12)).decryptor()
        if parts.auth_attrs is not None:
            gcm.authenticate_additional_data(parts.auth_attrs)
        decryptor: _Decryptor = gcm
    else:
        iv = _octets(buf, parts.parameters)
        if iv is None or len(iv) != 16:
            raise MalformedCMS("AES-CBC parameters must be a 16-byte IV")
        if not size or size % 16:
            raise DecryptionFailed(_UNREADABLE)
        decryptor = Cipher(AES(cek), modes.CBC(iv)).decryptor()
    length = _decrypt_in_place(decryptor, parts.ciphertext, buf)
    buf.release()
    del out[length:]
    if not parts.authenticated:
        pad = out[-1] if out else 0
        if not 1 <= pad <= 16 or out[-pad:] != bytes([pad]) * pad:
            raise DecryptionFailed(_UNREADABLE)
        del out[-pad:]
    return Decrypted(out, cipher_name, transport_name, recipient.cert)


_Decryptor = CipherContext | AEADDecryptionContext


def _decrypt_in_place(decryptor: _Decryptor, chunks: list[memoryview], buf: memoryview) -> int:
    """Decrypt ``chunks`` (views of ``buf``) and write the plaintext from the start of ``buf``.

    Writing never overtakes reading: what has been written is at most what has been read, and
    every chunk lies at or after the bytes already written.
    """
    # The largest chunk's size (at most _SCRATCH) and the block less one update_into asks
    # for: a whole megabyte, zeroed for every 10 KB message, cost more than its AES.
    scratch = memoryview(bytearray(min(_SCRATCH, max(map(len, chunks), default=0)) + 15))
    written = 0
    try:
        for chunk in chunks:
            for at in range(0, len(chunk), _SCRATCH):
                n = decryptor.update_into(chunk[at : at + _SCRATCH], scratch)
                buf[written : written + n] = scratch[:n]
                written += n
            chunk.release()
        tail = decryptor.finalize()  # CBC: nothing; GCM: checks the tag
    except InvalidTag:
        raise DecryptionFailed(_UNREADABLE) from None
    buf[written : written + len(tail)] = tail
    return written + len(tail)


_UNREADABLE = "the message could not be decrypted; it was damaged or altered in transit"


def _find_recipient(
    buf: memoryview, infos: list[Tlv], keys: Sequence[RecipientKey]
) -> tuple[RecipientKey, list[Tlv]]:
    """The hub's key a KeyTransRecipientInfo is addressed to, and that info's fields
    (version, rid, keyEncryptionAlgorithm, encryptedKey)."""
    addressed: list[str] = []
    for ri in infos:
        if ri.tag_class == der.CONTEXT and ri.number in _OTHER_RECIPIENTS:
            addressed.append(f"a {_OTHER_RECIPIENTS[ri.number]} recipient")
            continue
        if not ri.is_(der.UNIVERSAL, der.SEQUENCE):
            raise MalformedCMS("CMS recipient info is none of RFC 5652's kinds")
        ktri = list(children(buf, ri))
        if len(ktri) != 4 or not (
            ktri[2].is_(der.UNIVERSAL, der.SEQUENCE)
            and ktri[3].is_(der.UNIVERSAL, der.OCTET_STRING)
        ):
            raise MalformedCMS("CMS key-transport recipient info is malformed")
        rid = element(buf, ktri[1])
        for key in keys:
            if key.matches_der(rid):
                return key, ktri
        chosen = cms.RecipientIdentifier.load(rid)
        if chosen.name == "issuer_and_serial_number":
            addressed.append(f"serial {chosen.chosen['serial_number'].native:x}")
        else:
            addressed.append(f"key id {chosen.chosen.native.hex()}")
    raise NotForUs(
        f"the message is not encrypted to the hub's certificate (it is addressed to "
        f"{', '.join(addressed) or 'nobody'}); encrypt to the hub's current certificate"
    )


#: RecipientInfo choices other than key transport, by their context tag (RFC 5652 §6.2).
_OTHER_RECIPIENTS = {1: "kari", 2: "kekri", 3: "pwri", 4: "ori"}


def _read_transport_name(algorithm: bytes) -> str:
    return str(cms.KeyEncryptionAlgorithm.load(algorithm)["algorithm"].native)


#: Longest key-transport AlgorithmIdentifier whose name is kept (RSA-OAEP with SHA-256 is 60).
_CACHED_ALGORITHM = 512
#: A key-transport algorithm's name, read once: every message to the hub names the same.
_transport_name = der.Remembered(_read_transport_name, limit=_CACHED_ALGORITHM, entries=64)


def _octets(buf: memoryview, tlv: Tlv | None) -> bytes | None:
    """The value of a primitive OCTET STRING, or None for anything else."""
    if tlv is None or not tlv.is_(der.UNIVERSAL, der.OCTET_STRING) or tlv.constructed:
        return None
    return bytes(buf[tlv.body : tlv.body_end])


def _unwrap(
    key: rsa.RSAPrivateKey,
    name: str,
    alg: bytes,
    wrapped: bytes,
    key_size: int,
) -> bytes:
    if name == "rsaes_pkcs1v15":
        try:
            cek = key.decrypt(wrapped, padding.PKCS1v15())
        except ValueError:
            cek = b""
        if len(cek) != key_size:
            # RFC 3218 §2.3.2 random filling: continue with a key that will fail later, so a
            # padding error is indistinguishable from a corrupted ciphertext.
            cek = os.urandom(key_size)
        return cek
    if name == "rsaes_oaep":
        params = cms.KeyEncryptionAlgorithm.load(alg)["parameters"]
        oaep_hash = algorithms.digest(params["hash_algorithm"]["algorithm"].native)
        mgf_hash = algorithms.digest(params["mask_gen_algorithm"]["parameters"]["algorithm"].native)
        label = params["p_source_algorithm"]["parameters"].native or None
        try:
            cek = key.decrypt(
                wrapped,
                padding.OAEP(mgf=padding.MGF1(mgf_hash), algorithm=oaep_hash, label=label),
            )
        except ValueError:
            raise DecryptionFailed(_UNREADABLE) from None
        if len(cek) != key_size:
            raise DecryptionFailed(_UNREADABLE)
        return cek
    raise WeakAlgorithm(
        f"key transport {name} is not allowed; use RSA PKCS#1 v1.5 or RSA-OAEP with SHA-256"
    )
