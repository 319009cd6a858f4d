"""Reading CMS safely: every parse failure becomes :class:`MalformedCMS`.

Two tools. :func:`load_content_info` hands a whole (small) structure to asn1crypto.
:class:`Tlv` and :func:`children` walk BER/DER in place, without copying: the large
``OCTET STRING`` of a CMS message (the ciphertext of an EnvelopedData, the encapsulated content
of an opaque SignedData) is located as spans of the received buffer, and only the small fields
around it are given to asn1crypto. asn1crypto copies every nested value it parses, which costs
several times the message size for a 25 MB submission (X.690 §8.1: identifier, length,
contents; lengths may be definite or, in BER, indefinite and ended by two zero octets).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from asn1crypto import cms, x509

from formats.errors import MalformedCMS

#: Universal tag numbers used by the callers.
INTEGER, OCTET_STRING, OID, SEQUENCE, SET = 2, 4, 6, 16, 17
UNIVERSAL, CONTEXT = 0, 2
#: Nesting cap for the walker: CMS needs about ten levels; this stops recursion bombs.
MAX_DEPTH = 32


def load_content_info(der: bytes, *, expect: tuple[str, ...]) -> cms.ContentInfo:
    """Parse DER as a CMS ContentInfo whose content type is one of ``expect``."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        ctype = info["content_type"].native
        if ctype in expect:
            info["content"]  # parses the outer content; deeper damage surfaces later
    except (ValueError, TypeError, KeyError) as exc:
        raise MalformedCMS(f"CMS structure does not parse ({short_reason(exc)})") from None
    if ctype not in expect:
        raise MalformedCMS(f"expected CMS {' or '.join(expect)}, found {ctype}")
    return info


@dataclass(frozen=True, slots=True)
class Tlv:
    """One BER element located in a buffer: offsets only, nothing copied."""

    tag_class: int
    constructed: bool
    number: int
    start: int  # first identifier octet
    body: int  # first contents octet
    body_end: int  # end of the contents (before the end-of-contents octets, if indefinite)
    end: int  # end of the whole element

    def is_(self, tag_class: int, number: int) -> bool:
        return self.tag_class == tag_class and self.number == number


def read_tlv(buf: memoryview, pos: int, limit: int, depth: int = 0) -> Tlv:
    """The element starting at ``pos``, which must end by ``limit``."""
    if depth > MAX_DEPTH:
        raise MalformedCMS("CMS structure is nested too deeply")
    if pos + 2 > limit:
        raise MalformedCMS("CMS structure is truncated")
    ident = buf[pos]
    tag_class, constructed, number = ident >> 6, bool(ident & 0x20), ident & 0x1F
    p = pos + 1
    if number == 0x1F:  # high-tag-number form
        number = 0
        while True:
            if p >= limit or p - pos > 4:
                raise MalformedCMS("CMS structure has a malformed tag")
            octet = buf[p]
            p += 1
            number = number << 7 | (octet & 0x7F)
            if not octet & 0x80:
                break
    if p >= limit:
        raise MalformedCMS("CMS structure is truncated")
    first = buf[p]
    p += 1
    if first == 0x80:  # indefinite length: contents end with two zero octets
        if not constructed:
            raise MalformedCMS("CMS structure has an indefinite length on a primitive value")
        q = p
        while True:
            if q + 2 > limit:
                raise MalformedCMS("CMS structure is truncated (no end-of-contents)")
            if buf[q] == 0 and buf[q + 1] == 0:
                return Tlv(tag_class, constructed, number, pos, p, q, q + 2)
            q = read_tlv(buf, q, limit, depth + 1).end
    if first & 0x80:
        count = first & 0x7F
        if count > 4 or p + count > limit:
            raise MalformedCMS("CMS structure has an impossible length")
        length = int.from_bytes(buf[p : p + count], "big")
        p += count
    else:
        length = first
    if p + length > limit:
        raise MalformedCMS("CMS structure is truncated")
    return Tlv(tag_class, constructed, number, pos, p, p + length, p + length)


def children(buf: memoryview, parent: Tlv, depth: int = 0) -> Iterator[Tlv]:
    """The elements inside a constructed ``parent``."""
    if not parent.constructed:
        raise MalformedCMS("CMS structure has a primitive value where a constructed one belongs")
    pos = parent.body
    while pos < parent.body_end:
        child = read_tlv(buf, pos, parent.body_end, depth + 1)
        yield child
        pos = child.end


def octets(buf: memoryview, tlv: Tlv, depth: int = 0) -> list[memoryview]:
    """The value of an OCTET STRING (any tag) as views: one span, or the BER segments."""
    if not tlv.constructed:
        return [buf[tlv.body : tlv.body_end]]
    if depth > MAX_DEPTH:
        raise MalformedCMS("CMS structure is nested too deeply")
    out: list[memoryview] = []
    for child in children(buf, tlv):
        if not child.is_(UNIVERSAL, OCTET_STRING):
            raise MalformedCMS("a segmented OCTET STRING holds something else")
        out.extend(octets(buf, child, depth + 1))
    return out


def element(buf: memoryview, tlv: Tlv) -> bytes:
    """A copy of one (small) element, for asn1crypto."""
    return bytes(buf[tlv.start : tlv.end])


def short_reason(exc: BaseException, n: int = 80) -> str:
    """The first line of an exception's text, shortened: enough to diagnose, nothing internal."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= n else text[: n - 1] + "…"


def same_name(a: x509.Name, b: x509.Name) -> bool:
    """RFC 5280 §7.1 name equality; identical DER (the usual case) skips the costly string prep."""
    return bool(a.dump() == b.dump() or a == b)


def content_info(buf: memoryview, *, expect: tuple[str, ...]) -> tuple[str, list[Tlv]]:
    """Walk a ContentInfo (RFC 5652 §3) in place: its content type and the content's fields.

    The whole buffer must be the one ContentInfo; its content must be a SEQUENCE, whose
    fields are returned as located elements.
    """
    top = read_tlv(buf, 0, len(buf))
    if not top.is_(UNIVERSAL, SEQUENCE) or top.end != len(buf):
        raise MalformedCMS("CMS structure does not parse (not a single ContentInfo)")
    fields = list(children(buf, top))
    if len(fields) != 2 or not fields[0].is_(UNIVERSAL, OID) or not fields[1].is_(CONTEXT, 0):
        raise MalformedCMS("CMS structure does not parse (not a ContentInfo)")
    try:
        ctype = cms.ContentType.load(element(buf, fields[0])).native
    except ValueError as exc:
        raise MalformedCMS(f"CMS structure does not parse ({short_reason(exc)})") from None
    if ctype not in expect:
        raise MalformedCMS(f"expected CMS {' or '.join(expect)}, found {ctype}")
    inner = list(children(buf, fields[1]))
    if len(inner) != 1 or not inner[0].is_(UNIVERSAL, SEQUENCE):
        raise MalformedCMS(f"CMS {ctype} content is not a SEQUENCE")
    return ctype, list(children(buf, inner[0]))


def retagged(buf: memoryview, tlv: Tlv, identifier: int) -> bytes:
    """A copy of ``tlv`` with its identifier octet replaced (an IMPLICIT [n] read as its type)."""
    if tlv.number >= 0x1F:
        raise MalformedCMS("CMS structure has a malformed tag")
    return bytes([identifier]) + bytes(buf[tlv.start + 1 : tlv.end])
