"""Hardened XML parsing: the only way a payload's bytes become an element tree.

DESIGN §4: "XML is parsed only with a hardened parser: no DOCTYPE at all (refuse), no entities,
no network, no XInclude, ``huge_tree=False``, size and depth limits". The plan, in order:

1. size: more than ``limits.max_xml_bytes`` bytes → :class:`LimitExceeded`, before parsing;
2. encoding: payloads are UTF-8; a NUL byte (UTF-16/32) → :class:`XmlForbidden`. Being ASCII
   compatible is what lets step 3 see markup in the raw bytes;
3. ``<!DOCTYPE`` or ``<!ENTITY`` anywhere → :class:`XmlForbidden`, so no DTD (billion laughs,
   XXE) ever reaches libxml2;
4. parse with libxml2 told to load no DTD, resolve no entity, use no network and keep its
   built-in caps (``huge_tree=False``: text nodes ≤ 10 MB, depth ≤ 256). Not well-formed →
   :class:`XmlMalformed` with line and column; a libxml2 cap → :class:`LimitExceeded`;
5. belt and braces on the tree: any DOCTYPE, entity reference, processing instruction or
   XInclude element → :class:`XmlForbidden`; a declared encoding other than UTF-8 →
   :class:`XmlForbidden`;
6. depth deeper than ``limits.max_xml_depth`` (the root is depth 1) → :class:`LimitExceeded`,
   counted without recursion.

XInclude is never *processed* (we never call ``xinclude()``); step 5 refuses it outright so a
payload cannot even ask for it.

:func:`check_bytes` (steps 1-3) and :func:`pull_parser` (step 4's parser, for streaming) let
:mod:`formats.payload_stream` read a payload without building its whole tree; it keeps steps 5
and 6 itself and defers to :func:`parse_xml` whenever anything is amiss.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any, Final, Literal, cast

from lxml import etree

from formats import wording_vi
from formats.errors import LimitExceeded, XmlForbidden, XmlMalformed
from formats.limits import DEFAULT_LIMITS, Limits

XINCLUDE_NAMESPACES = frozenset(
    {"http://www.w3.org/2001/XInclude", "http://www.w3.org/2003/XInclude"}
)
#: Any element in an XInclude namespace, as ``Element.iter`` takes it.
_XINCLUDE_ANY: Final = tuple(f"{{{ns}}}*" for ns in sorted(XINCLUDE_NAMESPACES))
#: libxml2 messages that mean "a built-in resource cap was hit", not "bad syntax".
_LIBXML_CAPS = ("XML_PARSE_HUGE", "Resource limit exceeded", "Excessive depth", "huge text")
#: libxml2 messages about entities (undeclared references, amplification, external loads).
_LIBXML_ENTITIES = ("Entity '", "amplification", "network entity", "PEReference", "entity loop")


#: Step 4: load no DTD, resolve no entity, use no network, keep libxml2's built-in caps.
_HARDENED: Final[dict[str, Any]] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "dtd_validation": False,
    "attribute_defaults": False,
    "huge_tree": False,
    "remove_comments": False,
    "remove_pis": False,
    "collect_ids": False,
    "strip_cdata": True,
}


def _parser() -> etree.XMLParser:
    # A fresh parser per call: lxml parsers are not safe to share between threads.
    return etree.XMLParser(**_HARDENED)


def pull_parser(
    *,
    events: Sequence[Literal["start", "end", "start-ns", "end-ns", "comment", "pi"]],
    tag: Sequence[str] | None = None,
    schema: etree.XMLSchema | None = None,
) -> etree.XMLPullParser:
    """A fresh incremental parser with step 4's settings; ``schema`` validates as it parses.

    The caller feeds it bytes that passed :func:`check_bytes` and must itself refuse what step
    5 refuses: ask for ``"pi"`` and ``"start-ns"`` events (an XInclude element needs its
    namespace declared) and check the ``docinfo`` at the end. libxml2 reports schema errors
    only when the parser is closed.
    """
    return etree.XMLPullParser(
        events=events,
        tag=tag,
        schema=schema,
        **_HARDENED,
    )


def check_bytes(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> None:
    """Steps 1-3 on the raw bytes: size, UTF-8 and no DOCTYPE or entity declaration."""
    if len(data) > limits.max_xml_bytes:
        raise LimitExceeded(
            f"XML payload is {len(data)} bytes, over the limit of {limits.max_xml_bytes}; "
            "split the records over several messages"
        )
    _refuse_in_bytes(data)


def parse_xml(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> etree._Element:
    """Parse ``data`` with every protection of DESIGN §4, or raise a typed error.

    Returns the root element. Raises :class:`LimitExceeded`, :class:`XmlForbidden` or
    :class:`XmlMalformed`; never anything else for any input bytes.
    """
    check_bytes(data, limits=limits)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as err:
        raise _syntax_error(err) from None
    tree = root.getroottree()
    _refuse_in_tree(tree)
    _check_depth(root, limits.max_xml_depth)
    return root


def _refuse_in_bytes(data: bytes) -> None:
    if b"\x00" in data:
        raise XmlForbidden(
            "XML payload is not UTF-8 (it contains NUL bytes, as UTF-16 or UTF-32 would); "
            "encode it as UTF-8",
            message_vi="dữ liệu XML không mã hóa UTF-8 (có byte NUL, như UTF-16 hay UTF-32); "
            "hãy lưu tệp ở dạng UTF-8",
        )
    for marker, what in ((b"<!DOCTYPE", "a DOCTYPE declaration"), (b"<!ENTITY", "an entity")):
        at = data.find(marker)
        if at >= 0:
            line, column = _position(data, at)
            raise XmlForbidden(
                f"line {line}, column {column}: XML payload contains {what}; DTDs and "
                "entities are refused (DESIGN §4), remove the DOCTYPE",
                message_vi=f"{wording_vi.where(line, column)}: dữ liệu XML có khai báo DOCTYPE "
                "hoặc thực thể (entity), là những cấu trúc bị cấm; hãy bỏ khai báo DOCTYPE",
            )


def _position(data: bytes, offset: int) -> tuple[int, int]:
    line = data.count(b"\n", 0, offset) + 1
    start = data.rfind(b"\n", 0, offset) + 1
    column = len(data[start:offset].decode("utf-8", "replace")) + 1
    return line, column


def _syntax_error(err: etree.XMLSyntaxError) -> LimitExceeded | XmlForbidden | XmlMalformed:
    line, column = err.position
    text = err.msg or str(err)
    # libxml2 appends ", line L, column C" itself; keep one copy of it, ours, in front.
    text = text.split(", line ")[0]
    if any(cap in text for cap in _LIBXML_CAPS):
        # The parser's own wording names internal switches; say what the limit means instead.
        what = (
            "a text node is larger than 10 MB"
            if "ext node" in text or "huge text" in text
            else ("elements are nested beyond the depth limit")
        )
        return LimitExceeded(
            f"line {line}, column {column}: XML payload exceeds a parser limit ({what}); "
            "no text node may exceed 10 MB and nesting is capped — send attachments separately"
        )
    if any(marker in text for marker in _LIBXML_ENTITIES):
        return XmlForbidden(
            f"line {line}, column {column}: XML payload uses an entity ({text}); entities are "
            "refused, write the characters themselves or use &#NNNN; character references",
            message_vi=f"{wording_vi.where(line, column)}: dữ liệu XML "
            f"{wording_vi.parse_problem(text) or 'dùng thực thể (entity)'}, là cấu trúc bị cấm; "
            "hãy viết thẳng ký tự, hoặc dùng dạng &#NNNN;",
        )
    # Where the parser noticed the fault, which may be after the fault itself (a tag left open
    # is noticed where another closes).
    said = wording_vi.parse_problem(text) or f"bộ đọc XML báo: {text}"
    return XmlMalformed(
        f"line {line}, column {column}: XML is not well-formed: {text}",
        message_vi=f"{wording_vi.where(line, column)}: XML sai cú pháp, phát hiện tại đây: {said}",
    )


def check_docinfo(tree: etree._ElementTree) -> None:
    """Step 5 on the document's prolog: no DOCTYPE, and UTF-8 if an encoding is declared."""
    info = tree.docinfo
    if getattr(info, "doctype", "") or info.internalDTD is not None or info.externalDTD is not None:
        raise XmlForbidden(
            "XML payload declares a DOCTYPE; DTDs are refused (DESIGN §4)",
            message_vi="dữ liệu XML có khai báo DOCTYPE, là cấu trúc bị cấm; hãy bỏ khai báo đó",
        )
    encoding = (info.encoding or "UTF-8").upper()
    if encoding not in ("UTF-8", "UTF8"):
        raise XmlForbidden(
            f"XML payload declares encoding {info.encoding}; payloads must be UTF-8, "
            're-encode it and declare encoding="UTF-8"',
            message_vi=f"dữ liệu XML khai báo bảng mã {info.encoding}; dữ liệu phải ở dạng "
            'UTF-8: hãy lưu lại ở UTF-8 và khai báo encoding="UTF-8"',
        )


def _refuse_in_tree(tree: etree._ElementTree) -> None:
    check_docinfo(tree)
    root = tree.getroot()
    for sibling in (*root.itersiblings(preceding=True), *root.itersiblings()):
        if isinstance(sibling, etree._ProcessingInstruction):
            raise _pi_error(sibling)
    for node in root.iter(etree.Entity, etree.ProcessingInstruction):
        if isinstance(node, etree._ProcessingInstruction):
            raise _pi_error(node)
        raise XmlForbidden(
            f"line {node.sourceline}: XML payload contains the entity reference {node.text}; "
            "entities are refused, write the characters themselves",
            message_vi=f"dòng {node.sourceline}: dữ liệu XML dùng thực thể {node.text}, là cấu "
            "trúc bị cấm; hãy viết thẳng ký tự",
        )
    element = next(root.iter(*_XINCLUDE_ANY), None)  # the root included; a walk in C
    if element is not None:
        raise XmlForbidden(
            f"line {element.sourceline}: XML payload contains an XInclude element; "
            "XInclude is refused, put the content in the payload or attach it",
            message_vi=f"dòng {element.sourceline}: dữ liệu XML có phần tử XInclude, là cấu trúc "
            "bị cấm; hãy đưa nội dung vào dữ liệu hoặc gửi kèm thành tệp đính kèm",
        )


def _pi_error(node: etree._Element) -> XmlForbidden:
    target = getattr(node, "target", "?")
    return XmlForbidden(
        f"line {node.sourceline}: XML payload contains the processing instruction <?{target}?>; "
        "processing instructions are refused, remove it",
        message_vi=f"dòng {node.sourceline}: dữ liệu XML có chỉ thị xử lý <?{target}?>, là cấu "
        "trúc bị cấm; hãy bỏ chỉ thị đó",
    )


def _check_depth(root: etree._Element, max_depth: int) -> None:
    deeper = cast(list[etree._Element], _deeper_than(max_depth)(root))  # in document order
    if deeper:
        raise LimitExceeded(
            f"line {deeper[0].sourceline}: XML nesting is deeper than the limit of "
            f"{max_depth} levels; flatten the structure"
        )


@cache
def _deeper_than(max_depth: int) -> etree.XPath:
    """The elements at depth ``max_depth + 1`` (the root is depth 1): ``*/*/…/*`` from the
    root, ``max_depth`` steps, which libxml2 walks level by level without recursion. Shared
    between threads safely: lxml runs one evaluation of an ``XPath`` object at a time."""
    return etree.XPath("/".join(["*"] * max_depth))
