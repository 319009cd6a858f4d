"""Sample values and payloads for the payload tests: one valid payload per category."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from formats.categories import CATEGORIES, Category, Value
from formats.payload import Attachment, Organ, Payload, Signer, build_payload
from gateway.demo import WORK_PERMITS

POLICE = Organ("000.00.00.H26", "Công an Thành phố Hà Nội", "pa08@hanoi.gov.vn")
LABOUR = Organ("000.00.00.G22", "Sở Lao động - Thương binh và Xã hội", "sldtbxh@hanoi.gov.vn")
TAX = Organ("000.00.00.T01")
ISSUED = date(2024, 3, 16)
MESSAGE_ID = UUID("6e3092e7-8648-4107-9a1b-0123456789ab")
EARLIER = "000.00.00.G22,2024/03/01,7/SLĐTBXH-VL"
ICT = timezone(timedelta(hours=7))

SAMPLE_BY_KIND: dict[str, Value] = {
    "text": 'Nguyễn Văn A, "Kim" & <co.>',
    "code": "B1234567",
    "country": "KOR",
    "currency": "VND",
    "date": date(2024, 3, 1),
    "datetime": datetime(2024, 3, 16, 9, 30, 15, 250000, tzinfo=ICT),
    "count": 3,
    "amount": Decimal("1500000.50"),
    "sha256": "ab" * 32,
}
GENERIC = ("document", "request", "reply", "status")
XML_ASSETS = Path(__file__).parent / "assets" / "xml"


def sample_values(category: Category, *, full: bool = True, pick: int = 0) -> dict[str, Value]:
    """Values for every field (or only the required ones), enums taking choice ``pick``."""
    return {
        f.name: f.choices[pick % len(f.choices)] if f.kind == "enum" else SAMPLE_BY_KIND[f.kind]
        for f in category.fields
        if full or f.required
    }


def sample_payload(code: str, **overrides: Any) -> Payload:
    """A valid payload of category ``code`` with two records (one if the category allows one)."""
    category = CATEGORIES[code]
    records = [sample_values(category), sample_values(category, full=False, pick=1)]
    if category.max_records is not None:
        records = records[: category.max_records]
    kwargs: dict[str, Any] = {
        "sender": POLICE,
        "recipients": [LABOUR, TAX],
        "records": records,
        "document_number": "15/CAHN-PA08",
        "issued_on": ISSUED,
        "message_id": MESSAGE_ID,
        "signer": Signer("Trần Thị B", "Phó Trưởng phòng"),
    }
    if code not in GENERIC:
        kwargs["period"] = "2024-03"
    if code == "request":
        kwargs["due_date"] = date(2024, 3, 30)
    if code in ("reply", "status"):
        kwargs["response_for"] = EARLIER
    kwargs.update(overrides)
    return build_payload(code, **kwargs)


def work_permit_report(issued_on: date, attachments: Sequence[Attachment] = ()) -> bytes:
    """The demo's monthly work-permit report from Home Affairs (H26.SNV) to the police
    (H26.CATP), a fresh MessageId each time, its manifest listing ``attachments``."""
    return build_payload(
        "work-permit",
        sender=Organ("H26.SNV", "Sở Nội vụ thành phố Hà Nội", "vanthu@snv.hanoi.gov.vn"),
        recipients=[Organ("H26.CATP", "Công an thành phố Hà Nội", "pa08@congan.hanoi.gov.vn")],
        records=WORK_PERMITS,
        document_number="7/SNV-VLATLĐ",
        issued_on=issued_on,
        message_id=uuid4(),
        period="2026-10",
        signer=Signer("Trần Văn Minh", "Phó Giám đốc"),
        attachments=attachments,
    ).to_xml()


def to_csv(category: Category, payload: Payload) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(category.columns)
    for record in payload.records:
        values = record.as_dict()
        writer.writerow(
            category.field(name).format(values[name]) if name in values else ""
            for name in category.columns
        )
    return out.getvalue()
