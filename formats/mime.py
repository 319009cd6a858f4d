"""MIME entities as spans of the original bytes, with limits checked before anything is parsed.

We never build an ``email.message.Message`` tree from untrusted input and never re-serialise what
we received: every :class:`Entity` is a window (``start``/``body_start``/``end``) onto the one
buffer the peer sent, so the bytes a signature covers are cut out exactly as they arrived
(RFC 8551 §3.1.1, RFC 1847 §2.1).

Plan for :func:`parse_entity` (each step refuses before the next one spends work):

1. the header block is found and its size checked (``max_header_bytes``);
2. header fields are unfolded and decoded (RFC 5322 §2.2, RFC 6532 UTF-8 allowed);
3. ``Content-Type`` is parsed with the standard library's header registry; defects are failures;
4. for ``multipart/*`` the body is split on the boundary delimiter (RFC 2046 §5.1.1) while
   counting entities (``max_parts``) and nesting (``max_depth``) — we stop at the first excess.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.headerregistry import HeaderRegistry
from functools import lru_cache
from urllib.parse import unquote_to_bytes

import pybase64

from formats.errors import HeaderCountError, LimitExceeded, MalformedMessage
from formats.limits import DEFAULT_LIMITS, Limits

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 §3.6.8 ftext
_registry = HeaderRegistry()


@dataclass(frozen=True, slots=True)
class ContentType:
    maintype: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def value(self) -> str:
        return f"{self.maintype}/{self.subtype}"

    def param(self, name: str) -> str | None:
        return self.params.get(name)


DEFAULT_CONTENT_TYPE = ContentType("text", "plain", {"charset": "us-ascii"})


@dataclass(frozen=True, slots=True)
class Entity:
    """One MIME entity: a window onto ``buffer``; children for multiparts."""

    buffer: bytes | bytearray
    start: int
    body_start: int
    end: int
    headers: tuple[tuple[str, str], ...]
    content_type: ContentType
    children: tuple[Entity, ...] = ()

    @property
    def raw(self) -> bytes:
        """The whole entity (headers and body) exactly as received (a copy)."""
        return bytes(self.buffer[self.start : self.end])

    @property
    def body(self) -> bytes:
        return bytes(self.buffer[self.body_start : self.end])

    @property
    def raw_view(self) -> memoryview:
        """:attr:`raw` without copying: a read-only view of the buffer."""
        return memoryview(self.buffer).toreadonly()[self.start : self.end]

    @property
    def body_view(self) -> memoryview:
        return memoryview(self.buffer).toreadonly()[self.body_start : self.end]

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n == lname]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    @property
    def transfer_encoding(self) -> str:
        return (self.get("content-transfer-encoding") or "7bit").strip().lower()

    def decoded_body(self, *, limit: int) -> bytes:
        """The body with its Content-Transfer-Encoding undone (base64 strictly, RFC 2045 §6.8)."""
        cte = self.transfer_encoding
        body = self.body_view
        if cte == "base64":
            return decode_base64(body, limit=limit)
        if cte in ("7bit", "8bit", "binary"):
            if len(body) > limit:
                raise LimitExceeded(f"part body is {len(body)} bytes, limit is {limit}")
            return bytes(body)
        if cte == "quoted-printable":
            data = binascii.a2b_qp(body)
            if len(data) > limit:
                raise LimitExceeded(f"part body is {len(data)} bytes, limit is {limit}")
            return data
        raise MalformedMessage(f"unknown Content-Transfer-Encoding {cte!r}; use base64")

    def decoded_buffer(self, *, limit: int) -> bytearray:
        """A base64 body decoded into a new mutable buffer (for in-place decryption)."""
        if self.transfer_encoding != "base64":
            return bytearray(self.decoded_body(limit=limit))
        return decode_base64_buffer(self.body_view, limit=limit)

    def walk(self) -> Iterator[Entity]:
        yield self
        for child in self.children:
            yield from child.walk()


_WS = b" \t\r\n"
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


#: Bodies are decoded in slices of this size, so no full-size copy of the input is made.
_SLICE = 1 << 20


def _slices(data: memoryview) -> Iterator[bytes]:
    for at in range(0, len(data), _SLICE):
        yield bytes(data[at : at + _SLICE])


def _bad_base64(why: str) -> MalformedMessage:
    return MalformedMessage(f"invalid base64 body ({why}); the part was damaged in transit")


def decode_base64(data: bytes | bytearray | memoryview, *, limit: int) -> bytes:
    """Strictly decode a base64 body (see :func:`decode_base64_buffer`)."""
    return bytes(decode_base64_buffer(data, limit=limit))


def decode_base64_buffer(data: bytes | bytearray | memoryview, *, limit: int) -> bytearray:
    """Strictly decode a base64 body (RFC 2045 §6.8) into a new mutable buffer.

    Only the alphabet, with blanks and line breaks anywhere; ``=`` only at the end, where it
    completes the last quantum (more of it says no more than "the end", and is ignored, as
    binascii does). Decoded slice by slice, with pybase64 (SIMD, about five times binascii's
    speed), so that the only full-size allocation is the result.
    """
    view = memoryview(data)
    if len(view) // 4 * 3 > limit + limit // 3 + 1024:
        raise LimitExceeded(
            f"decoded body would be about {len(view) // 4 * 3} bytes, limit is {limit}"
        )
    out = bytearray()
    carry = b""
    padding = -1  # how many "=" so far; -1 until the first
    for piece in _slices(view):
        chars = piece.translate(None, _WS)
        at = 0 if padding >= 0 else chars.find(b"=")
        if at >= 0:  # from here on only "=" may come
            chars, tail = chars[:at], chars[at:]
            if after := tail.translate(None, b"="):
                raise _bad_base64(f"unexpected {after[:1]!r} after the padding")
            padding = max(padding, 0) + len(tail)
        chars = carry + chars
        whole = len(chars) // 4 * 4
        out += _strict(chars[:whole])
        carry = chars[whole:]
        if len(out) > limit:
            raise LimitExceeded(f"decoded body is over {limit} bytes, the limit")
    if carry:  # the last quantum: two or three characters and its "=" or "=="
        missing = 4 - len(carry)
        if missing == 3 or padding < missing:
            raise _bad_base64(f"{len(carry)} characters at the end, without their padding")
        out += _strict(carry + b"=" * missing)
    if len(out) > limit:
        raise LimitExceeded(f"decoded body is {len(out)} bytes, limit is {limit}")
    return out


def _strict(quanta: bytes) -> bytes:
    """Whole quanta of the alphabet (and padding at the end) decoded, or :func:`_bad_base64`."""
    try:
        return pybase64.b64decode(quanta, validate=True)
    except binascii.Error:
        invalid = quanta.translate(None, _B64_ALPHABET + b"=")
        raise _bad_base64(f"unexpected {invalid[:1]!r}" if invalid else "bad padding") from None


def check_message_limits(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
    """Cheap checks on a whole received message before any parsing (DESIGN §5 rule 4).

    Line length is checked on header lines (where folding makes it matter); for whole bodies
    it is a transport limit the SMTP listener enforces while receiving.
    """
    if len(raw) > limits.max_message_bytes:
        raise LimitExceeded(
            f"message is {len(raw)} bytes, limit is {limits.max_message_bytes}; send smaller parts"
        )


def parse_message(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Entity:
    """Parse a whole received message (top-level entity) after the message-level limit checks."""
    check_message_limits(raw, limits)
    return parse_entity(raw, limits)


def parse_entity(buffer: bytes | bytearray, limits: Limits = DEFAULT_LIMITS) -> Entity:
    """Parse ``buffer`` as one MIME entity (and its children), checking limits as we go."""
    counter = [0]
    return _parse(buffer, 0, len(buffer), limits, depth=1, counter=counter)


def _parse(
    buffer: bytes | bytearray,
    start: int,
    end: int,
    limits: Limits,
    *,
    depth: int,
    counter: list[int],
) -> Entity:
    counter[0] += 1
    if counter[0] > limits.max_parts:
        raise LimitExceeded(f"more than {limits.max_parts} MIME parts")
    if depth > limits.max_depth:
        raise LimitExceeded(f"MIME nesting deeper than {limits.max_depth} levels")

    header_end, body_start = _header_span(buffer, start, end, limits)
    headers = _parse_headers(buffer[start:header_end], limits.max_line_bytes)
    ctype = _content_type(headers)
    children: tuple[Entity, ...] = ()
    if ctype.maintype == "multipart":
        boundary = ctype.param("boundary")
        if not boundary:
            raise MalformedMessage(f"{ctype.value} without a boundary parameter")
        children = tuple(
            _parse(buffer, s, e, limits, depth=depth + 1, counter=counter)
            for s, e in _split_multipart(buffer, body_start, end, boundary, limits)
        )
        if not children:
            raise MalformedMessage(f"{ctype.value} with no parts")
    return Entity(buffer, start, body_start, end, headers, ctype, children)


def _header_span(
    buffer: bytes | bytearray, start: int, end: int, limits: Limits
) -> tuple[int, int]:
    """Where the header block ends and the body begins (RFC 5322 §2.1: an empty line between)."""
    for blank in (b"\r\n", b"\n"):
        if buffer.startswith(blank, start, end):  # no header fields at all
            return start, start + len(blank)
    window_end = min(end, start + limits.max_header_bytes + 4)
    match = _HEADER_END.search(buffer, start, window_end)
    if match is None:
        if end - start > limits.max_header_bytes:
            raise LimitExceeded(f"header block larger than {limits.max_header_bytes} bytes")
        return end, end  # headers only, no body (RFC 2046 allows an empty part)
    if match.start() - start > limits.max_header_bytes:
        raise LimitExceeded(f"header block larger than {limits.max_header_bytes} bytes")
    return match.start(), match.end()


def _parse_headers(block: bytes | bytearray, max_line: int) -> tuple[tuple[str, str], ...]:
    try:
        text = block.decode("utf-8")  # RFC 6532 allows UTF-8 header text; nothing else
    except UnicodeDecodeError:
        raise MalformedMessage("header block is not valid UTF-8 (RFC 6532)") from None
    fields: list[tuple[str, str]] = []
    for line in re.split(r"\r?\n", text):
        if not line:
            continue
        if len(line) > max_line:
            raise LimitExceeded(
                f"header line longer than {max_line} characters (RFC 5322 §2.1.1); fold it"
            )
        if line[0] in " \t":
            if not fields:
                raise MalformedMessage("header block starts with a continuation line")
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        name = name.rstrip(" \t")
        if not sep or not _FIELD_NAME.match(name):
            raise MalformedMessage(f"malformed header line {_shorten(line)!r}")
        fields.append((name.lower(), value.strip()))
    return tuple(fields)


def _content_type(headers: tuple[tuple[str, str], ...]) -> ContentType:
    values = [v for n, v in headers if n == "content-type"]
    if not values:
        return DEFAULT_CONTENT_TYPE
    if len(values) > 1:
        raise MalformedMessage("more than one Content-Type header")
    return parse_content_type(values[0])


# RFC 2045 §5.1 / RFC 2231: type "/" subtype *(";" attribute "=" (token / quoted-string)).
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # noqa: S105 — RFC 2045 token
_CT_HEAD = re.compile(rf"\s*({_TOKEN})\s*/\s*({_TOKEN})\s*")
_CD_HEAD = re.compile(rf"\s*({_TOKEN})\s*")  # RFC 2183 §2: disposition-type
_CT_PARAM = re.compile(rf';\s*({_TOKEN})\s*=\s*(?:({_TOKEN})|"((?:[^"\\\r\n]|\\.)*)")\s*')
_TRAILING = re.compile(r";?\s*")


def parse_content_type(value: str) -> ContentType:
    """Parse a Content-Type value strictly; anything unparseable is a failure, not a default."""
    head = _CT_HEAD.match(value)
    if head is None:
        raise MalformedMessage(f"unparseable Content-Type {_shorten(value)!r}")
    params = _parameters(value, head.end(), "Content-Type")
    return ContentType(head.group(1).lower(), head.group(2).lower(), params)


def parse_disposition(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Disposition value (RFC 2183): its type and parameters, read as strictly as
    Content-Type's (a ``;`` inside quotes is text, RFC 2231 values are decoded)."""
    head = _CD_HEAD.match(value)
    if head is None:
        raise MalformedMessage(f"unparseable Content-Disposition {_shorten(value)!r}")
    return head.group(1).lower(), _parameters(value, head.end(), "Content-Disposition")


def _parameters(value: str, pos: int, header: str) -> dict[str, str]:
    params: dict[str, str] = {}
    while pos < len(value):
        m = _CT_PARAM.match(value, pos)
        if m is None:
            if _TRAILING.fullmatch(value, pos):
                break
            raise MalformedMessage(f"unparseable {header} parameters in {_shorten(value)!r}")
        name = m.group(1).lower()
        if name in params:
            raise MalformedMessage(f"{header} parameter {name} given twice")
        token, quoted = m.group(2), m.group(3)
        params[name] = token if token is not None else re.sub(r"\\(.)", r"\1", quoted)
        pos = m.end()
    return _rfc2231(params, header) if any("*" in name for name in params) else params


# RFC 2231 §3, §4: name*N (a continuation, N from 0 without gaps) and name* (an extended value:
# charset'language'percent-encoded octets; only the first section names the charset).
_SECTION = re.compile(r"([^*]+)(?:\*(0|[1-9][0-9]{0,2}))?(\*)?")
_EXTENDED_INITIAL = re.compile(r"([^']*)'[^']*'(.*)", re.DOTALL)
_PERCENT_ENCODED = re.compile(r"(?:[^%]|%[0-9A-Fa-f]{2})*", re.DOTALL)


def _rfc2231(params: dict[str, str], header: str) -> dict[str, str]:
    """``params`` with RFC 2231 sections joined and decoded, under their plain names.

    An RFC 2231 value wins over a plain one of the same name (RFC 6266 §4.3: clients send
    ``filename`` for old readers beside ``filename*``). Anything that does not decode is
    refused, as an unparseable Content-Type is: a guessed name would be compared, not shown.
    """
    out: dict[str, str] = {}
    sections: dict[str, dict[int, tuple[bool, str]]] = {}
    for key, value in params.items():
        m = _SECTION.fullmatch(key)
        if m is None:
            raise MalformedMessage(f"{header} parameter {key} is not an RFC 2231 name")
        name, number, extended = m.groups()
        if number is None and not extended:
            out.setdefault(name, value)
            continue
        parts = sections.setdefault(name, {})
        index = int(number or 0)
        if index in parts:
            raise MalformedMessage(f"{header} parameter {name} section {index} given twice")
        parts[index] = (bool(extended), value)
    for name, parts in sections.items():
        if sorted(parts) != list(range(len(parts))):
            raise MalformedMessage(
                f"{header} parameter {name} has sections {sorted(parts)}; RFC 2231 numbers "
                "them from 0 without gaps"
            )
        out[name] = _join_sections([parts[i] for i in range(len(parts))], f"{header} {name}")
    return out


def _join_sections(sections: list[tuple[bool, str]], what: str) -> str:
    charset = "us-ascii"
    if sections[0][0]:
        initial = _EXTENDED_INITIAL.fullmatch(sections[0][1])
        if initial is None:
            raise MalformedMessage(f"{what}* does not start with charset'language' (RFC 2231)")
        charset = initial.group(1) or charset
        sections[0] = (True, initial.group(2))
    text: list[str] = []
    octets = bytearray()
    for extended, value in sections:
        if extended:
            if not _PERCENT_ENCODED.fullmatch(value):
                raise MalformedMessage(f"{what}* has a % not followed by two hex digits")
            octets += unquote_to_bytes(value)
            continue
        text.append(_decode_octets(octets, charset, what))
        octets.clear()
        text.append(value)
    text.append(_decode_octets(octets, charset, what))
    return "".join(text)


def _decode_octets(octets: bytearray, charset: str, what: str) -> str:
    try:
        text = octets.decode(charset)
        text.encode("utf-8")  # UTF-7 and the like decode to lone surrogates, no record holds
    except (LookupError, UnicodeError):
        raise MalformedMessage(
            f"{what}* is not valid {_shorten(charset, 20)!r} text (RFC 2231); use UTF-8"
        ) from None
    return text


def _split_multipart(
    buffer: bytes | bytearray, body_start: int, end: int, boundary: str, limits: Limits
) -> list[tuple[int, int]]:
    """Spans of the body parts, per RFC 2046 §5.1.1.

    The CRLF before a delimiter belongs to the delimiter, so a part's bytes end before it.
    Preamble and epilogue are ignored, as the RFC says; a missing close delimiter is a failure
    (a truncated message must not pass as a complete one).
    """
    if len(boundary) > 70 or not boundary.isascii():
        raise MalformedMessage("multipart boundary longer than 70 characters or not ASCII")
    spans: list[tuple[int, int]] = []
    part_start: int | None = None
    for line_start, line_end, close in _delimiters(buffer, body_start, end, boundary):
        if part_start is not None:
            part_end = line_start
            if buffer[part_end - 2 : part_end] == b"\r\n":
                part_end -= 2
            elif buffer[part_end - 1 : part_end] == b"\n":
                part_end -= 1
            spans.append((part_start, max(part_start, part_end)))
            if len(spans) > limits.max_parts:
                raise LimitExceeded(f"more than {limits.max_parts} MIME parts")
        if close:
            return spans
        part_start = line_end
    raise MalformedMessage("multipart body has no closing boundary (truncated message?)")


def _delimiters(
    buffer: bytes | bytearray, start: int, end: int, boundary: str
) -> Iterator[tuple[int, int, bool]]:
    """The delimiter lines in ``buffer[start:end]``: where each starts and ends (after its line
    break) and whether it closes. A delimiter line is ``--boundary``, ``--`` if it closes,
    optional spaces or tabs, then CRLF, LF or the end of the body; it starts a line (the body
    starts after the headers' blank line). Found with ``find``: every message has its own
    boundary, so a compiled pattern per boundary would cost more than the search itself."""
    marker = b"--" + boundary.encode("ascii")
    pos = start
    while (at := buffer.find(marker, pos, end)) >= 0:
        pos = at + 1
        if at > 0 and buffer[at - 1] != 0x0A:
            continue  # not at the start of a line
        i = at + len(marker)
        close = i + 2 <= end and buffer[i : i + 2] == b"--"
        if close:
            i += 2
        while i < end and buffer[i] in (0x20, 0x09):
            i += 1
        if i == end:
            yield at, i, close
        elif buffer[i] == 0x0A:
            yield at, i + 1, close
        elif buffer[i] == 0x0D and i + 1 < end and buffer[i + 1] == 0x0A:
            yield at, i + 2, close


def single_header(entity: Entity, name: str) -> str:
    """The value of a header that must appear exactly once (RFC 5322 §3.6 table)."""
    values = entity.get_all(name)
    if len(values) != 1:
        raise HeaderCountError(
            f"message has {len(values)} {name} headers; exactly one is required (RFC 5322 §3.6)"
        )
    return values[0]


def single_address(value: str, header: str = "From") -> str:
    """The one addr-spec in an address header; display names are ignored, groups refused.

    The standard library's parser costs a quarter of a millisecond; an agency's ``From`` is
    the same on every message, so answers (and refusals) are remembered, a bounded number."""
    valid, text = _addresses(value, header)
    if not valid:
        raise HeaderCountError(text)
    return text


@lru_cache(maxsize=4096)
def _addresses(value: str, header: str) -> tuple[bool, str]:
    """(True, the address) or (False, why not): no exception object is kept."""
    try:
        return True, _parse_single_address(value, header)
    except HeaderCountError as err:
        return False, err.message


#: RFC 5322 §3.2.2 lets comments nest without limit; the standard library's parser recurses once
#: per level, so ~1,500 levels (3 KB of parentheses) end in RecursionError. Nobody nests more
#: than two or three.
MAX_COMMENT_NESTING = 16


def _comment_nesting(value: str) -> int:
    """How deep the comments in an address header nest (quoted strings and quoted pairs are
    skipped as RFC 5322 §3.2.1–§3.2.4 read them)."""
    deepest = depth = 0
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")" and depth:
            depth -= 1
    return deepest


def _parse_single_address(value: str, header: str) -> str:
    nesting = _comment_nesting(value)
    if nesting > MAX_COMMENT_NESTING:
        raise HeaderCountError(
            f"{header} nests comments {nesting} deep, more than {MAX_COMMENT_NESTING}; "
            "write the address without comments (RFC 5322 §3.4)"
        )
    try:
        parsed = _registry(header.lower(), value)
        addresses = [a for group in parsed.groups for a in group.addresses]  # type: ignore[attr-defined]
    except (IndexError, AttributeError, ValueError, TypeError, HeaderParseError):
        # The standard library's address parser raises these on some malformed input.
        raise HeaderCountError(
            f"{header} {_shorten(value)!r} is not a valid mailbox (RFC 5322 §3.4)"
        ) from None
    if len(addresses) != 1 or parsed.defects or not addresses[0].domain:
        raise HeaderCountError(
            f"{header} must name exactly one valid mailbox, found {len(addresses)} "
            "(RFC 5322 §3.6.2)"
        )
    return f"{addresses[0].username}@{addresses[0].domain.lower()}"


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
