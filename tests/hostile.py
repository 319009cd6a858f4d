"""Named hostile submissions: each stands for one attack and expects its own typed error.

:data:`SAMPLES` is the table ``tests/test_hostile.py`` runs through the pipeline. A sample is
either a static file under ``tests/assets/`` (attacks that need no PKI: broken headers, MIME
bombs, garbage DER) or a *builder* that crafts the message at test time from the demo world's
PKI, because signatures must be made with keys generated per test session — no private key is
ever committed. ``tests/assets/README.md`` lists every sample with its one-line note.

Builders start from the real building blocks (:func:`formats.smime.payload_entity`,
:func:`~formats.smime.sign_entity`, :func:`formats.cms_encrypt.encrypt`,
:func:`~formats.smime.wrap_enveloped`) and change exactly one thing; where our own code cannot
make the hostile variant (3DES, SHA-1, OAEP with SHA-1) the real ``openssl cms`` makes it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from formats import cms_encrypt, cms_signed
from formats.errors import (
    AgencyMismatch,
    CertificateExpired,
    CertificateNotYetValid,
    DecryptionFailed,
    GatewayError,
    HeaderCountError,
    KeyTooSmall,
    LimitExceeded,
    MalformedCMS,
    MalformedMessage,
    NotEncrypted,
    NotForUs,
    NotSigned,
    ProfileViolation,
    SchemaInvalid,
    SenderMismatch,
    SignatureInvalid,
    SignerCountError,
    SignerRevoked,
    UnknownAgency,
    UnsignedContent,
    UntrustedSigner,
    WeakAlgorithm,
    WrongKeyUsage,
    XmlForbidden,
)
from formats.limits import Limits, MiB
from formats.payload import Organ, Signer, build_payload
from formats.smime import build_message, payload_entity, sign_entity, wrap_enveloped
from gateway.demo import HUB_ADDRESS, WORK_PERMITS, DemoWorld, tamper
from keys.issuing import (
    Issued,
    KeyKind,
    PrivateKey,
    generate_key,
    issue_agency,
    make_intermediate,
    make_root,
)

ASSETS = Path(__file__).parent / "assets"

SNV = "H26.SNV"
SNV_EMAIL = "vanthu@snv.hanoi.gov.vn"
SNV_NAME_VI = "Sở Nội vụ thành phố Hà Nội"

Builder = Callable[[DemoWorld], bytes]


@dataclass(frozen=True)
class Sample:
    """One hostile submission and the typed error the gateway must answer it with."""

    name: str
    #: The attack, in one line (copied into tests/assets/README.md).
    note: str
    #: ``type(verdict.errors[0])`` must be exactly this class (or a subclass if not ``exact``).
    error: type[GatewayError]
    #: A builder (world → raw message) or a file name under ``tests/assets/``.
    source: Builder | str
    exact: bool = True
    #: A regular expression the first error's message must match (pins down *which* check).
    match: str | None = None
    #: Asset files a builder reads (so the README/asset cross-check knows they are used).
    uses: tuple[str, ...] = ()
    #: Limits to run the pipeline with instead of the world context's.
    limits: Limits | None = None
    #: Needs this external program; the test is skipped where it is missing.
    needs: str | None = None
    #: A known gateway bug: the test is ``xfail(strict=True)`` with this reason until fixed.
    known_bug: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", self.name):
            raise ValueError(f"sample name {self.name!r} must be kebab-case")
        if isinstance(self.source, str) and self.uses:
            raise ValueError(f"{self.name}: a static sample names its file in `source` only")

    @property
    def assets(self) -> tuple[str, ...]:
        """Files under tests/assets this sample is made from."""
        return (self.source,) if isinstance(self.source, str) else self.uses

    def raw(self, world: DemoWorld) -> bytes:
        if isinstance(self.source, str):
            return (ASSETS / self.source).read_bytes()
        return self.source(world)


# --- building blocks ------------------------------------------------------------------------


@functools.cache
def _key(name: str, kind: KeyKind = "rsa2048") -> PrivateKey:
    """One throw-away key per name for the session (RSA-2048: accepted, and quick to make)."""
    return generate_key(kind)


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def _message_id() -> str:
    return f"<{uuid.uuid4()}@snv.hanoi.gov.vn>"


def _payload_xml(
    world: DemoWorld, *, payload_from: str = SNV, category: str | None = None
) -> bytes:
    """The demo's monthly work-permit payload from Home Affairs to the police."""
    police = world.directory.get("H26.CATP")
    assert police is not None
    xml = build_payload(
        "work-permit",
        sender=Organ(payload_from, SNV_NAME_VI, SNV_EMAIL),
        recipients=[Organ(police.organ_id, police.name_vi, sorted(police.emails)[0])],
        records=WORK_PERMITS,
        document_number="7/SNV-VLATLĐ",
        issued_on=world.at.date(),
        message_id=uuid.uuid4(),
        period="2026-10",
        subject="Giấy phép lao động kỳ 16/9–15/10/2026",
        signer=Signer("Trần Văn Minh", "Phó Giám đốc"),
    ).to_xml()
    if category is not None:
        xml = xml.replace(
            b"<Category>work-permit</Category>", f"<Category>{category}</Category>".encode()
        )
    return xml


def _snv(world: DemoWorld) -> Issued:
    return world.agencies[SNV]


def _submit(
    world: DemoWorld,
    xml: bytes,
    *,
    signer: Issued | None = None,
    from_addr: str = SNV_EMAIL,
    recipients: Sequence[x509.Certificate] | None = None,
    cipher: str = "aes256_cbc",
    oaep: bool = False,
) -> bytes:
    """Sign (as Home Affairs unless told) and encrypt ``xml`` the way an honest client does."""
    issued = signer or _snv(world)
    return build_message(
        xml,
        signer_cert=issued.cert,
        signer_key=issued.key,
        recipients=recipients or [world.hub.cert],
        from_addr=from_addr,
        to_addrs=[HUB_ADDRESS],
        message_id=_message_id(),
        date=world.at,
        cipher=cipher,
        oaep=oaep,
    )


def _envelope(world: DemoWorld, der: bytes, *, smime_type: str = "enveloped-data") -> bytes:
    """RFC 5322 headers around an (already built) enveloped CMS blob."""
    return wrap_enveloped(
        der,
        smime_type=smime_type,
        from_addr=SNV_EMAIL,
        to_addrs=[HUB_ADDRESS],
        message_id=_message_id(),
        date=world.at,
        subject="Official data exchange",
    )


def _encrypt_inner(world: DemoWorld, inner: bytes) -> bytes:
    """Encrypt an arbitrary inner MIME entity to the hub and wrap it as a message."""
    return _envelope(world, cms_encrypt.encrypt(inner, [world.hub.cert]))


def _top_level(world: DemoWorld, entity: bytes, *, from_addr: str = SNV_EMAIL) -> bytes:
    """Message headers followed by ``entity`` (whose own header lines continue the block)."""
    head = (
        f"From: {from_addr}\r\nTo: {HUB_ADDRESS}\r\nSubject: Official data exchange\r\n"
        f"Date: {format_datetime(world.at)}\r\nMessage-ID: {_message_id()}\r\n"
        "MIME-Version: 1.0\r\n"
    )
    return head.encode() + entity


def _cms_sign(
    entity: bytes,
    signers: Sequence[Issued],
    *,
    certs: Sequence[x509.Certificate] = (),
    options: Sequence[pkcs7.PKCS7Options] = (),
) -> bytes:
    """A detached DER SignedData by every one of ``signers``, carrying ``certs`` too."""
    builder = pkcs7.PKCS7SignatureBuilder().set_data(entity)
    for signer in signers:
        builder = builder.add_signer(signer.cert, signer.key, hashes.SHA256())
    for cert in certs:
        builder = builder.add_certificate(cert)
    return builder.sign(
        serialization.Encoding.DER,
        [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.DetachedSignature, *options],
    )


def _multipart_signed(
    entity: bytes, signature_der: bytes, *, micalg: str = "sha-256", extra_part: bytes = b""
) -> bytes:
    """A multipart/signed around ``entity``; ``extra_part`` is smuggled in as a third part."""
    b = b"=_hostile_" + os.urandom(6).hex().encode()
    third = b"--" + b + b"\r\n" + extra_part + b"\r\n" if extra_part else b""
    return (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b"micalg=" + micalg.encode() + b'; boundary="' + b + b'"\r\n\r\n'
        b"--" + b + b"\r\n" + entity + b"\r\n"
        b"--" + b + b"\r\n"
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + _b64(signature_der)
        + b"\r\n"
        + third
        + b"--"
        + b
        + b"--\r\n"
    )


def _mixed(*parts: bytes) -> bytes:
    b = b"=_mixed_" + os.urandom(6).hex().encode()
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts)
    return (
        b'Content-Type: multipart/mixed; boundary="'
        + b
        + b'"\r\n\r\n'
        + body
        + b"--"
        + b
        + b"--\r\n"
    )


_COVER_LETTER = (
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Dear colleagues, please also wire the processing fee to account 0123456789.\r\n"
)


def _signed_payload(world: DemoWorld, *, detached: bool = True) -> bytes:
    """The genuine signed entity (multipart/signed or opaque) of Home Affairs' payload."""
    snv = _snv(world)
    return sign_entity(
        payload_entity(_payload_xml(world)), cert=snv.cert, key=snv.key, detached=detached
    )


def _agency_cert(
    world: DemoWorld,
    key_name: str,
    *,
    ca: Issued | None = None,
    key_kind: KeyKind = "rsa2048",
    email: str = SNV_EMAIL,
    organ_id: str = SNV,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
) -> Issued:
    """A certificate for Home Affairs' mailbox, issued by ``ca`` (the world's root by default)."""
    return issue_agency(
        ca or world.root,
        email=email,
        organ_id=organ_id,
        common_name="Hanoi Department of Home Affairs",
        at=world.at - timedelta(days=10),
        not_before=not_before,
        not_after=not_after,
        eku=eku,
        key=_key(key_name, key_kind),
    )


def _self_signed(world: DemoWorld) -> Issued:
    """An end-entity certificate for Home Affairs' mailbox, signed by its own key."""
    key = _key("self-signed")
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Hanoi Department of Home Affairs"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SNV_NAME_VI),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, SNV),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(world.at - timedelta(days=10))
        .not_valid_after(world.at + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(SNV_EMAIL)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _openssl(*args: str, stdin: bytes) -> bytes:
    """Run the real ``openssl`` (the interop peer of DESIGN §3) and return its output."""
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("openssl is not installed")
    done = subprocess.run([exe, *args], input=stdin, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- builders: encryption layer -----------------------------------------------------------


def efail_cbc_gadget(world: DemoWorld) -> bytes:
    """EFAIL (CVE-2017-17689): known first plaintext block → chosen block, spliced in.

    The first 16 bytes of the signed entity are known (``Content-Type: mu``), so the pair
    ``(IV ⊕ P0 ⊕ X, C0)`` decrypts to the attacker's ``X``. The gadget is inserted in the
    middle of the ciphertext, where the payload lies; the padding stays valid.
    """
    der = cms_encrypt.encrypt(_signed_payload(world), [world.hub.cert])
    info = cms.ContentInfo.load(der)
    eci = info["content"]["encrypted_content_info"]
    iv = eci["content_encryption_algorithm"]["parameters"].native
    ciphertext = eci["encrypted_content"].native
    known = b"Content-Type: mu"
    chosen = b'<img src="http:/'
    forged = bytes(a ^ b ^ c for a, b, c in zip(iv, known, chosen, strict=True))
    cut = (len(ciphertext) // 32) * 16  # a block boundary in the middle
    eci["encrypted_content"] = ciphertext[:cut] + forged + ciphertext[:16] + ciphertext[cut:]
    return _envelope(world, info.dump(force=True))


def flipped_ciphertext(world: DemoWorld) -> bytes:
    return tamper(world.submission(SNV))


def gcm_tag_altered(world: DemoWorld) -> bytes:
    raw = _submit(world, _payload_xml(world), cipher="aes256_gcm")
    der = _der_of(raw)
    info = cms.ContentInfo.load(der)
    mac = info["content"]["mac"].native
    info["content"]["mac"] = bytes([mac[0] ^ 0x01]) + mac[1:]
    return _envelope(world, info.dump(force=True), smime_type="authEnveloped-data")


def _der_of(raw: bytes) -> bytes:
    body = raw[raw.index(b"\r\n\r\n") + 4 :]
    return base64.b64decode(body.replace(b"\r\n", b""))


def truncated_cms(world: DemoWorld) -> bytes:
    der = _der_of(world.submission(SNV))
    return _envelope(world, der[: len(der) // 2])


def not_for_us(world: DemoWorld) -> bytes:
    return _submit(world, _payload_xml(world), recipients=[world.agencies["H26.CATP"].cert])


def triple_des(world: DemoWorld) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(tmp, "hub.pem")
        hub.write_bytes(_pem(world.hub.cert))
        der = _openssl(
            "cms", "-encrypt", "-des3", "-binary", "-outform", "DER", str(hub),
            stdin=_signed_payload(world),
        )  # fmt: skip
    return _envelope(world, der)


def oaep_sha1(world: DemoWorld) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(tmp, "hub.pem")
        hub.write_bytes(_pem(world.hub.cert))
        der = _openssl(
            "cms", "-encrypt", "-aes256", "-binary", "-outform", "DER",
            "-recip", str(hub), "-keyopt", "rsa_padding_mode:oaep",
            stdin=_signed_payload(world),
        )  # fmt: skip
    return _envelope(world, der)


def nested_encryption(world: DemoWorld) -> bytes:
    once = cms_encrypt.encrypt(_signed_payload(world), [world.hub.cert])
    inner = (
        b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(once)
    )
    return _encrypt_inner(world, inner)


# --- builders: BER encodings ---------------------------------------------------------------


def _ber_enveloped(world: DemoWorld, der: bytes, segmented: bytes) -> bytes:
    """``der``, an EnvelopedData to the hub, in BER as ``openssl cms -stream`` writes it (every
    length indefinite) with ``segmented`` (the contents of a constructed OCTET STRING) as its
    encryptedContent [0]; RecipientInfo and algorithm stay genuine."""
    env = cms.ContentInfo.load(der)["content"]
    eci = env["encrypted_content_info"]
    body = (
        b"\x30\x80" + eci["content_type"].dump() + eci["content_encryption_algorithm"].dump()
        + b"\xa0\x80" + segmented + b"\0\0" + b"\0\0"
    )  # fmt: skip
    enveloped = b"\x30\x80" + env["version"].dump() + env["recipient_infos"].dump() + body + b"\0\0"
    der = b"\x30\x80" + cms.ContentType("enveloped_data").dump() + b"\xa0\x80" + enveloped
    return _envelope(world, der + b"\0\0\0\0")


def _segment(data: bytes) -> bytes:
    """``data`` as one primitive OCTET STRING segment (definite length)."""
    n = len(data)
    return b"\x04" + (bytes([n]) if n < 0x80 else b"\x82" + n.to_bytes(2, "big")) + data


def ber_empty_segments(world: DemoWorld) -> bytes:
    """A million empty ``04 00`` segments under ten nested indefinite lengths: 2 MB that cost
    the walker a million elements, read again at every level (about 20 s for 10 MB)."""
    segmented = b"\x04\x00" * 1_000_000
    for _ in range(10):
        segmented = b"\x24\x80" + segmented + b"\0\0"
    return _ber_enveloped(world, cms_encrypt.encrypt(b"x" * 32, [world.hub.cert]), segmented)


def ber_nested_segments(world: DemoWorld) -> bytes:
    """The genuine ciphertext of a signed payload, its 1000-byte segments grouped in segmented
    OCTET STRINGs of four: X.690 §8.7.3 allows it, CER and every S/MIME producer do not."""
    der = cms_encrypt.encrypt(_signed_payload(world), [world.hub.cert])
    ciphertext = cms.ContentInfo.load(der)["content"]["encrypted_content_info"][
        "encrypted_content"
    ].native
    pieces = [_segment(ciphertext[i : i + 1000]) for i in range(0, len(ciphertext), 1000)]
    groups = [b"".join(pieces[i : i + 4]) for i in range(0, len(pieces), 4)]
    segmented = b"".join(b"\x24\x80" + g + b"\0\0" for g in groups)
    return _ber_enveloped(world, der, segmented)


# --- builders: S/MIME structure -----------------------------------------------------------


def encrypted_unsigned(world: DemoWorld) -> bytes:
    return _encrypt_inner(world, payload_entity(_payload_xml(world)))


def signed_unencrypted(world: DemoWorld) -> bytes:
    return _top_level(world, _signed_payload(world))


def opaque_signed_unencrypted(world: DemoWorld) -> bytes:
    return _top_level(world, _signed_payload(world, detached=False))


def two_signers(world: DemoWorld) -> bytes:
    entity = payload_entity(_payload_xml(world))
    der = _cms_sign(entity, [_snv(world), world.agencies["H26.STP"]])
    return _encrypt_inner(world, _multipart_signed(entity, der))


def zero_signers(world: DemoWorld) -> bytes:
    entity = payload_entity(_payload_xml(world))
    info = cms.ContentInfo.load(cms_signed.sign(entity, cert=_snv(world).cert, key=_snv(world).key))
    info["content"]["signer_infos"] = cms.SignerInfos([])
    return _encrypt_inner(world, _multipart_signed(entity, info.dump(force=True)))


def unsigned_part_around_signed(world: DemoWorld) -> bytes:
    return _encrypt_inner(world, _mixed(_COVER_LETTER, _signed_payload(world)))


def signed_part_as_attachment(world: DemoWorld) -> bytes:
    opaque = _signed_payload(world, detached=False)
    return _encrypt_inner(world, _mixed(_COVER_LETTER, opaque))


def three_part_signed(world: DemoWorld) -> bytes:
    snv = _snv(world)
    entity = payload_entity(_payload_xml(world))
    der = cms_signed.sign(entity, cert=snv.cert, key=snv.key)
    forged = payload_entity(_payload_xml(world, payload_from="H26.CATP"))
    return _encrypt_inner(world, _multipart_signed(entity, der, extra_part=forged))


def signature_transplant(world: DemoWorld) -> bytes:
    snv = _snv(world)
    genuine = payload_entity(_payload_xml(world))
    der = cms_signed.sign(genuine, cert=snv.cert, key=snv.key)
    other = payload_entity(_payload_xml(world))  # a different MessageId: different bytes
    return _encrypt_inner(world, _multipart_signed(other, der))


def no_signed_attributes(world: DemoWorld) -> bytes:
    entity = payload_entity(_payload_xml(world))
    der = _cms_sign(entity, [_snv(world)], options=[pkcs7.PKCS7Options.NoAttributes])
    return _encrypt_inner(world, _multipart_signed(entity, der))


def signer_cert_omitted(world: DemoWorld) -> bytes:
    entity = payload_entity(_payload_xml(world))
    der = _cms_sign(entity, [_snv(world)], options=[pkcs7.PKCS7Options.NoCerts])
    return _encrypt_inner(world, _multipart_signed(entity, der))


def sha1_digest(world: DemoWorld) -> bytes:
    snv = _agency_cert(world, "sha1-signer")
    entity = payload_entity(_payload_xml(world))
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "signer.pem"), Path(tmp, "signer.key")
        cert.write_bytes(_pem(snv.cert))
        key.write_bytes(snv.key_pem())
        key.chmod(0o600)
        der = _openssl(
            "cms", "-sign", "-md", "sha1", "-binary", "-outform", "DER",
            "-signer", str(cert), "-inkey", str(key),
            stdin=entity,
        )  # fmt: skip
    return _encrypt_inner(world, _multipart_signed(entity, der, micalg="sha-1"))


def crafted_signature(
    entity: bytes,
    signer: Issued,
    *,
    pss_salt: int | None = None,
    used_salt: int = 32,
    cert_der: bytes | None = None,
    issuer: asn1_x509.Name | None = None,
    capabilities: Sequence[str] | None = None,
    damage: Callable[[bytes], bytes] | None = None,
    carry: bool = True,
) -> bytes:
    """A detached SignedData over ``entity`` put together field by field with asn1crypto, for
    what ``cryptography``'s signer never writes: an RSA-PSS salt length declared (``pss_salt``)
    other than the one used, a certificate altered after it was issued (``cert_der``), the
    signer named by an ``issuer`` other than (or encoded otherwise than) its certificate's, or
    SMIMECapabilities of one's choosing (``capabilities``, asn1crypto algorithm names, most
    preferred first). ``damage`` changes the signed attributes' DER before they are signed;
    ``carry=False`` leaves the signer's certificate out (``openssl cms -sign -nocerts``)."""
    attrs = cms.CMSAttributes(
        [
            {"type": "content_type", "values": ["data"]},
            {"type": "message_digest", "values": [hashlib.sha256(entity).digest()]},
        ]
        + (
            []
            if capabilities is None
            else [
                {
                    "type": "smime_capabilities",
                    "values": [[{"capability_id": name} for name in capabilities]],
                }
            ]
        )
    )
    if damage is not None:
        attrs = cms.CMSAttributes.load(damage(attrs.dump()))
    key = signer.key
    assert isinstance(key, rsa.RSAPrivateKey)
    algorithm: dict[str, object] = {"algorithm": "rsassa_pkcs1v15"}
    pad: padding.AsymmetricPadding = padding.PKCS1v15()
    if pss_salt is not None:
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=used_salt)
        algorithm = {
            "algorithm": "rsassa_pss",
            "parameters": {
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
                "salt_length": pss_salt,
            },
        }
    cert = asn1_x509.Certificate.load(
        cert_der or signer.cert.public_bytes(serialization.Encoding.DER)
    )
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                name="issuer_and_serial_number",
                value={"issuer": issuer or cert.issuer, "serial_number": cert.serial_number},
            ),
            "digest_algorithm": {"algorithm": "sha256"},
            "signed_attrs": attrs,
            "signature_algorithm": algorithm,
            "signature": key.sign(attrs.dump(), pad, hashes.SHA256()),
        }
    )
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "data"},
            **({"certificates": [cert]} if carry else {}),
            "signer_infos": [signer_info],
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump())


def pss_salt_overflow(world: DemoWorld) -> bytes:
    entity = payload_entity(_payload_xml(world))
    der = crafted_signature(entity, _snv(world), pss_salt=2**31)
    return _encrypt_inner(world, _multipart_signed(entity, der))


#: rsaEncryption, and an OID next to it that names no algorithm (1.2.840.113549.1.1.99).
RSA_ENCRYPTION = bytes.fromhex("06092a864886f70d010101")
UNKNOWN_KEY_OID = bytes.fromhex("06092a864886f70d010163")


def unknown_key_algorithm_cert(issued: Issued) -> bytes:
    """``issued``'s certificate with its key's algorithm replaced by an unknown OID."""
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    assert der.count(RSA_ENCRYPTION) == 1  # the key's; the signature's OID ends in 0b
    return der.replace(RSA_ENCRYPTION, UNKNOWN_KEY_OID)


def signer_key_unknown_algorithm(world: DemoWorld) -> bytes:
    entity = payload_entity(_payload_xml(world))
    snv = _snv(world)
    der = crafted_signature(entity, snv, cert_der=unknown_key_algorithm_cert(snv))
    return _encrypt_inner(world, _multipart_signed(entity, der))


# --- builders: the signer's certificate ---------------------------------------------------


def self_signed(world: DemoWorld) -> bytes:
    return _submit(world, _payload_xml(world), signer=_self_signed(world))


def foreign_ca_chain(world: DemoWorld) -> bytes:
    """A CA we do not trust, its chain carried in the message for the verifier's convenience."""
    rogue_root = make_root(
        "Vietnam Government Mail Root CA", at=world.at - timedelta(days=30), key=_key("rogue-root")
    )
    rogue_inter = make_intermediate(
        rogue_root,
        "Hanoi Agencies Issuing CA",
        at=world.at - timedelta(days=30),
        key=_key("rogue-inter"),
    )
    leaf = _agency_cert(world, "rogue-leaf", ca=rogue_inter)
    entity = payload_entity(_payload_xml(world))
    der = _cms_sign(entity, [leaf], certs=[rogue_inter.cert, rogue_root.cert])
    return _encrypt_inner(world, _multipart_signed(entity, der))


def lookalike_root(world: DemoWorld) -> bytes:
    """A rogue root with exactly our trust anchor's name, carried in the message."""
    name = world.root.cert.subject.rfc4514_string().removeprefix("CN=")
    rogue_root = make_root(name, at=world.at - timedelta(days=30), key=_key("lookalike-root"))
    leaf = _agency_cert(world, "lookalike-leaf", ca=rogue_root)
    entity = payload_entity(_payload_xml(world))
    der = _cms_sign(entity, [leaf], certs=[rogue_root.cert])
    return _encrypt_inner(world, _multipart_signed(entity, der))


def revoked(world: DemoWorld) -> bytes:
    return world.submission("H26.STP", signer=world.revoked["H26.STP"])


def expired(world: DemoWorld) -> bytes:
    signer = _agency_cert(
        world, "expired",
        not_before=world.at - timedelta(days=800), not_after=world.at - timedelta(days=1),
    )  # fmt: skip
    return _submit(world, _payload_xml(world), signer=signer)


def not_yet_valid(world: DemoWorld) -> bytes:
    signer = _agency_cert(
        world, "not-yet-valid",
        not_before=world.at + timedelta(days=1), not_after=world.at + timedelta(days=700),
    )  # fmt: skip
    return _submit(world, _payload_xml(world), signer=signer)


def wrong_eku(world: DemoWorld) -> bytes:
    signer = _agency_cert(world, "server-auth", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    return _submit(world, _payload_xml(world), signer=signer)


def rsa_1024(world: DemoWorld) -> bytes:
    signer = _agency_cert(world, "rsa1024", key_kind="rsa1024")
    return _submit(world, _payload_xml(world), signer=signer)


# --- builders: sender binding -------------------------------------------------------------


def from_not_cert_email(world: DemoWorld) -> bytes:
    return _submit(world, _payload_xml(world), from_addr="vanthu@stp.hanoi.gov.vn")


def display_name_spoof(world: DemoWorld) -> bytes:
    return _submit(world, _payload_xml(world), from_addr=f'"{SNV_EMAIL}" <attacker@evil.example>')


def payload_from_other_agency(world: DemoWorld) -> bytes:
    return _submit(world, _payload_xml(world, payload_from="H26.CATP"))


def unknown_agency(world: DemoWorld) -> bytes:
    signer = _agency_cert(
        world, "unknown-agency", email="clerk@ward7.hanoi.gov.vn", organ_id="H26.P7"
    )
    return _submit(world, _payload_xml(world), signer=signer, from_addr="clerk@ward7.hanoi.gov.vn")


# --- builders: the payload ----------------------------------------------------------------


def _xml_asset(name: str) -> Builder:
    def build(world: DemoWorld) -> bytes:
        return _submit(world, (ASSETS / "xml" / name).read_bytes())

    build.__name__ = f"signed_{name.replace('-', '_').removesuffix('.xml')}"
    return build


def unknown_category(world: DemoWorld) -> bytes:
    return _submit(world, _payload_xml(world, category="weather-report"))


#: The 20 MB text-node sample's message is ~37 MB; the message limit is raised so the XML
#: parser's own cap (text nodes ≤ 10 MB), not the message size, is what refuses it.
BIG_MESSAGE_LIMITS = Limits(max_message_bytes=64 * MiB)


def huge_text_node(world: DemoWorld) -> bytes:
    xml = _payload_xml(world).replace(
        "<Position>Kỹ sư trưởng</Position>".encode(),
        b"<Position>" + b"A" * (20 * 1000 * 1000) + b"</Position>",
    )
    snv = _snv(world)
    signed = sign_entity(payload_entity(xml), cert=snv.cert, key=snv.key)
    der = cms_encrypt.encrypt(signed, [world.hub.cert])
    # wrap_enveloped refuses anything over the default message limit, so the headers are
    # written here.
    return _top_level(
        world,
        b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(der),
    )


# --- the table ----------------------------------------------------------------------------

SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in (
        # RFC 5322 header block and MIME structure (static files).
        Sample("two-from-headers", "a second From header for the attacker, hoping one is checked and the other shown", HeaderCountError, "two-from-headers.eml", match="2 From headers"),
        Sample("group-from", "one From header naming a group of two mailboxes (RFC 5322 §3.6.2 ambiguity)", HeaderCountError, "group-from.eml"),
        Sample("missing-message-id", "no Message-ID: replay protection on (sender, MessageId) would have no key", HeaderCountError, "missing-message-id.eml", match="Message-ID"),
        Sample("empty-message", "zero bytes", HeaderCountError, "empty-message.eml"),
        Sample("from-without-domain", "From: vanthu@ — an address cut off after the @", HeaderCountError, "from-without-domain.eml"),
        Sample("from-unclosed-angle", "From: < — an unterminated angle-addr", HeaderCountError, "from-unclosed-angle.eml"),
        Sample("from-text-after-group", "From: agencies: vanthu@snv.hanoi.gov.vn; attacker — text after a group's closing semicolon", HeaderCountError, "from-text-after-group.eml"),
        Sample("from-nested-comments", "From: 1,500 nested comments, folded (3 KB): the standard library's address parser recursed once per level into RecursionError, an InternalError quarantine for plain SMTP input", HeaderCountError, "from-nested-comments.eml", match="nests comments 1500 deep"),
        Sample("subject-bad-encoded-word", "a Subject encoded-word with broken base64 (=?utf-8?b?Q?=): display-only text must not break intake; the junk body answers", MalformedCMS, "subject-bad-encoded-word.eml"),
        Sample("subject-non-ascii-charset", "a Subject encoded-word whose charset name holds a non-ASCII character (=?\\u0080utf-8?b?QQ==?=): Python's email package raises CharsetError, not a ValueError; the junk body answers", MalformedCMS, "subject-non-ascii-charset.eml"),
        Sample("subject-lone-surrogate", "a Subject encoded-word in UTF-7 that decodes to a lone surrogate (=?utf-7?q?+2AA-?=): text no archive record can hold as UTF-8, so filing failed and the worker crash-looped on every message behind it; the junk body answers", MalformedCMS, "subject-lone-surrogate.eml"),
        Sample("header-64k", "64 KB of (individually short) header lines: header-block memory exhaustion", LimitExceeded, "header-64k.eml", match="header block"),
        Sample("long-header-line", "a 2 KB unfolded Subject line, beyond RFC 5322 §2.1.1's 998 characters", LimitExceeded, "long-header-line.eml", match="header line longer than 998"),
        Sample("ten-thousand-parts", "a multipart with 10,000 parts (MIME part bomb)", LimitExceeded, "ten-thousand-parts.eml", match="MIME parts"),
        Sample("deep-mime-nesting", "60 nested multiparts (parser recursion and stack exhaustion)", LimitExceeded, "deep-mime-nesting.eml", match="nesting"),
        Sample("non-utf8-header", "Latin-1 bytes in a header: an undecodable header must not be guessed at", MalformedMessage, "non-utf8-header.eml", match="UTF-8"),
        Sample("two-content-types", "two Content-Type headers, so parsers may disagree on what the body is", MalformedMessage, "two-content-types.eml", match="Content-Type"),
        Sample("invalid-base64", "characters outside the base64 alphabet in the encrypted body (lenient decoders skip them)", MalformedMessage, "invalid-base64.eml", match="base64"),
        Sample("garbage-asn1", "a base64 body that is DER-shaped junk claiming a 4 GB SEQUENCE", MalformedCMS, "garbage-asn1.eml"),
        Sample("bare-header-block", "an enveloped-data header block with no body at all", MalformedCMS, "bare-header-block.eml"),
        Sample("plain-text", "an ordinary unsigned, unencrypted mail", NotEncrypted, "plain-text.eml"),
        Sample("encrypted-part-in-multipart", "the encrypted part wrapped in a multipart/mixed beside an unprotected text part", UnsignedContent, "encrypted-part-in-multipart.eml"),
        # The encryption layer.
        Sample("efail-cbc-gadget", "EFAIL CBC gadget: (IV⊕P0⊕X, C0) spliced into the ciphertext decrypts to attacker-chosen text", SignatureInvalid, efail_cbc_gadget),
        Sample("flipped-ciphertext-bit", "one bit flipped in the middle of the CBC ciphertext in transit", SignatureInvalid, flipped_ciphertext),
        Sample("gcm-tag-altered", "AES-GCM AuthEnvelopedData with one bit of the authentication tag flipped", DecryptionFailed, gcm_tag_altered),
        Sample("truncated-cms", "the enveloped-data DER cut in half (truncated in transit or on purpose)", MalformedCMS, truncated_cms),
        Sample("not-for-us", "encrypted to another agency's certificate, not the hub's", NotForUs, not_for_us),
        Sample("triple-des", "content encrypted with 3DES by the real `openssl cms -encrypt -des3` (downgrade)", WeakAlgorithm, triple_des, match="3DES", needs="openssl"),
        Sample("oaep-sha1", "RSA-OAEP key transport with SHA-1 (openssl's default OAEP), outside the profile", WeakAlgorithm, oaep_sha1, match="SHA-1", needs="openssl"),
        Sample("nested-encryption", "an enveloped-data inside the enveloped-data (encrypt twice, sign never)", ProfileViolation, nested_encryption, match="encrypted twice"),
        Sample("ber-empty-segments", "encryptedContent cut into a million empty BER segments (04 00) under ten nested indefinite lengths: 2 MB that cost the walker a million elements, read again at every level (unauthenticated CPU and memory exhaustion)", LimitExceeded, ber_empty_segments, match="elements inside one"),
        Sample("ber-nested-segments", "a genuine ciphertext in segments of segments (X.690 §8.7.3 allows them; CER and every S/MIME producer do not): each level is only more work for the walker", MalformedCMS, ber_nested_segments, match="one level of segments"),
        # The S/MIME structure inside the envelope.
        Sample("encrypted-unsigned", "encrypted to the hub but carrying no signature at all", NotSigned, encrypted_unsigned),
        Sample("signed-unencrypted", "a valid multipart/signed sent in clear, not encrypted to the hub", NotEncrypted, signed_unencrypted),
        Sample("opaque-signed-unencrypted", "a valid opaque signed-data sent in clear, not encrypted to the hub", NotEncrypted, opaque_signed_unencrypted),
        Sample("two-signers", "SignedData with two SignerInfos (Home Affairs and Justice): whose message is it?", SignerCountError, two_signers, match="2 signatures"),
        Sample("zero-signers", "SignedData with an empty SignerInfos SET: a signature that signs nothing", SignerCountError, zero_signers, match="0 signatures"),
        Sample("unsigned-part-around-signed", "a multipart/mixed with an unsigned cover letter around the genuine signed part", UnsignedContent, unsigned_part_around_signed),
        Sample("signed-part-as-attachment", "an unsigned text body with the genuine opaque signed-data as an attachment", UnsignedContent, signed_part_as_attachment),
        Sample("three-part-signed", "a multipart/signed with a forged payload smuggled in as a third part", UnsignedContent, three_part_signed, match="3 parts"),
        Sample("signature-transplant", "a genuine detached signature moved onto a different payload", SignatureInvalid, signature_transplant),
        Sample("no-signed-attributes", "a SignerInfo without signed attributes (no content-type / message-digest binding)", ProfileViolation, no_signed_attributes, match="signed attributes"),
        Sample("signer-cert-omitted", "a signature that carries no certificate, by a signer the hub does not know", UntrustedSigner, signer_cert_omitted),
        Sample("sha1-digest", "signed with SHA-1 by the real `openssl cms -sign -md sha1` (collision-prone digest)", WeakAlgorithm, sha1_digest, match="SHA-1", needs="openssl"),
        Sample("pss-salt-overflow", "an RSA-PSS signature declaring a salt length of 2^31, which overflowed cryptography's verifier into an InternalError quarantine (no agency key needed: any signer will do)", SignatureInvalid, pss_salt_overflow, match="salt length 2147483648 is impossible"),
        Sample("signer-key-unknown-algorithm", "a signer certificate whose key names an algorithm cryptography does not implement (UnsupportedAlgorithm, not a ValueError: an InternalError quarantine)", WeakAlgorithm, signer_key_unknown_algorithm, match="signer key algorithm 1.2.840.113549.1.1.99"),
        # The signer's certificate.
        Sample("self-signed-signer", "a self-signed certificate bearing Home Affairs' name, mailbox and OrganId", UntrustedSigner, self_signed),
        Sample("foreign-ca-chain", "a certificate from a CA we do not trust, its whole chain carried in the message", UntrustedSigner, foreign_ca_chain),
        Sample("lookalike-root", "a rogue root with exactly our trust anchor's name, carried in the message", UntrustedSigner, lookalike_root),
        Sample("revoked-signer", "signed with Justice's certificate that is on the CRL (lost laptop)", SignerRevoked, revoked),
        Sample("expired-signer", "signed with a certificate that expired the day before receipt", CertificateExpired, expired),
        Sample("not-yet-valid-signer", "signed with a certificate valid only from the day after receipt", CertificateNotYetValid, not_yet_valid),
        Sample("wrong-eku", "signer certificate with extKeyUsage serverAuth only (a TLS certificate)", WrongKeyUsage, wrong_eku),
        Sample("rsa-1024-signer", "a signer key of RSA-1024, below the profile's 2048 bits", KeyTooSmall, rsa_1024),
        # Binding of signer, From and agency.
        Sample("from-not-certificate-email", "signed by Home Affairs, From Justice's mailbox", SenderMismatch, from_not_cert_email),
        Sample("display-name-spoof", 'From: "vanthu@snv.hanoi.gov.vn" <attacker@evil.example> — the display name shows the agency', SenderMismatch, display_name_spoof, match="attacker@evil.example"),
        Sample("payload-from-other-agency", "signed and sent by Home Affairs, payload From/OrganId claims the police", AgencyMismatch, payload_from_other_agency),
        Sample("unknown-agency", "validly signed by a certificate from our CA, for a mailbox no agency owns", UnknownAgency, unknown_agency),
        # The XML payload, inside a valid signed and encrypted message.
        Sample("billion-laughs", "nested internal entities expanding to ~3 GB (entity amplification)", XmlForbidden, _xml_asset("billion-laughs.xml"), uses=("xml/billion-laughs.xml",)),
        Sample("xxe-file", "an external entity reading file:///etc/passwd into the Subject (XXE disclosure)", XmlForbidden, _xml_asset("xxe-file.xml"), uses=("xml/xxe-file.xml",)),
        Sample("xxe-network", "an external parameter entity fetched over HTTP (XXE SSRF, out-of-band exfiltration)", XmlForbidden, _xml_asset("xxe-network.xml"), uses=("xml/xxe-network.xml",)),
        Sample("doctype-only", "a harmless-looking DOCTYPE with no subset: no DOCTYPE at all is allowed", XmlForbidden, _xml_asset("doctype-only.xml"), uses=("xml/doctype-only.xml",)),
        Sample("xinclude", "an xi:include of /etc/passwd (XInclude disclosure)", XmlForbidden, _xml_asset("xinclude.xml"), uses=("xml/xinclude.xml",)),
        Sample("deep-nesting-300", "300 nested elements (stack and memory exhaustion)", LimitExceeded, _xml_asset("deep-nesting-300.xml"), uses=("xml/deep-nesting-300.xml",), match="depth"),
        Sample("huge-text-node", "a 20 MB text node (libxml2 caps text nodes at 10 MB without huge_tree); message limit raised so the XML cap answers", LimitExceeded, huge_text_node, limits=BIG_MESSAGE_LIMITS, match="larger than 10 MB"),
        Sample("unknown-category", "a payload whose Exchange/Category names no known XSD", SchemaInvalid, unknown_category, match="unknown category"),
    )
}  # fmt: skip
