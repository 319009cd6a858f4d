"""Between element trees and payload values: reading (after XSD validation) and writing.

Reading assumes the tree has passed the category XSD; what XSD cannot check (real calendar
dates inside ``DocumentId``) raises :class:`Invalid` carrying the element, so the caller can
say where. Writing emits elements in XSD order, in :data:`formats.xsd.NAMESPACE`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import TypeVar
from uuid import UUID

from lxml import etree

from formats import wording_vi
from formats.categories import CATEGORIES, VERBATIM_KINDS, Category, Field, Value
from formats.payload_model import (
    Attachment,
    Business,
    DocumentId,
    Exchange,
    Header,
    Organ,
    Record,
    Signer,
    shared_names,
)
from formats.xsd import NAMESPACE

_NS = "{" + NAMESPACE + "}"
_DATE = Field("Date", "date", "a date of the header or exchange")
Parts = tuple[Header, Exchange, tuple[Record, ...], tuple[Attachment, ...]]
_V = TypeVar("_V")


class Invalid(Exception):
    """What is wrong with ``element``, in English and in Vietnamese (the receipt's two)."""

    def __init__(self, element: etree._Element, message: str, message_vi: str) -> None:
        super().__init__(message)
        self.element = element
        self.message = message
        self.message_vi = message_vi


def text_of(element: etree._Element) -> str:
    if len(element) == 0:  # no child nodes (comments and PIs count as children): fast path
        return element.text or ""
    parts = element.xpath("text()")
    return "".join(str(p) for p in parts) if isinstance(parts, list) else ""


class _Children:
    """An element's child elements by name, the first of each, found in one pass over them
    (``find`` per name walked them again, and read its path, each time: 2–3 µs a field, a
    third of reading a small payload). The XSD has made sure which there are, and in what
    order; the readers only look them up."""

    __slots__ = ("by_tag", "parent")

    def __init__(self, parent: etree._Element) -> None:
        self.parent = parent
        self.by_tag: dict[object, etree._Element] = {}
        for child in parent:
            self.by_tag.setdefault(child.tag, child)  # (a comment's tag is not a name)

    def get(self, name: str) -> etree._Element | None:
        return self.by_tag.get(_NS + name)

    def opt(self, name: str) -> str | None:
        element = self.by_tag.get(_NS + name)
        return None if element is None else text_of(element)

    def req(self, name: str) -> str:
        element = self.by_tag.get(_NS + name)
        if element is None:  # the XSD has already made sure it is there
            raise Invalid(self.parent, f"{name} is missing", f"thiếu {name}")
        return text_of(element)

    def doc_id(self, name: str) -> DocumentId | None:
        return self._parsed(name, DocumentId.parse, wording_vi.not_document_id)

    def date(self, name: str) -> date | None:
        # xs:date collapses whitespace, so the XSD lets "2024-03-16\n" through; a record's date
        # field refuses it (Field.parse), and so does this.
        value = self._parsed(
            name, _DATE.parse, lambda field, text: wording_vi.not_value(field, text, "date")
        )
        assert value is None or isinstance(value, date)
        return value

    def _parsed(
        self, name: str, parse: Callable[[str], _V], said_vi: Callable[[str, str], str]
    ) -> _V | None:
        """Field ``name``'s text read by ``parse``, or ``None`` if it is absent; a text it
        refuses is :class:`Invalid` at that element (``said_vi``: the Vietnamese of it)."""
        element = self.by_tag.get(_NS + name)
        if element is None:
            return None
        text = text_of(element)
        try:
            return parse(text)
        except ValueError as err:
            raise Invalid(element, f"{name}: {err}", said_vi(name, text)) from None


def _organ(element: etree._Element) -> Organ:
    kids = _Children(element)
    return Organ(kids.req("OrganId"), kids.opt("OrganName"), kids.opt("Email"))


def read_parts(root: etree._Element, category: Category) -> Parts:
    parts = _Children(root)
    head, exchange, body = parts.get("Header"), parts.get("Exchange"), parts.get("Body")
    # The XSD has made sure all three are there.
    assert head is not None
    assert exchange is not None
    assert body is not None
    reader = RecordReader(category)
    records = tuple(reader.read(el) for el in body.iterfind(reader.tag))
    listed = parts.get("Attachments")
    attachments = (
        ()
        if listed is None
        else tuple(read_attachment(el) for el in listed.iterfind(f"{_NS}Attachment"))
    )
    return read_header(head), read_exchange(exchange, category), records, attachments


def read_header(head: etree._Element) -> Header:
    kids = _Children(head)
    signer_el = kids.get("SignerInfo")
    document_id = kids.doc_id("DocumentId")
    sender = kids.get("From")
    if document_id is None or sender is None:  # the XSD has made sure both are there
        raise Invalid(head, "DocumentId or From is missing", "thiếu DocumentId hoặc From")
    signer = None if signer_el is None else _Children(signer_el)
    return Header(
        message_id=UUID(kids.req("MessageId")),
        sender=_organ(sender),
        recipients=tuple(_organ(el) for el in head.iterfind(f"{_NS}To")),
        document_id=document_id,
        subject=kids.req("Subject"),
        business=Business(int(kids.req("Business"))),
        signer=None if signer is None else Signer(signer.req("FullName"), signer.opt("Position")),
        response_for=kids.doc_id("ResponseFor"),
        due_date=kids.date("DueDate"),
        replaces=kids.doc_id("ReplacesDocumentId"),
        schema_version=kids.req("SchemaVersion"),
    )


def read_exchange(exchange: etree._Element, category: Category) -> Exchange:
    kids = _Children(exchange)
    return Exchange(
        category=category.code,
        cadence=kids.req("Cadence"),
        legal_basis=kids.req("LegalBasis"),
        period_start=kids.date("PeriodStart"),
        period_end=kids.date("PeriodEnd"),
        request_ref=kids.opt("RequestRef"),
    )


def read_attachment(element: etree._Element) -> Attachment:
    kids = _Children(element)
    return Attachment(
        kids.req("Name"), kids.req("MediaType"), int(kids.req("Size")), kids.req("Sha256")
    )


class RecordReader:
    """Reads one category's record elements (XSD-valid) into compact :class:`Record` s.

    Field elements are looked up by their full tag in a table built once per reader, with how
    each one's text becomes its value (:func:`_converter`); every record with the same fields
    present shares one name tuple (:func:`shared_names`), and a value from a closed set is
    shared, so a record holds only what is its own. A reader is for one document: its country
    codes are not kept beyond it. (The stream reads a record before the validator has said its
    last word; what it read is thrown away if the validator refuses.)
    """

    __slots__ = ("_fields", "_shapes", "tag")

    def __init__(self, category: Category) -> None:
        #: Tag of the record element, ``{namespace}WorkPermit``.
        self.tag = f"{_NS}{category.record_element}"
        self._fields = {
            f"{_NS}{f.name}": (1 << i, f, _converter(f)) for i, f in enumerate(category.fields)
        }
        self._shapes: dict[int, tuple[str, ...]] = {}

    def read(self, element: etree._Element) -> Record:
        values: list[Value] = []
        shape = 0
        for child in element:
            known = self._fields.get(child.tag)
            if known is None:
                if isinstance(child.tag, str):  # not a comment: an element the XSD forbids
                    name = etree.QName(child).localname
                    raise Invalid(
                        child,
                        f"{name} is not a field",
                        f"{name} không phải là trường của loại thông tin này",
                    )
                continue
            bit, field, convert = known
            if shape >= bit:  # repeated or out of order: the XSD forbids it
                raise Invalid(
                    child,
                    f"{field.name} is repeated or out of order",
                    f"{field.name} bị lặp lại hoặc sai thứ tự",
                )
            text = (child.text or "") if len(child) == 0 else text_of(child)
            if convert is None:
                values.append(text)
            else:
                try:
                    values.append(convert(text))
                except ValueError as err:
                    raise Invalid(
                        child,
                        f"{field.name}: {err}",
                        wording_vi.not_value(field.name, text, field.kind, field.choices),
                    ) from None
            shape |= bit
        names = self._shapes.get(shape)
        if names is None:
            names = self._shapes[shape] = shared_names(
                tuple(f.name for bit, f, _ in self._fields.values() if shape & bit)
            )
        return Record.from_shared(names, tuple(values))


def _converter(field: Field) -> Callable[[str], Value] | None:
    """How a field's text becomes its value; ``None``: the text is the value.

    A field of a :data:`~formats.categories.VERBATIM_KINDS` kind is its text, which the XSD has
    checked. Where the values come from a small closed set, one string per value is shared:
    enumerations are the category's own choices; country and currency codes are three capital
    letters (at most 17,576, a few dozen in practice) and are shared as they are met. The
    other kinds are converted by :meth:`Field.parser`.
    """
    if field.kind == "enum":
        return _Shared({choice: choice for choice in field.choices}).__getitem__
    if field.kind in ("country", "currency"):
        return _Shared().__getitem__
    return None if field.kind in VERBATIM_KINDS else field.parser()


class _Shared(dict[str, str]):
    """Strings by value: ``shared[text]`` is the first string equal to ``text`` it was given."""

    def __missing__(self, text: str) -> str:
        self[text] = text
        return text


def element_at(root: etree._Element, path: str) -> etree._Element:
    """The element at ``Header/DueDate``-style ``path``, or the nearest existing ancestor."""
    element = root
    for name in path.split("/"):
        child = element.find(f"{_NS}{name}")
        if child is None:
            break
        element = child
    return element


def _add(parent: etree._Element, name: str, text: object | None) -> etree._Element:
    element = etree.SubElement(parent, f"{_NS}{name}")
    if text is not None:
        element.text = str(text)
    return element


def _add_opt(parent: etree._Element, name: str, text: object | None) -> None:
    if text is not None:
        _add(parent, name, text)


def _add_organ(parent: etree._Element, name: str, organ: Organ) -> None:
    element = _add(parent, name, None)
    _add(element, "OrganId", organ.organ_id)
    _add_opt(element, "OrganName", organ.name)
    _add_opt(element, "Email", organ.email)


def write_parts(parts: Parts) -> etree._Element:
    h, x, records, attachments = parts
    root = etree.Element(f"{_NS}Payload", nsmap={None: NAMESPACE})  # type: ignore[dict-item]
    head = _add(root, "Header", None)
    _add(head, "MessageId", h.message_id)
    _add(head, "SchemaVersion", h.schema_version)
    _add_organ(head, "From", h.sender)
    for organ in h.recipients:
        _add_organ(head, "To", organ)
    _add(head, "DocumentId", h.document_id)
    _add(head, "Subject", h.subject)
    if h.signer is not None:
        signer = _add(head, "SignerInfo", None)
        _add(signer, "FullName", h.signer.full_name)
        _add_opt(signer, "Position", h.signer.position)
    _add_opt(head, "ResponseFor", h.response_for)
    _add_opt(head, "DueDate", h.due_date)
    _add(head, "Business", int(h.business))
    _add_opt(head, "ReplacesDocumentId", h.replaces)
    exchange = _add(root, "Exchange", None)
    _add(exchange, "LegalBasis", x.legal_basis)
    _add(exchange, "Category", x.category)
    _add(exchange, "Cadence", x.cadence)
    _add_opt(exchange, "PeriodStart", x.period_start)
    _add_opt(exchange, "PeriodEnd", x.period_end)
    _add_opt(exchange, "RequestRef", x.request_ref)
    body = _add(root, "Body", None)
    category = CATEGORIES.get(x.category)
    element_name = category.record_element if category else "Record"
    for record in records:
        element = _add(body, element_name, None)
        for name, value in record.fields:
            text = category.field(name).format(value) if category else str(value)
            _add(element, name, text)
    if attachments:
        manifest = _add(root, "Attachments", None)
        for a in attachments:
            entry = _add(manifest, "Attachment", None)
            for name, value in (
                ("Name", a.name),
                ("MediaType", a.media_type),
                ("Size", a.size),
                ("Sha256", a.sha256),
            ):
                _add(entry, name, value)
    return root
