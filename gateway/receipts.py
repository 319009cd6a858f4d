"""Signed receipts: what the hub answers an authenticated sender (pure).

A receipt is an edXML-style ``status`` payload (QCVN 102:2016 Status, in our namespace): the
status code (``03`` accepted, ``02`` rejected), a description a clerk understands in Vietnamese
and English, the time, the SHA-256 of the payload received and the archive sequence number of
the entry that holds the message. It answers the original ``DocumentId`` (``ResponseFor``) when
the payload could be read far enough to have one.

Everything here is computed from the archive entry of the message, never from the message's
headers, so nothing a sender wrote reaches an outbound header (DESIGN §5 rule 5), and the same
entry always gives the same receipt payload: its ``MessageId`` is derived from the archive's
origin and the sequence number, so a receipt rebuilt after a crash is the same receipt.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from formats.categories import NOT_XML_CHAR
from formats.payload import Organ, Payload, build_payload
from formats.vntime import local_day

#: Description is an edXML ``Text``: at most 2000 characters.
MAX_DESCRIPTION: Final = 2000

ACCEPTED_VI: Final = "Đã tiếp nhận hợp lệ và lưu trữ với số lưu trữ {seq}."
ACCEPTED_EN: Final = "Accepted and archived as entry {seq}."
REJECTED_VI: Final = "Bị từ chối (số lưu trữ {seq}). Lý do:"
REJECTED_EN: Final = "Rejected (archive entry {seq}). Reasons:"
FIX_VI: Final = "Đề nghị sửa và gửi lại."
FIX_EN: Final = "Please correct the message and send it again."


def receipt_status(disposition: str) -> str:
    """edXML StatusCode for a filed message's disposition."""
    return {"accepted": "03", "rejected": "02"}[disposition]


def description(disposition: str, seq: int, reasons: Sequence[Mapping[str, Any]]) -> str:
    """The receipt's words: Vietnamese first, then English, trimmed to fit ``Description``."""
    if disposition == "accepted":
        return f"{ACCEPTED_VI.format(seq=seq)}\n{ACCEPTED_EN.format(seq=seq)}"
    # Each reason is quoted twice (both languages) within a share of the room left by the
    # fixed lines: a long value quoted by one (an XSD error quotes what was sent) must not
    # push the English half, or the other reasons, out of the 2000 characters.
    share = max(80, (MAX_DESCRIPTION - 400) // (2 * max(1, len(reasons))))

    def quoted(text: str) -> str:
        return text if len(text) <= share else text[: share - 1].rstrip() + "…"

    lines = [REJECTED_VI.format(seq=seq)]
    for r in reasons:
        specifics = r.get("message_vi") or r.get("message", "")
        lines.append(quoted(f"- {r.get('reason_vi', '')}: {specifics}".strip()))
    lines.append(FIX_VI)
    lines.append(REJECTED_EN.format(seq=seq))
    for r in reasons:
        detail = f" ({r['detail']})" if r.get("detail") else ""
        lines.append(quoted(f"- [{r.get('code', 'error')}] {r.get('message', '')}{detail}"))
    lines.append(FIX_EN)
    # A reason may quote what the sender sent; what XML cannot carry becomes U+FFFD, so that
    # the receipt is still written (a refused receipt would leave the sender without an answer).
    text = NOT_XML_CHAR.sub("\ufffd", "\n".join(lines))
    if len(text) > MAX_DESCRIPTION:
        text = text[: MAX_DESCRIPTION - 1].rstrip() + "…"
    return text


def receipt_message_id(origin: str, seq: int) -> uuid.UUID:
    """The receipt payload's MessageId: the same for the same archive entry, always."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"urn:official-mail:{origin}:receipt:{seq}")


def receipt_payload(
    fields: Mapping[str, Any], *, seq: int, hub: Organ, to: Organ, origin: str, at: datetime
) -> Payload:
    """The status payload answering the message filed as entry ``seq`` with ``fields``."""
    disposition = str(fields["status"])
    digest = fields.get("payload_sha256") or fields["digest"]
    response_for = fields.get("document_id")
    return build_payload(
        "status",
        sender=hub,
        recipients=[to],
        records=[
            {
                "StatusCode": receipt_status(disposition),
                "Description": description(disposition, seq, fields.get("reasons", ())),
                "Timestamp": at,
                "ReceivedDigest": digest,
                "ArchiveSequence": seq,
            }
        ],
        document_number=f"{seq}/BN",
        issued_on=local_day(at),
        message_id=receipt_message_id(origin, seq),
        subject=subject(disposition, seq),
        response_for=response_for,
        round_trip=False,  # our own values; tests/test_receipts.py proves them valid
    )


def subject(disposition: str, seq: int) -> str:
    """An outbound Subject made only of our own words and numbers."""
    if disposition == "accepted":
        return f"Biên nhận: đã tiếp nhận (số {seq}) / Receipt: accepted (entry {seq})"
    return f"Biên nhận: bị từ chối (số {seq}) / Receipt: rejected (entry {seq})"
