"""The payload as a frozen value: parsed once from XML, checked, and written back.

``Payload.from_xml`` is the one way in (STYLE habit 7). Its plan:

1. hardened parse (:func:`formats.xmlsafe.parse_xml`: size, DOCTYPE, entities, depth);
2. the root must be ``Payload`` in :data:`NAMESPACE`; ``Exchange/Category`` picks the XSD,
   an unknown category is :class:`SchemaInvalid` naming the known ones;
3. validate against that category's XSD (errors with line and column);
4. build the frozen value;
5. check the rules XSD 1.0 cannot state (:func:`rule_violations`), located like XSD errors.

Up to :data:`WHOLE_TREE_BYTES` the plan runs as written: the whole tree is the quickest road
(libxml2 validates a tree about three times as fast as it validates while parsing) and costs
about ten times the XML's size in memory while it lasts. A larger payload takes a road that
holds no whole tree: :mod:`formats.payload_stream` does steps 1 to 4 while parsing (memory
grows with the records, not with an element tree of the document), then step 5 runs on the
value. The plan above, on the whole tree, runs only when the stream finds something wrong, to
say exactly what and where.

``Payload.to_xml`` writes UTF-8 with an XML declaration, and
``Payload.from_xml(p.to_xml()) == p`` for every valid payload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Final
from uuid import UUID

from lxml import etree

from formats.categories import CATEGORIES, Category, Value
from formats.errors import InputError, SchemaInvalid
from formats.limits import DEFAULT_LIMITS, Limits
from formats.payload_model import (
    LEGAL_BASIS,
    SCHEMA_VERSION,
    Attachment,
    Business,
    DocumentId,
    Exchange,
    Header,
    Organ,
    Record,
    Signer,
)
from formats.payload_rules import monthly_period, rule_violations
from formats.payload_stream import Fallback, read_stream
from formats.payload_xml import Invalid, element_at, read_parts, text_of, write_parts
from formats.xmlsafe import check_bytes, parse_xml
from formats.xsd import NAMESPACE, load_schema, located, located_pair, validate

__all__ = [
    "LEGAL_BASIS",
    "NAMESPACE",
    "SCHEMA_VERSION",
    "Attachment",
    "Business",
    "DocumentId",
    "Exchange",
    "Header",
    "Organ",
    "Payload",
    "Record",
    "Signer",
    "build_payload",
    "monthly_period",
    "rule_violations",
]

_NS = "{" + NAMESPACE + "}"
#: Payloads up to this size are read as a whole tree (at most about 11 MiB of it), larger ones
#: as a stream (module docstring).
WHOLE_TREE_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Payload:
    header: Header
    exchange: Exchange
    records: tuple[Record, ...] = ()
    attachments: tuple[Attachment, ...] = ()

    @property
    def category(self) -> Category:
        return CATEGORIES[self.exchange.category]

    @classmethod
    def from_xml(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Payload:
        """Parse, validate and check ``data`` (plan in the module docstring)."""
        check_bytes(data, limits=limits)
        if len(data) <= WHOLE_TREE_BYTES:
            return cls._from_tree(data, limits)
        try:
            payload = cls(*read_stream(data, limits=limits))
        except Fallback:
            return cls._from_tree(data, limits)
        if rule_violations(payload):
            return cls._from_tree(data, limits)  # to locate them
        return payload

    @classmethod
    def _from_tree(cls, data: bytes, limits: Limits) -> Payload:
        """The plan of the module docstring on the whole tree, with located errors."""
        root = parse_xml(data, limits=limits)
        if root.tag != f"{_NS}Payload":
            raise _invalid(root, data, (
                f"the root element is {root.tag}, expected Payload in namespace "
                f"{NAMESPACE}; this is not an official-mail payload"
            ), (
                f"phần tử gốc là {root.tag}, cần Payload trong không gian tên {NAMESPACE}; "
                "đây không phải dữ liệu trao đổi văn bản chính thức"
            ))  # fmt: skip
        found = root.find(f"{_NS}Exchange/{_NS}Category")
        if found is None:
            raise _invalid(
                root, data, "Exchange/Category is missing; add it", "thiếu Exchange/Category"
            )
        code = text_of(found)
        if code not in CATEGORIES:
            known = ", ".join(CATEGORIES)
            raise _invalid(found, data, f"unknown category {code!r}; known: {known}", (
                f"không có loại thông tin {code!r}; các loại thông tin: {known}"
            ))  # fmt: skip
        category = CATEGORIES[code]
        validate(root, load_schema(category.xsd), data)
        try:
            payload = cls(*read_parts(root, category))
        except Invalid as bad:
            raise _invalid(bad.element, data, bad.message, bad.message_vi) from None
        violations = rule_violations(payload)
        if violations:
            first = violations[0]
            english, vietnamese = located_pair(
                element_at(root, first.path), data, first.message, first.message_vi
            )
            problems = [english] + [
                located(element_at(root, v.path), data, v.message) for v in violations[1:]
            ]
            raise SchemaInvalid(english, detail="\n".join(problems), message_vi=vietnamese)
        return payload

    def to_xml(self) -> bytes:
        """UTF-8 XML with declaration; ``Payload.from_xml`` gives this value back."""
        try:
            root = write_parts((self.header, self.exchange, self.records, self.attachments))
        except ValueError as err:  # lxml refuses text XML cannot carry (control characters)
            raise SchemaInvalid(f"payload cannot be written as XML: {err}") from None
        return bytes(
            etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
        )


def _invalid(
    element: etree._Element, source: bytes, message: str, message_vi: str
) -> SchemaInvalid:
    """A fault of ``element``, located in ``source`` (line, column) in both languages."""
    english, vietnamese = located_pair(element, source, message, message_vi)
    return SchemaInvalid(english, detail=english, message_vi=vietnamese)


# --- building --------------------------------------------------------------------------------


def build_payload(
    category: str,
    *,
    sender: Organ,
    recipients: Sequence[Organ],
    records: Iterable[Record | Mapping[str, Value | None]],
    document_number: str,
    issued_on: date,
    message_id: UUID,
    subject: str | None = None,
    period: str | None = None,
    cadence: str | None = None,
    period_start: date | None = None,
    period_end: date | None = None,
    signer: Signer | None = None,
    response_for: DocumentId | str | None = None,
    due_date: date | None = None,
    business: Business = Business.NEW,
    replaces: DocumentId | str | None = None,
    request_ref: str | None = None,
    legal_basis: str = LEGAL_BASIS,
    attachments: Sequence[Attachment] = (),
    limits: Limits = DEFAULT_LIMITS,
    round_trip: bool = True,
) -> Payload:
    """Assemble a payload and prove it valid by a round trip through XML and the XSD.

    ``round_trip=False`` skips the proof, for payloads the hub writes many of from its own
    values (receipts), whose validity the tests prove instead.

    ``period="YYYY-MM"`` means the monthly period of QĐ 18/2017 Điều 8.4.a (16th of the previous
    month to the 15th of that month) with cadence ``monthly``; otherwise give ``period_start``,
    ``period_end`` and ``cadence`` (default ``ad-hoc``). ``document_number`` is the edXML
    ``number/notation`` (e.g. ``15/CAHN-PA08``). Nothing here reads the clock or draws random
    numbers: ``message_id`` and ``issued_on`` come from the caller. Raises :class:`InputError`
    naming the first problem.
    """
    if category not in CATEGORIES:
        raise InputError(
            f"unknown category {category!r}; known categories: {', '.join(CATEGORIES)}"
        )
    cat = CATEGORIES[category]
    if period is not None:
        if period_start is not None or period_end is not None:
            raise InputError("give either period=YYYY-MM or period_start/period_end, not both")
        period_start, period_end = monthly_period(period)
        cadence = cadence or "monthly"
    built = Payload(
        Header(
            message_id=message_id,
            sender=sender,
            recipients=tuple(recipients),
            document_id=DocumentId(sender.organ_id, issued_on, document_number),
            subject=subject or _default_subject(cat, period),
            business=business,
            signer=signer,
            response_for=_as_doc_id(response_for, "response_for"),
            due_date=due_date,
            replaces=_as_doc_id(replaces, "replaces"),
        ),
        Exchange(category, cadence or "ad-hoc", legal_basis, period_start, period_end, request_ref),
        tuple(r if isinstance(r, Record) else Record.of(cat, r) for r in records),
        tuple(attachments),
    )
    if not round_trip:
        return built
    try:
        return Payload.from_xml(built.to_xml(), limits=limits)
    except SchemaInvalid as err:
        raise InputError(
            f"the {category} payload built is invalid: {err.message}", detail=err.detail
        ) from None


def _as_doc_id(value: DocumentId | str | None, name: str) -> DocumentId | None:
    if value is None or isinstance(value, DocumentId):
        return value
    try:
        return DocumentId.parse(value)
    except ValueError as err:
        raise InputError(f"{name}: {err}") from None


def _default_subject(category: Category, period: str | None) -> str:
    return f"{category.title_vi} ({period})" if period else category.title_vi
