"""The values a payload is made of: frozen, comparable, free of XML.

Names follow edXML (QCVN 102:2016/BTTTT): ``From``/``To`` organs, ``DocumentId``,
``SignerInfo``, ``Business``. :class:`formats.payload.Payload` puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Record:
    """One typed record of a category: ``(field name, value)`` pairs in XSD order."""

    fields: tuple[tuple[str, Value], ...]

    @classmethod
    def of(cls, category: Category, values: Mapping[str, Value | None]) -> Record:
        """Order ``values`` as the category's fields; ``None`` and ``""`` mean absent."""
        unknown = sorted(set(values) - set(category.columns))
        if unknown:
            raise InputError(
                f"category {category.code} has no field {', '.join(unknown)}; "
                f"its fields are {', '.join(category.columns)}"
            )
        return cls(
            tuple(
                (name, value)
                for name in category.columns
                if (value := values.get(name)) is not None and value != ""
            )
        )

    def __getitem__(self, name: str) -> Value:
        for key, value in self.fields:
            if key == name:
                return value
        raise KeyError(name)

    def get(self, name: str, default: Value | None = None) -> Value | None:
        try:
            return self[name]
        except KeyError:
            return default

    def as_dict(self) -> dict[str, Value]:
        return dict(self.fields)
