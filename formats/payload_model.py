"""The values a payload is made of: frozen, comparable, free of XML.

Names follow edXML (QCVN 102:2016/BTTTT): ``From``/``To`` organs, ``DocumentId``,
``SignerInfo``, ``Business``. :class:`formats.payload.Payload` puts them together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import FrozenInstanceError, dataclass
from datetime import date
from enum import IntEnum
from typing import Final
from uuid import UUID

from formats.categories import Category, Value
from formats.errors import InputError

SCHEMA_VERSION: Final = "1.0"
#: Default ``Exchange/LegalBasis``: the decision whose Article 8 lists the categories.
LEGAL_BASIS: Final = "Quyết định 18/2017/QĐ-UBND của UBND thành phố Hà Nội, Điều 8"


class Business(IntEnum):
    """edXML ``BussinessDocType``: what this document does to earlier ones."""

    NEW = 0
    REVOKE = 1
    UPDATE = 2
    REPLACE = 3


@dataclass(frozen=True, slots=True)
class Organ:
    """An agency, as edXML ``From``/``To``: ``OrganId`` and optional name and e-mail."""

    organ_id: str
    name: str | None = None
    email: str | None = None


@dataclass(frozen=True, slots=True)
class Signer:
    """edXML ``SignerInfo``: the person who signed for the agency."""

    full_name: str
    position: str | None = None


@dataclass(frozen=True, slots=True)
class DocumentId:
    """edXML document identifier ``OrganId,YYYY/MM/DD,number/notation``."""

    organ_id: str
    issued_on: date
    number: str

    @classmethod
    def parse(cls, text: str) -> DocumentId:
        """Parse the edXML form; ``ValueError`` says what is expected."""
        parts = text.split(",")
        try:
            if len(parts) != 3 or "/" not in parts[2]:
                raise ValueError("wrong shape")
            year, month, day = (int(x) for x in parts[1].split("/"))
            return cls(parts[0], date(year, month, day), parts[2])
        except ValueError:
            raise ValueError(
                f"{text!r} is not a document id of the form OrganId,YYYY/MM/DD,number/notation "
                "with a real date, e.g. 000.00.00.H26,2024/03/16,15/CAHN-PA08"
            ) from None

    def __str__(self) -> str:
        return f"{self.organ_id},{self.issued_on:%Y/%m/%d},{self.number}"


@dataclass(frozen=True, slots=True)
class Header:
    message_id: UUID
    sender: Organ
    recipients: tuple[Organ, ...]
    document_id: DocumentId
    subject: str
    business: Business = Business.NEW
    signer: Signer | None = None
    response_for: DocumentId | None = None
    due_date: date | None = None
    replaces: DocumentId | None = None
    schema_version: str = SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class Exchange:
    category: str
    cadence: str
    legal_basis: str = LEGAL_BASIS
    period_start: date | None = None
    period_end: date | None = None
    request_ref: str | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    """One entry of the attachments manifest; ``sha256`` is lowercase hex."""

    name: str
    media_type: str
    size: int
    sha256: str


#: Field-name tuples in use, so that records with the same fields present share one tuple.
_SHAPES: dict[tuple[str, ...], tuple[str, ...]] = {}
#: Enough for every category's shapes many times over; beyond it, tuples are simply not shared.
_MAX_SHAPES: Final = 4096


def shared_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names``, or the equal tuple already in use (records of one shape share it)."""
    found = _SHAPES.get(names)
    if found is not None:
        return found
    if len(_SHAPES) < _MAX_SHAPES:
        _SHAPES.setdefault(names, names)
    return names


class Record:
    """One typed record of a category: ``(field name, value)`` pairs in XSD order.

    A payload may hold tens of thousands of records, so a record is stored as two references:
    a tuple of the field names present, shared by every record of that shape (and made of the
    category's own name strings), and the tuple of their values. ``fields`` rebuilds the pairs.
    Frozen, hashable, and equal when the pairs are equal.
    """

    __slots__ = ("_names", "_values")
    _names: tuple[str, ...]
    _values: tuple[Value, ...]

    def __init__(self, fields: Iterable[tuple[str, Value]] = ()) -> None:
        pairs = tuple(fields)
        object.__setattr__(self, "_names", shared_names(tuple(name for name, _ in pairs)))
        object.__setattr__(self, "_values", tuple(value for _, value in pairs))

    @classmethod
    def of(cls, category: Category, values: Mapping[str, Value | None]) -> Record:
        """Order ``values`` as the category's fields; ``None`` and ``""`` mean absent."""
        columns = category.columns
        unknown = sorted(set(values) - set(columns))
        if unknown:
            raise InputError(
                f"category {category.code} has no field {', '.join(unknown)}; "
                f"its fields are {', '.join(columns)}"
            )
        present = [
            (f.name, value)
            for f in category.fields
            if (value := values.get(f.name)) is not None and value != ""
        ]
        return cls.from_shared(
            shared_names(tuple(name for name, _ in present)), tuple(v for _, v in present)
        )

    @classmethod
    def from_shared(cls, names: tuple[str, ...], values: tuple[Value, ...]) -> Record:
        """The record of ``names`` (from :func:`shared_names`) and ``values``, one for one."""
        record = object.__new__(cls)
        object.__setattr__(record, "_names", names)
        object.__setattr__(record, "_values", values)
        return record

    @property
    def fields(self) -> tuple[tuple[str, Value], ...]:
        return tuple(zip(self._names, self._values, strict=True))

    def __getitem__(self, name: str) -> Value:
        try:
            return self._values[self._names.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def get(self, name: str, default: Value | None = None) -> Value | None:
        try:
            return self[name]
        except KeyError:
            return default

    def as_dict(self) -> dict[str, Value]:
        return dict(zip(self._names, self._values, strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return self._names == other._names and self._values == other._values

    def __hash__(self) -> int:
        return hash((self._names, self._values))

    def __repr__(self) -> str:
        return f"Record(fields={self.fields!r})"

    def __reduce__(self) -> tuple[type[Record], tuple[tuple[tuple[str, Value], ...]]]:
        return (Record, (self.fields,))

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")
