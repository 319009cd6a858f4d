"""Reading a payload as a stream: validated while it is parsed, one record at a time.

The tree path (:func:`formats.xmlsafe.parse_xml`, the XSD, :func:`formats.payload_xml.read_parts`)
holds the whole element tree, about ten times the XML's size, beside the records it builds.
This path holds the header and one chunk's worth of records; it is slower (libxml2 validates
while parsing at about a third of the speed it validates a tree), so ``Payload.from_xml`` takes
it only for payloads over ``WHOLE_TREE_BYTES``. Its plan, the happy path for those (the caller
has already run :func:`formats.xmlsafe.check_bytes`: size, UTF-8, no DOCTYPE or entity
declaration):

1. the *reader*, a hardened pull parser (:func:`formats.xmlsafe.pull_parser`, with exactly the
   settings of ``parse_xml`` and no schema), is fed :data:`CHUNK` bytes at a time and reports
   the end of ``Header``, ``Exchange``, ``Attachments`` and of every category's record element;
2. when ``Exchange`` ends the category is known, and the *validator* starts: a second hardened
   pull parser with that category's XSD plugged in, so that libxml2 validates each element as
   it is parsed, fed the same bytes (catching up at once). Two parsers because, with a schema
   plugged in, libxml2 reports parse errors to the validation context instead of to lxml, and
   lxml then takes a truncated or namespace-broken document for well-formed: the reader, with
   no schema, sees every such error exactly as ``parse_xml`` does;
3. each record is read when it ends; then, in both trees, it is cleared and the elements
   before it are deleted, so neither tree holds more than the records of one chunk;
4. what ``parse_xml`` step 5 refuses: processing instructions (``pi`` events), XInclude (an
   XInclude element needs its namespace declared: ``start-ns`` events), a DOCTYPE or an
   encoding other than UTF-8 (the docinfo, at the end). Entity references cannot occur: with
   no DTD every one but the five predefined is a well-formedness error;
5. depth (step 6): the category XSDs nest :data:`PAYLOAD_DEPTH` deep at most (a record is a
   flat sequence of simple-typed fields), so a valid document is within any depth limit of
   at least that; a smaller limit is left to the tree path;
6. closing the validator raises any schema error, and it must have seen ``Payload`` end; the
   root must be ``Payload``, with ``Header`` and ``Exchange``.

Anything else raises :class:`Fallback`, and the caller reads the document with the tree path:
errors are reported by the code that locates them (line, column, every XSD problem), and the
stream accepts nothing the tree path would refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from lxml import etree

from formats.categories import CATEGORIES, Category
from formats.errors import XmlForbidden
from formats.limits import Limits
from formats.payload_model import Attachment, Exchange, Header, Record
from formats.payload_xml import (
    Invalid,
    Parts,
    RecordReader,
    read_attachment,
    read_exchange,
    read_header,
    text_of,
)
from formats.xmlsafe import XINCLUDE_NAMESPACES, check_docinfo, pull_parser
from formats.xsd import NAMESPACE, load_schema

#: Bytes fed to the parsers at a time: a tree holds at most about this much XML's records.
CHUNK: Final = 16 * 1024
#: Payload/Header/From/OrganId, Payload/Body/<record>/<field>: the deepest any XSD allows.
PAYLOAD_DEPTH: Final = 4

_NS = "{" + NAMESPACE + "}"
_PAYLOAD, _HEADER, _EXCHANGE = f"{_NS}Payload", f"{_NS}Header", f"{_NS}Exchange"
_BODY, _CATEGORY, _ATTACHMENTS = f"{_NS}Body", f"{_NS}Category", f"{_NS}Attachments"
#: The record elements of every category (the reader is told before it knows the category).
_RECORD_TAGS: Final = frozenset(f"{_NS}{c.record_element}" for c in CATEGORIES.values())
#: What the stream may raise while reading a document the tree path will explain.
_DOUBTS = (etree.LxmlError, Invalid, ValueError, XmlForbidden)

#: Called with the parent of the records after each one is pruned, in either tree (for tests).
Observer = Callable[[etree._Element], None]


class Fallback(Exception):
    """The stream cannot vouch for this document: read it with the tree path instead."""


def read_stream(data: bytes, *, limits: Limits, observe: Observer | None = None) -> Parts:
    """The parts of ``data`` (which passed ``check_bytes``), or :class:`Fallback`."""
    if limits.max_xml_depth < PAYLOAD_DEPTH:
        raise Fallback("the depth limit is below the payload's own depth")
    try:
        return _Stream(observe).read(data)
    except _DOUBTS as err:
        raise Fallback(str(err)) from err


class _Stream:
    """The plan for one document: the reader's events, and the validator behind it."""

    def __init__(self, observe: Observer | None) -> None:
        self._observe = observe
        self._category: Category | None = None
        self._reader: RecordReader | None = None
        self._validator: _Validator | None = None
        self._header: Header | None = None
        self._exchange: Exchange | None = None
        self._body: etree._Element | None = None
        self._records: list[Record] = []
        self._attachments: tuple[Attachment, ...] = ()

    def read(self, data: bytes) -> Parts:
        parser = pull_parser(
            events=("end", "start-ns", "pi"),
            tag=(_HEADER, _EXCHANGE, _ATTACHMENTS, *_RECORD_TAGS),
        )
        for at in range(0, len(data), CHUNK):
            parser.feed(data[at : at + CHUNK])
            self._take(parser.read_events())
            if self._validator is not None:
                self._validator.catch_up(data, at + CHUNK)
        root = parser.close()  # raises what is not well-formed
        self._take(parser.read_events())
        if root is None:  # lxml may answer "no element at all" so rather than raise
            raise Fallback("no root element")
        check_docinfo(root.getroottree())
        if self._validator is None or self._header is None or self._exchange is None:
            raise Fallback("no Header, Exchange or category")
        self._validator.close(data)  # raises what is not valid
        if root.tag != _PAYLOAD:
            raise Fallback("the root is not Payload")
        return self._header, self._exchange, tuple(self._records), self._attachments

    def _take(self, events: Iterable[tuple[str, Any]]) -> None:
        for event, item in events:
            if event == "end":
                if item.tag in _RECORD_TAGS:
                    self._record(item)
                else:
                    self._part(item)
            elif event == "start-ns":
                if item[1] in XINCLUDE_NAMESPACES:
                    raise Fallback("XInclude namespace declared")
            else:
                raise Fallback("processing instruction")

    def _record(self, element: etree._Element) -> None:
        if self._reader is None or element.tag != self._reader.tag:
            raise Fallback("a record before the category, or of another category")
        body = self._body
        if body is None:
            body = self._body = element.getparent()
            if body is None or body.tag != _BODY or not _is_top(body):
                raise Fallback("record outside Body")
        elif element.getparent() is not body:
            raise Fallback("record outside Body")
        self._records.append(self._reader.read(element))
        _prune(element, body, self._observe)

    def _part(self, element: etree._Element) -> None:
        if not _is_top(element):
            raise Fallback(f"{element.tag} out of place")
        if element.tag == _HEADER:
            self._header = read_header(element)
        elif element.tag == _EXCHANGE:
            found = element.find(_CATEGORY)
            category = None if found is None else CATEGORIES.get(text_of(found))
            if category is None or self._category is not None:
                raise Fallback("the category is missing or unknown")
            self._category = category
            self._reader = RecordReader(category)
            self._validator = _Validator(category, self._observe)
            self._exchange = read_exchange(element, category)
        else:
            self._attachments = tuple(
                read_attachment(el) for el in element.iterfind(f"{_NS}Attachment")
            )


class _Validator:
    """A parser with the category's XSD plugged in, fed what the reader has been fed."""

    def __init__(self, category: Category, observe: Observer | None) -> None:
        self._record_tag = f"{_NS}{category.record_element}"
        self._parser = pull_parser(
            events=("end",), tag=(self._record_tag, _PAYLOAD), schema=load_schema(category.xsd)
        )
        self._observe = observe
        self._fed = 0
        self._ended = False

    def catch_up(self, data: bytes, end: int) -> None:
        while self._fed < min(end, len(data)):
            self._parser.feed(data[self._fed : self._fed + CHUNK])
            self._fed += CHUNK
            self._take(self._parser.read_events())

    def close(self, data: bytes) -> None:
        self.catch_up(data, len(data))
        self._parser.close()  # raises the schema errors, if any
        self._take(self._parser.read_events())
        if not self._ended:
            raise Fallback("the validator did not see the document end")

    def _take(self, events: Iterable[tuple[str, Any]]) -> None:
        for _, element in events:
            if element.tag == _PAYLOAD:
                self._ended = True
                continue
            parent = element.getparent()
            if parent is not None:
                _prune(element, parent, self._observe)


def _prune(element: etree._Element, parent: etree._Element, observe: Observer | None) -> None:
    """Clear a record that has been read and delete what precedes it (records, comments)."""
    # The parser may still be writing the tail (whitespace after the end tag): keep it.
    element.clear(keep_tail=True)  # type: ignore[call-arg]  # the stubs lack keep_tail
    while (previous := element.getprevious()) is not None:
        parent.remove(previous)
    if observe is not None:
        observe(parent)


def _is_top(element: etree._Element) -> bool:
    """A child of the root element."""
    parent = element.getparent()
    return parent is not None and parent.getparent() is None
