"""CMS read in place (formats/der.py walker): hostile shapes end in a typed refusal, never in
another exception, a hang or memory kept; and what a signature covers is the DER form.

The structures are written byte by byte (:func:`_tlv`), since no signer writes them: an object
identifier of 100,000 octets, signed attributes with a long-form length, a certificate of version
4, an issuer name nested 2,000 deep, a recipient info of no kind RFC 5652 knows.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from formats import cms_envelope, cms_signed, der
from formats.errors import MalformedCMS, SignatureInvalid, UntrustedSigner
from gateway.demo import DemoWorld

ENTITY = b"Content-Type: text/plain\r\n\r\nsigned\r\n"
OID_CONTENT_TYPE = bytes.fromhex("06092a864886f70d010903")
OID_MESSAGE_DIGEST = bytes.fromhex("06092a864886f70d010904")
OID_DATA = bytes.fromhex("06092a864886f70d010701")
OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")
OID_ENVELOPED_DATA = bytes.fromhex("06092a864886f70d010703")
SHA256 = bytes.fromhex("300d06096086480165030402010500")
RSA = bytes.fromhex("300d06092a864886f70d0101010500")


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    digits = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(digits)]) + digits + body


def _attributes() -> bytes:
    """content-type and message-digest, as a SET OF's contents."""
    digest = _tlv(0x04, hashlib.sha256(ENTITY).digest())
    return _tlv(0x30, OID_CONTENT_TYPE + _tlv(0x31, OID_DATA)) + _tlv(
        0x30, OID_MESSAGE_DIGEST + _tlv(0x31, digest)
    )


def _issuer_and_serial(cert: bytes) -> tuple[bytes, bytes]:
    """A certificate's issuer Name and serial INTEGER, as it encodes them (DER)."""
    buf = memoryview(cert)
    tbs = next(der.children(buf, der.read_tlv(buf, 0, len(buf))))
    fields = [f for f in der.children(buf, tbs) if not f.is_(der.CONTEXT, 0)]  # [0] version
    return der.element(buf, fields[2]), der.element(buf, fields[0])


def _signed(
    world: DemoWorld,
    *,
    attrs: bytes | None = None,
    signed_over: bytes | None = None,
    sid: bytes | None = None,
    certs: list[bytes] | None = None,
) -> bytes:
    """A detached SignedData by H26.SNV; ``attrs``: the signed attributes as embedded
    ([0] with the given length form), ``signed_over``: what the signature is made over."""
    signer = world.agencies["H26.SNV"]
    assert isinstance(signer.key, rsa.RSAPrivateKey)
    cert = signer.cert.public_bytes(serialization.Encoding.DER)
    if attrs is None:
        attrs = _tlv(0xA0, _attributes())
    if signed_over is None:
        signed_over = b"\x31" + attrs[1:]
    if sid is None:
        issuer, serial = _issuer_and_serial(cert)
        sid = _tlv(0x30, issuer + serial)
    signature = signer.key.sign(signed_over, padding.PKCS1v15(), hashes.SHA256())
    info = _tlv(0x30, b"\x02\x01\x01" + sid + SHA256 + attrs + RSA + _tlv(0x04, signature))
    body = (
        b"\x02\x01\x01"
        + _tlv(0x31, SHA256)
        + _tlv(0x30, OID_DATA)
        + _tlv(0xA0, b"".join([cert] if certs is None else certs))
        + _tlv(0x31, info)
    )
    return _tlv(0x30, OID_SIGNED_DATA + _tlv(0xA0, _tlv(0x30, body)))


def test_the_control_verifies(world: DemoWorld) -> None:
    check = cms_signed.verify_signed_data(_signed(world), detached=ENTITY)
    assert check.signer == world.agencies["H26.SNV"].cert


def test_signed_attributes_are_checked_in_their_der_form_whatever_length_form_came(
    world: DemoWorld,
) -> None:
    """RFC 5652 §5.4: the signature covers the DER encoding of the attributes. Sent with a
    long-form length, a signature over the DER form verifies (as openssl has it), and one over
    the bytes as sent does not."""
    contents = _attributes()
    long_form = b"\xa0\x82" + len(contents).to_bytes(2, "big") + contents
    over_der = _signed(world, attrs=long_form, signed_over=_tlv(0x31, contents))
    assert cms_signed.verify_signed_data(over_der, detached=ENTITY).signer is not None
    over_sent = _signed(world, attrs=long_form, signed_over=b"\x31" + long_form[1:])
    with pytest.raises(SignatureInvalid, match="does not verify"):
        cms_signed.verify_signed_data(over_sent, detached=ENTITY)


def test_an_object_identifier_of_100000_octets_is_refused_at_once(world: DemoWorld) -> None:
    """One arc of n octets costs the square of n to read: 100 kB took 0.6 s, a 32 MiB message
    would have held a worker for hours. It is refused by its length, before it is read."""
    huge = _tlv(0x06, b"\xff" * 99_999 + b"\x7f")
    blob = _tlv(0x30, huge + _tlv(0xA0, _tlv(0x30, b"\x02\x01\x00")))
    with pytest.raises(MalformedCMS, match=r"object identifier of 100000 octets \(at most 64\)"):
        cms_envelope.decrypt(bytearray(blob), [], max_bytes=1 << 25)


def test_a_carried_certificate_of_version_4_is_malformed_not_a_defect(world: DemoWorld) -> None:
    """``cryptography`` refuses it with InvalidVersion, which is no ValueError: it escaped as an
    internal error (a quarantine for an admin) instead of a refusal the sender can read."""
    cert = world.agencies["H26.SNV"].cert.public_bytes(serialization.Encoding.DER)
    assert cert.count(b"\xa0\x03\x02\x01\x02") == 1
    v4 = cert.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x03")
    with pytest.raises(MalformedCMS, match="certificate in the message does not parse"):
        cms_signed.verify_signed_data(_signed(world, certs=[cert, v4]), detached=ENTITY)


def test_an_issuer_nested_2000_deep_is_malformed_not_a_recursion_error(world: DemoWorld) -> None:
    value = b"\x05\x00"
    for _ in range(2000):
        value = _tlv(0x30, value)
    issuer = _tlv(0x30, _tlv(0x31, _tlv(0x30, b"\x06\x03\x2a\x03\x04" + value)))
    with pytest.raises(MalformedCMS, match="damaged"):
        cms_signed.verify_signed_data(
            _signed(world, sid=_tlv(0x30, issuer + b"\x02\x01\x07")), detached=ENTITY
        )


def test_big_certificates_are_not_kept_between_messages(world: DemoWorld) -> None:
    """Certificates are read once for all the messages that carry them, but only those of a
    real certificate's size are kept: a sender cannot fill a worker's memory with them."""
    signer = world.agencies["H26.SNV"]
    assert isinstance(signer.key, rsa.RSAPrivateKey)
    cert = signer.cert.public_bytes(serialization.Encoding.DER)
    cms_signed.verify_signed_data(_signed(world), detached=ENTITY)
    kept = cms_signed._candidate.kept().currsize
    assert kept >= 1  # the agency's certificate is kept
    padded = (  # a well-formed certificate carrying 20 kB of an extension nobody knows
        x509.CertificateBuilder()
        .subject_name(signer.cert.subject)
        .issuer_name(signer.cert.subject)
        .public_key(signer.key.public_key())
        .serial_number(7)
        .not_valid_before(world.at)
        .not_valid_after(world.at + timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\0" * 20_000
            ),
            critical=False,
        )
        .sign(signer.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert len(padded) > cms_signed._CACHED_CERTIFICATE
    check = cms_signed.verify_signed_data(_signed(world, certs=[cert, padded]), detached=ENTITY)
    assert len(check.carried) == 2
    assert cms_signed._candidate.kept().currsize == kept


def test_a_signer_unknown_by_issuer_is_named(world: DemoWorld) -> None:
    issuer, _ = _issuer_and_serial(
        world.agencies["H26.SNV"].cert.public_bytes(serialization.Encoding.DER)
    )
    sid = _tlv(0x30, issuer + b"\x02\x02\x30\x39")  # serial 0x3039: nobody's
    with pytest.raises(UntrustedSigner, match=r"serial 3039\)"):
        cms_signed.verify_signed_data(_signed(world, sid=sid), detached=ENTITY)


@pytest.mark.parametrize(
    ("info", "refusal"),
    [
        (b"\x02\x01\x07", "none of RFC 5652's kinds"),  # an INTEGER
        (b"\x04\x01\x07", "none of RFC 5652's kinds"),  # an OCTET STRING
        (_tlv(0xA2, b"\x02\x01\x04"), "addressed to a kekri recipient"),  # [2] KEKRecipientInfo
    ],
    ids=["integer", "octet-string", "kekri"],
)
def test_a_recipient_info_is_named_by_its_kind_or_refused(
    world: DemoWorld, info: bytes, refusal: str
) -> None:
    """Only the context-tagged choices of RFC 5652 §6.2 are named; an INTEGER used to be
    reported as "a kekri recipient"."""
    cbc = _tlv(0x30, bytes.fromhex("060960864801650304012a") + _tlv(0x04, b"\0" * 16))
    content = _tlv(0x30, OID_DATA + cbc + b"\x80\x10" + b"\0" * 16)
    env = _tlv(0x30, b"\x02\x01\x00" + _tlv(0x31, info) + content)
    blob = _tlv(0x30, OID_ENVELOPED_DATA + _tlv(0xA0, env))
    keys = [cms_envelope.RecipientKey(world.hub.cert, world.hub.key)]
    with pytest.raises(Exception, match=refusal) as caught:
        cms_envelope.decrypt(bytearray(blob), keys, max_bytes=1 << 20)
    assert type(caught.value).__module__ == "formats.errors"
