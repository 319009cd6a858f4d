"""Reading CMS safely: every parse failure becomes :class:`MalformedCMS`.

Two tools. :func:`load_content_info` hands a whole (small) structure to asn1crypto.
:class:`Tlv` and :func:`children` walk BER/DER in place, without copying: the large
``OCTET STRING`` of a CMS message (the ciphertext of an EnvelopedData, the encapsulated content
of an opaque SignedData) is located as spans of the received buffer, and only the small fields
around it are given to asn1crypto. asn1crypto copies every nested value it parses, which costs
several times the message size for a 25 MB submission (X.690 §8.1: identifier, length,
contents; lengths may be definite or, in BER, indefinite and ended by two zero octets).

BER lets a sender make elements almost free: ``04 00``, an empty segment of an OCTET STRING, is
two bytes, and finding where an indefinite length ends means reading every element inside it.
So the walker (1) reads each element once: an indefinite-length element keeps the children it
was read through (:attr:`Tlv.kids`), and nobody reads them again; (2) lets the elements inside
one constructed element number at most :data:`FREE_ELEMENTS` plus one per
:data:`BYTES_PER_ELEMENT` bytes of content they carry, refusing (:class:`LimitExceeded`) as soon as
they are more — before the rest is read; (3) takes an OCTET STRING in segments of one level only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from asn1crypto import cms, x509

from formats.errors import LimitExceeded, MalformedCMS

_T = TypeVar("_T")

#: Universal tag numbers used by the callers.
INTEGER, OCTET_STRING, OID, SEQUENCE, SET = 2, 4, 6, 16, 17
UNIVERSAL, CONTEXT = 0, 2
#: Nesting cap for the walker: CMS needs about ten levels; this stops recursion bombs.
MAX_DEPTH = 32
#: Elements inside one constructed element, counted with everything read to find their ends:
#: this many whatever they carry, then one more per BYTES_PER_ELEMENT bytes of content. Real
#: producers are far inside: ``openssl cms -stream`` and gpgsm cut content into 4096-byte
#: segments (a 16-byte last one for the final cipher block), CER (X.690 §9.2) into 1000-byte
#: ones; ``cryptography`` and asn1crypto write DER, one segment. Segments of 4 bytes, or empty
#: ones, are refused after the first thousand: the walker's work stays proportional to the
#: content, not to how finely a sender chose to cut it.
FREE_ELEMENTS = 1024
BYTES_PER_ELEMENT = 256


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


@dataclass(slots=True)
class Tlv:
    """One BER element located in a buffer: offsets only, nothing copied. Not changed once
    read; not frozen only because a frozen dataclass is four times dearer to make, and a
    message has dozens of these."""

    tag_class: int
    constructed: bool
    number: int
    start: int  # first identifier octet
    body: int  # first contents octet
    body_end: int  # end of the contents (before the end-of-contents octets, if indefinite)
    end: int  # end of the whole element
    #: The children, for an indefinite length: they were read to find the end, and are kept so
    #: that nothing is read twice (a nested indefinite length would otherwise be read again at
    #: every level above it). ``None`` for a definite length: children are read when asked for.
    kids: tuple[Tlv, ...] | None = field(default=None, repr=False, compare=False)
    #: Elements read to locate this one: itself and, for an indefinite length, all it holds.
    weight: int = 1
    #: Content bytes it carries: its contents for a definite length (not looked into), the sum
    #: of its children's for an indefinite one (what is left is identifiers and lengths).
    carried: int = 0

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
        kids: list[Tlv] = []
        tally = _Tally()
        q = p
        while True:
            if q + 2 > limit:
                raise MalformedCMS("CMS structure is truncated (no end-of-contents)")
            if buf[q] == 0 and buf[q + 1] == 0:
                return Tlv(
                    tag_class, constructed, number, pos, p, q, q + 2,
                    kids=tuple(kids), weight=1 + tally.elements, carried=tally.carried,
                )  # fmt: skip
            kid = read_tlv(buf, q, limit, depth + 1)
            tally.add(kid)
            kids.append(kid)
            q = kid.end
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
    return Tlv(tag_class, constructed, number, pos, p, p + length, p + length, carried=length)


class _Tally:
    """The elements inside one constructed element, checked against what they carry."""

    __slots__ = ("carried", "elements")

    def __init__(self) -> None:
        self.elements = 0
        self.carried = 0

    def add(self, kid: Tlv) -> None:
        self.elements += kid.weight
        self.carried += kid.carried
        if self.elements > FREE_ELEMENTS + self.carried // BYTES_PER_ELEMENT:
            raise LimitExceeded(
                f"CMS structure has {self.elements} elements inside one element, carrying only "
                f"{self.carried} bytes (at most {FREE_ELEMENTS} plus one per "
                f"{BYTES_PER_ELEMENT} bytes); encode it in DER or in BER segments of a kilobyte "
                "or more"
            )


def children(buf: memoryview, parent: Tlv, depth: int = 0) -> Iterator[Tlv]:
    """The elements inside a constructed ``parent`` (those already read, if it has them)."""
    if not parent.constructed:
        raise MalformedCMS("CMS structure has a primitive value where a constructed one belongs")
    if parent.kids is not None:
        yield from parent.kids
        return
    tally = _Tally()
    pos = parent.body
    while pos < parent.body_end:
        child = read_tlv(buf, pos, parent.body_end, depth + 1)
        tally.add(child)
        yield child
        pos = child.end


def octets(buf: memoryview, tlv: Tlv) -> list[memoryview]:
    """The value of an OCTET STRING (any tag) as views: one span, or the BER segments.

    Segments are primitive, one level deep: X.690 §8.7.3 would allow segments of segments, but
    CER (§9.2) forbids them and no S/MIME producer writes them; each level is only another way
    to make the walker work for nothing.
    """
    if not tlv.constructed:
        return [buf[tlv.body : tlv.body_end]]
    out: list[memoryview] = []
    for child in children(buf, tlv):
        if not child.is_(UNIVERSAL, OCTET_STRING):
            raise MalformedCMS("a segmented OCTET STRING holds something else")
        if child.constructed:
            raise MalformedCMS(
                "a segmented OCTET STRING holds segmented OCTET STRINGs; only one level of "
                "segments is allowed (X.690 §9.2)"
            )
        out.append(buf[child.body : child.body_end])
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
    ctype = cms.ContentType.map(oid(buf, fields[0]))
    if ctype not in expect:
        raise MalformedCMS(f"expected CMS {' or '.join(expect)}, found {ctype}")
    inner = list(children(buf, fields[1]))
    if len(inner) != 1 or not inner[0].is_(UNIVERSAL, SEQUENCE):
        raise MalformedCMS(f"CMS {ctype} content is not a SEQUENCE")
    return ctype, list(children(buf, inner[0]))


#: Longest OBJECT IDENTIFIER read, in content octets. Real ones are under 30 (a 2.25 UUID arc
#: is 17); reading one arc costs the square of its length, and a 1 MB arc would take hours.
MAX_OID_BYTES = 64


def oid(buf: memoryview, tlv: Tlv) -> str:
    """The dotted form of the OBJECT IDENTIFIER ``tlv`` (asn1crypto's ``.map`` names it)."""
    if not tlv.is_(UNIVERSAL, OID) or tlv.constructed:
        raise MalformedCMS("CMS structure has something else where an object identifier belongs")
    if tlv.body_end - tlv.body > MAX_OID_BYTES:
        raise MalformedCMS(
            f"CMS structure has an object identifier of {tlv.body_end - tlv.body} octets "
            f"(at most {MAX_OID_BYTES})"
        )
    return dotted(bytes(buf[tlv.body : tlv.body_end]))


@functools.lru_cache(maxsize=512)
def dotted(body: bytes) -> str:
    """An OBJECT IDENTIFIER's contents as dotted text (X.690 §8.19): arcs in base 128, the
    first octets holding the first two arcs. Messages name the same few algorithms and
    attributes over and over, so the answers are kept."""
    if not body or body[-1] & 0x80:
        raise MalformedCMS("CMS structure has a malformed object identifier")
    arcs: list[int] = []
    value = 0
    for octet in body:
        value = value << 7 | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def retagged(buf: memoryview, tlv: Tlv, identifier: int) -> bytes:
    """A copy of ``tlv`` with its identifier octet replaced (an IMPLICIT [n] read as its type)
    and its length in DER's form: definite, in the fewest octets. What a signature covers
    (signed attributes, RFC 5652 §5.4; authenticated attributes, RFC 5083 §2.1) is the DER
    encoding, whichever length form the sender wrote, as openssl reads it too."""
    if tlv.number >= 0x1F:
        raise MalformedCMS("CMS structure has a malformed tag")
    size = tlv.body_end - tlv.body
    if size < 0x80:
        length = bytes([size])
    else:
        digits = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(digits)]) + digits
    return bytes([identifier]) + length + bytes(buf[tlv.body : tlv.body_end])


class Remembered(Generic[_T]):
    """``read`` over a piece of a message, the answers kept (least recently used first out)
    for pieces that repeat from message to message, such as an algorithm identifier or an
    agency's certificate; kept only for pieces of at most ``limit`` bytes, so that a sender
    cannot fill memory with them: bigger ones are read every time."""

    def __init__(self, read: Callable[[bytes], _T], *, limit: int, entries: int) -> None:
        self.read = read
        self.limit = limit
        self._kept = functools.lru_cache(maxsize=entries)(read)

    def __call__(self, data: bytes) -> _T:
        return self._kept(data) if len(data) <= self.limit else self.read(data)

    def kept(self) -> Any:
        """How many answers are kept (``functools`` cache info)."""
        return self._kept.cache_info()
