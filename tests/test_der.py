"""Walking BER/DER in place, and opening CMS without copying the large content.

Mail clients and ``openssl cms -stream``/gpgsm send BER: indefinite lengths and the ciphertext
or signed content cut into segments. :func:`to_ber` re-encodes our own DER that way, so the
same message can be opened in both encodings.
"""

from __future__ import annotations

import os

import pytest

from formats import cms_encrypt, cms_envelope, cms_signed, der, mime
from formats.der import CONTEXT, OCTET_STRING, UNIVERSAL, Tlv, children, octets, read_tlv
from formats.errors import GatewayError, LimitExceeded, MalformedCMS, MalformedMessage
from gateway.demo import DemoWorld


def _tlv(identifier: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | 2]) + n.to_bytes(2, "big")
    return bytes([identifier]) + length + body


def to_ber(encoded: bytes, *, over: int = 1000, segment: int = 700) -> bytes:
    """``encoded`` with every OCTET STRING (or [0]) longer than ``over`` cut into segments and
    every element enclosing one given an indefinite length; everything else left as it was."""
    buf = memoryview(encoded)

    def big(t: Tlv) -> bool:
        if t.constructed:
            return any(big(c) for c in children(buf, t))
        return (t.tag_class, t.number) in ((UNIVERSAL, OCTET_STRING), (CONTEXT, 0)) and (
            t.body_end - t.body > over
        )

    def convert(t: Tlv) -> bytes:
        if not big(t):
            return bytes(buf[t.start : t.end])
        ident = buf[t.start] | 0x20
        if t.constructed:
            inner = b"".join(convert(c) for c in children(buf, t))
        else:
            value = bytes(buf[t.body : t.body_end])
            inner = b"".join(
                _tlv(0x04, value[i : i + segment]) for i in range(0, len(value), segment)
            )
        return bytes([ident, 0x80]) + inner + b"\x00\x00"

    return convert(read_tlv(buf, 0, len(buf)))


# --- the walker ----------------------------------------------------------------------------------


def test_definite_and_indefinite_lengths_and_segmented_octets() -> None:
    segmented = b"\x24\x80" + _tlv(0x04, b"ab") + _tlv(0x04, b"c") + b"\0\0"
    definite = _tlv(0x24, _tlv(0x04, b"de") + _tlv(0x04, b""))
    data = b"\x30\x80" + _tlv(0x04, b"xyz") + segmented + definite + b"\0\0"
    buf = memoryview(data)
    top = read_tlv(buf, 0, len(buf))
    assert (top.constructed, top.body_end, top.end) == (True, len(data) - 2, len(data))
    first, second, third = children(buf, top)
    assert [bytes(v) for v in octets(buf, first)] == [b"xyz"]
    assert b"".join(octets(buf, second)) == b"abc"
    assert b"".join(octets(buf, third)) == b"de"


def test_long_form_lengths_and_high_tag_numbers() -> None:
    body = os.urandom(300)
    data = b"\x04\x82\x01\x2c" + body
    t = read_tlv(memoryview(data), 0, len(data))
    assert (t.body, t.end) == (4, len(data))
    high = b"\x9f\x81\x01\x01\xaa"  # [context 129] primitive, one octet
    t = read_tlv(memoryview(high), 0, len(high))
    assert (t.tag_class, t.number, t.end) == (CONTEXT, 129, 5)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x30\x05\x04\x01a", "truncated"),
        (b"\x30\x80\x04\x01a", "no end-of-contents"),
        (b"\x04\x80\x00\x00", "indefinite length on a primitive"),
        (b"\x04\x85\x00\x00\x00\x00\x01a", "impossible length"),
        (b"\x30\x80" * 100 + b"\x00\x00" * 100, "nested too deeply"),
        (b"\x9f\xff\xff\xff\xff\xff\x01\x00", "malformed tag"),
        (b"\x30", "truncated"),
    ],
)
def test_malformed_encodings_are_refused_by_name(data: bytes, match: str) -> None:
    with pytest.raises(MalformedCMS, match=match):
        _walk_all(memoryview(data))


def _walk_all(buf: memoryview) -> None:
    def walk(t: Tlv) -> None:
        if t.constructed:
            for c in children(buf, t):
                walk(c)

    walk(read_tlv(buf, 0, len(buf)))


def test_a_segmented_octet_string_holding_something_else_is_refused() -> None:
    data = b"\x24\x80" + _tlv(0x02, b"\x01") + b"\0\0"
    buf = memoryview(data)
    with pytest.raises(MalformedCMS, match="holds something else"):
        octets(buf, read_tlv(buf, 0, len(buf)))


@pytest.mark.parametrize("length", ["definite", "indefinite"])
def test_segments_of_segments_are_refused(length: str) -> None:
    """X.690 §8.7.3 allows them, CER (§9.2) and every S/MIME producer do without: refused."""
    inner = b"\x24\x80" + _tlv(0x04, b"c") + b"\0\0"
    data = (
        b"\x24\x80" + _tlv(0x04, b"ab") + inner + b"\0\0"
        if length == "indefinite"
        else _tlv(0x24, _tlv(0x04, b"ab") + _tlv(0x24, _tlv(0x04, b"c")))
    )
    buf = memoryview(data)
    with pytest.raises(MalformedCMS, match="only one level of segments"):
        octets(buf, read_tlv(buf, 0, len(buf)))


# --- elements that carry nothing -----------------------------------------------------------------

#: An empty segment: two bytes that carry nothing.
_EMPTY = b"\x04\x00"


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every position :func:`read_tlv` is called at (the walker's recursion included)."""
    calls: list[int] = []
    real = der.read_tlv

    def counting(buf: memoryview, pos: int, limit: int, depth: int = 0) -> Tlv:
        calls.append(pos)
        return real(buf, pos, limit, depth)

    monkeypatch.setattr(der, "read_tlv", counting)
    return calls


@pytest.mark.parametrize("length", ["definite", "indefinite"])
def test_empty_segments_are_refused_at_the_cap_before_the_rest_is_read(
    monkeypatch: pytest.MonkeyPatch, length: str
) -> None:
    """A million empty ``04 00`` segments: refused once there are FREE_ELEMENTS + 1 of them.

    What follows the cap is garbage that would fail on its own ("malformed tag"): the refusal
    names the count, so the walker never got there.
    """
    body = _EMPTY * (der.FREE_ELEMENTS + 1) + b"\x9f\xff\xff\xff\xff\xff" + _EMPTY * 1_000_000
    data = (
        b"\x24\x80" + body + b"\0\0"
        if length == "indefinite"
        else b"\x24\x84" + len(body).to_bytes(4, "big") + body
    )
    buf = memoryview(data)
    calls = _reads(monkeypatch)
    with pytest.raises(LimitExceeded, match=f"{der.FREE_ELEMENTS + 1} elements inside one"):
        octets(buf, der.read_tlv(buf, 0, len(buf)))
    assert len(calls) == der.FREE_ELEMENTS + 2  # the OCTET STRING and its segments up to the cap


def test_nested_indefinite_lengths_cost_what_they_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty segments under 20 levels of indefinite lengths (the walker used to read the whole
    subtree again at every level): the innermost level stops at the cap, the rest is not read."""
    data = b"\x24\x80" * 20 + _EMPTY * 100_000 + b"\0\0" * 20
    buf = memoryview(data)
    calls = _reads(monkeypatch)
    with pytest.raises(LimitExceeded):
        der.read_tlv(buf, 0, len(buf))
    assert len(calls) == 20 + der.FREE_ELEMENTS + 1


def test_segments_that_carry_data_are_not_capped() -> None:
    """Segments averaging BYTES_PER_ELEMENT bytes pass, however many (openssl cuts 4096)."""
    n = 4 * der.FREE_ELEMENTS
    data = b"\x24\x80" + _tlv(0x04, b"x" * der.BYTES_PER_ELEMENT) * n + _EMPTY * 100 + b"\0\0"
    buf = memoryview(data)
    spans = octets(buf, read_tlv(buf, 0, len(buf)))
    assert len(spans) == n + 100
    assert sum(map(len, spans)) == n * der.BYTES_PER_ELEMENT


def test_elements_are_read_once_however_deep_the_indefinite_lengths(
    world: DemoWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a BER message reads each element once: the ends found while looking for an
    indefinite length's end are kept, never looked for again."""
    encrypted = to_ber(cms_encrypt.encrypt(CONTENT, [world.hub.cert]))
    assert encrypted.startswith(b"\x30\x80")  # indefinite lengths from the top down
    calls = _reads(monkeypatch)
    opened = cms_envelope.decrypt(bytearray(encrypted), world.context().keys, max_bytes=1 << 20)
    assert opened.content == CONTENT
    assert len(calls) == len(set(calls))
    assert len(calls) > 15  # really walked the segments (CONTENT is ~10 KB in 700-byte pieces)


# --- enveloped data ------------------------------------------------------------------------------

CONTENT = b"Content-Type: text/plain\r\n\r\n" + os.urandom(5000).hex().encode()


@pytest.mark.parametrize(
    "options",
    [{}, {"cipher": "aes256_gcm"}, {"oaep": True}, {"cipher": "aes128_gcm", "oaep": True}],
    ids=["cbc", "gcm", "cbc-oaep", "gcm128-oaep"],
)
@pytest.mark.parametrize("encoding", ["der", "ber"])
def test_decryption_happens_in_the_received_buffer(
    world: DemoWorld, options: dict[str, object], encoding: str
) -> None:
    encrypted = cms_encrypt.encrypt(CONTENT, [world.hub.cert], **options)  # type: ignore[arg-type]
    if encoding == "ber":
        encrypted = to_ber(encrypted)
        assert encrypted.count(b"\x04\x82\x02\xbc") >= 10  # really cut into 700-byte segments
    buffer = bytearray(encrypted)
    opened = cms_envelope.decrypt(buffer, world.context().keys, max_bytes=1 << 20)
    assert opened.content == CONTENT
    assert opened.content is buffer  # written over the ciphertext: no second copy


def test_every_truncation_of_an_enveloped_message_is_a_typed_error(world: DemoWorld) -> None:
    encrypted = cms_encrypt.encrypt(b"x" * 100, [world.hub.cert], cipher="aes256_gcm")
    keys = world.context().keys
    for n in range(len(encrypted)):
        with pytest.raises(GatewayError):
            cms_envelope.decrypt(bytearray(encrypted[:n]), keys, max_bytes=1 << 20)


def test_a_flipped_gcm_tag_fails_after_decrypting_in_place(world: DemoWorld) -> None:
    encrypted = bytearray(cms_encrypt.encrypt(CONTENT, [world.hub.cert], cipher="aes256_gcm"))
    encrypted[-1] ^= 1  # the mac is the last field
    with pytest.raises(GatewayError, match="could not be decrypted"):
        cms_envelope.decrypt(encrypted, world.context().keys, max_bytes=1 << 20)


# --- signed data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["der", "ber"])
def test_opaque_signed_content_is_found_in_place(world: DemoWorld, encoding: str) -> None:
    signer = world.agencies["H26.SNV"]
    signed = cms_signed.sign(CONTENT, cert=signer.cert, key=signer.key, detached=False)  # type: ignore[arg-type]
    if encoding == "ber":
        signed = to_ber(signed)
    check = cms_signed.verify_signed_data(signed)
    assert bytes(check.content) == CONTENT
    if encoding == "der":
        assert isinstance(check.content, memoryview)  # one span: a view, not a copy


def test_detached_content_is_verified_without_copying(world: DemoWorld) -> None:
    signer = world.agencies["H26.SNV"]
    signature = cms_signed.sign(CONTENT, cert=signer.cert, key=signer.key)  # type: ignore[arg-type]
    view = memoryview(CONTENT)
    assert cms_signed.verify_signed_data(signature, detached=view).content is view


# --- base64 into a buffer ------------------------------------------------------------------------


@pytest.mark.parametrize("line", [76, 64, 7, 1])
@pytest.mark.parametrize("slice_size", [5, 13, 1 << 20])
def test_decoding_into_a_buffer_matches_the_one_shot_decoder(
    monkeypatch: pytest.MonkeyPatch, line: int, slice_size: int
) -> None:
    import base64

    monkeypatch.setattr(mime, "_SLICE", slice_size)
    for data in (b"", b"a", b"ab", os.urandom(1000)):
        text = base64.b64encode(data)
        wrapped = b"\r\n".join(text[i : i + line] for i in range(0, len(text), line)) + b"\r\n"
        assert mime.decode_base64_buffer(wrapped, limit=10_000) == data
        assert mime.decode_base64(wrapped, limit=10_000) == data


@pytest.mark.parametrize("bad", [b"QUJD\r\nR!==", b"QU=JD", b"QUJDR", b"QUJD==QUJD"])
def test_decoding_into_a_buffer_is_as_strict(monkeypatch: pytest.MonkeyPatch, bad: bytes) -> None:
    monkeypatch.setattr(mime, "_SLICE", 3)
    with pytest.raises(MalformedMessage):
        mime.decode_base64_buffer(bad, limit=100)
    with pytest.raises(MalformedMessage):
        mime.decode_base64(bad, limit=100)


def test_retagging_refuses_high_tag_numbers() -> None:
    data = b"\xbf\x81\x01\x00"
    buf = memoryview(data)
    with pytest.raises(MalformedCMS):
        der.retagged(buf, read_tlv(buf, 0, len(buf)), 0x31)
