"""Receipts are written from the hub's own values without a parse-back: prove here that what
is written is a valid status payload, whatever the reasons of a rejection say."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from formats.payload import Organ, Payload
from gateway.receipts import (
    FIX_EN,
    FIX_VI,
    MAX_DESCRIPTION,
    REJECTED_EN,
    REJECTED_VI,
    receipt_payload,
)

HUB = Organ("GATEWAY", "Cổng trao đổi", "hub@exchange.hanoi.gov.vn")
TO = Organ("H26.SNV", "Sở Nội vụ", "vanthu@snv.hanoi.gov.vn")
AT = datetime(2026, 11, 20, 3, 4, 5, 123456, tzinfo=UTC)
_WORDS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=600)
_REASON = st.fixed_dictionaries(
    {"code": _WORDS, "message": _WORDS, "reason_vi": _WORDS},
    optional={"detail": _WORDS},
)


def _fields(status: str, reasons: list[dict[str, str]], *, read: bool = True) -> dict[str, object]:
    """An archive entry's fields; ``read=False``: a message refused before its payload could
    be read (no payload digest, no DocumentId: only the raw message's digest)."""
    if not read:
        return {"status": status, "digest": hashlib.sha256(b"raw").hexdigest(), "reasons": reasons}
    return {
        "status": status,
        "payload_sha256": hashlib.sha256(b"payload").hexdigest(),
        "document_id": "H26.SNV,2026/11/15,123/SNV-QLNN",
        "reasons": reasons,
    }


@settings(max_examples=200)
@given(
    st.sampled_from(["accepted", "rejected"]),
    st.integers(0, 10**18 - 1),  # the receipt's document number is the sequence number
    st.lists(_REASON, max_size=6),
    st.booleans(),
)
def test_written_receipts_are_valid_status_payloads(
    status: str, seq: int, reasons: list[dict[str, str]], read: bool
) -> None:
    fields = _fields(status, reasons, read=read)
    payload = receipt_payload(fields, seq=seq, hub=HUB, to=TO, origin="hub@test", at=AT)
    assert Payload.from_xml(payload.to_xml()) == payload
    answered = payload.header.response_for
    assert (str(answered) if answered else None) == fields.get("document_id")
    [record] = payload.records
    assert record["ArchiveSequence"] == seq
    text = str(record["Description"])
    assert len(text) <= MAX_DESCRIPTION
    if status == "rejected":  # both languages, whatever a reason quotes (both once cut off)
        assert text.startswith(REJECTED_VI.format(seq=seq)) and text.endswith(FIX_EN)
        assert FIX_VI in text and REJECTED_EN.format(seq=seq) in text


def test_what_xml_cannot_carry_in_a_reason_is_replaced_not_refused() -> None:
    reason = {"code": "x", "message": "bad \x01 byte \ufffe", "reason_vi": "lỗi \x1b"}
    payload = receipt_payload(
        _fields("rejected", [reason]), seq=7, hub=HUB, to=TO, origin="hub@test", at=AT
    )
    [record] = Payload.from_xml(payload.to_xml()).records
    text = str(record["Description"])
    assert "- lỗi \ufffd: bad \ufffd byte \ufffd" in text
    assert "- [x] bad \ufffd byte \ufffd" in text


def test_the_largest_sequence_numbers_still_make_valid_receipts() -> None:
    for seq in (10**10, 10**18 - 1):  # beyond edXML's 10 digits; a Count has at most 18
        payload = receipt_payload(
            _fields("accepted", []), seq=seq, hub=HUB, to=TO, origin="hub@test", at=AT
        )
        assert str(Payload.from_xml(payload.to_xml()).header.document_id).split(",")[2] == (
            f"{seq}/BN"
        )


def test_a_long_quoted_value_leaves_both_languages_and_every_reason_in_the_receipt() -> None:
    """An XSD error quotes what was sent: a 2,400-character value cut the Description in the
    Vietnamese half, the English half and the second reason gone."""
    pasted = "Kính gửi Công an thành phố, Sở Nội vụ gửi kèm danh sách. " * 40
    reasons = [
        {"code": "schema-invalid", "message": f"PageCount: {pasted!r} is not a number"},
        {"code": "attachment-mismatch", "message": "scan.pdf is listed but not attached"},
    ]
    payload = receipt_payload(
        _fields("rejected", reasons), seq=9, hub=HUB, to=TO, origin="hub@test", at=AT
    )
    text = str(Payload.from_xml(payload.to_xml()).records[0]["Description"])
    assert len(text) <= MAX_DESCRIPTION and text.endswith(FIX_EN)
    assert FIX_VI in text and REJECTED_EN.format(seq=9) in text
    assert text.count("scan.pdf is listed but not attached") == 2
