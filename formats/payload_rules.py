"""Cross-field rules of a payload that XSD 1.0 cannot state, and the monthly period.

Each rule reads the frozen :class:`~formats.payload.Payload` and reports a
:class:`Violation`: the element path, and what is wrong in English and in Vietnamese (the
receipt's two languages); ``Payload.from_xml`` turns the paths into line and column.
"""

from __future__ import annotations

import re
from datetime import date
from typing import TYPE_CHECKING, NamedTuple

from formats.errors import InputError

if TYPE_CHECKING:
    from formats.payload import Payload

_PERIOD = re.compile(r"(\d{4})-(\d{2})")


class Violation(NamedTuple):
    """A broken rule: where (a path below Payload), and what, in English and Vietnamese."""

    path: str
    message: str
    message_vi: str


def monthly_period(period: str) -> tuple[date, date]:
    """The reporting period named ``YYYY-MM``: the 16th of the previous month to the 15th.

    QĐ 18/2017 Điều 8.4.a: "theo định kỳ hàng tháng (mốc số liệu từ ngày 16 tháng trước đến
    ngày 15 tháng tiếp theo làm báo cáo)" — monthly, figures from the 16th of the previous
    month to the 15th of the following month. ``"2024-01"`` is 2023-12-16 … 2024-01-15.
    """
    match = _PERIOD.fullmatch(period)
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise InputError(f"period {period!r} is not a month; write it as YYYY-MM, e.g. 2024-03")
    year, month = int(match.group(1)), int(match.group(2))
    if year < 1000:
        raise InputError(f"period {period!r} has no plausible year; write it as YYYY-MM")
    start = date(year - 1, 12, 16) if month == 1 else date(year, month - 1, 16)
    return start, date(year, month, 15)


def rule_violations(payload: Payload) -> list[Violation]:
    """Every broken cross-field rule, in document order."""
    h, x = payload.header, payload.exchange
    out: list[Violation] = []
    # edXML DocumentId starts with the issuing organ's id: it must be the sender's.
    if h.document_id.organ_id != h.sender.organ_id:
        issuer, sender = h.document_id.organ_id, h.sender.organ_id
        out.append(
            Violation(
                "Header/DocumentId",
                f"DocumentId is issued by {issuer} but From/OrganId is {sender}; a document id "
                "starts with the sender's OrganId",
                f"DocumentId ghi cơ quan ban hành {issuer} nhưng From/OrganId là {sender}; mã "
                "văn bản phải bắt đầu bằng mã cơ quan gửi",
            )
        )
    # A reply names the document it answers by its DocumentId. A status names the payload it
    # answers by ReceivedDigest (required in its records), and by ResponseFor only when there
    # is a DocumentId to name: a message refused before its payload could be read (not
    # decrypted, not valid XML) still gets its receipt.
    if x.category == "reply" and h.response_for is None:
        out.append(
            Violation(
                "Header/Subject",
                "a reply must name what it answers: add ResponseFor with the DocumentId of the "
                "message it responds to",
                "văn bản trả lời phải nêu văn bản được trả lời: thêm ResponseFor là DocumentId "
                "của văn bản đó",
            )
        )
    # QĐ 18/2017 Điều 8.4.a: "hoặc khi có yêu cầu đột xuất" — an ad-hoc request has a deadline.
    if x.category == "request" and h.due_date is None:
        out.append(
            Violation(
                "Header/Subject",
                "a request must carry a deadline: add DueDate",
                "văn bản yêu cầu phải có thời hạn: thêm DueDate",
            )
        )
    if h.due_date is not None and h.due_date < h.document_id.issued_on:
        due, issued = h.due_date, h.document_id.issued_on
        out.append(
            Violation(
                "Header/DueDate",
                f"DueDate {due} is before the document date {issued}; give a deadline on or "
                "after the date of issue",
                f"thời hạn DueDate {due} trước ngày văn bản {issued}; thời hạn phải từ ngày "
                "ban hành trở đi",
            )
        )
    # edXML Business: 3 (replace) names the document it replaces, 1 (revoke) the one it
    # revokes (compliance withdraws only that report); 0 (new) replaces nothing.
    if h.business == 3 and h.replaces is None:
        out.append(
            Violation(
                "Header/Business",
                "Business 3 (replace) requires ReplacesDocumentId: add the DocumentId of the "
                "document being replaced, or use Business 0",
                "Business 3 (thay thế) cần ReplacesDocumentId: thêm DocumentId của văn bản bị "
                "thay thế, hoặc dùng Business 0",
            )
        )
    if h.business == 1 and h.replaces is None:
        out.append(
            Violation(
                "Header/Business",
                "Business 1 (revoke) requires ReplacesDocumentId: add the DocumentId of the "
                "document being revoked",
                "Business 1 (thu hồi) cần ReplacesDocumentId: thêm DocumentId của văn bản bị "
                "thu hồi",
            )
        )
    if h.business == 0 and h.replaces is not None:
        out.append(
            Violation(
                "Header/ReplacesDocumentId",
                "ReplacesDocumentId is given but Business is 0 (new); use Business 3 (replace) "
                "or remove ReplacesDocumentId",
                "có ReplacesDocumentId nhưng Business là 0 (văn bản mới); dùng Business 3 (thay "
                "thế) hoặc bỏ ReplacesDocumentId",
            )
        )
    out.extend(_period_violations(payload))
    return out


def _period_violations(payload: Payload) -> list[Violation]:
    x = payload.exchange
    start, end = x.period_start, x.period_end
    if (start is None) != (end is None):
        return [
            Violation(
                "Exchange/Cadence",
                "give both PeriodStart and PeriodEnd, or neither",
                "cần có cả PeriodStart và PeriodEnd, hoặc bỏ cả hai",
            )
        ]
    if start is None or end is None:
        if x.cadence != "ad-hoc":
            return [
                Violation(
                    "Exchange/Cadence",
                    f"cadence {x.cadence} needs the period it reports on: add PeriodStart and "
                    "PeriodEnd, or use cadence ad-hoc",
                    f"báo cáo định kỳ ({x.cadence}) phải nêu mốc số liệu: thêm PeriodStart và "
                    "PeriodEnd, hoặc dùng Cadence ad-hoc (đột xuất)",
                )
            ]
        return []
    if start > end:
        return [
            Violation(
                "Exchange/PeriodEnd",
                f"PeriodEnd {end} is before PeriodStart {start}; swap them",
                f"PeriodEnd {end} trước PeriodStart {start}; hãy đổi chỗ hai ngày",
            )
        ]
    if x.cadence == "monthly":
        # QĐ 18/2017 Điều 8.4.a: monthly, "mốc số liệu từ ngày 16 tháng trước đến ngày 15
        # tháng tiếp theo" — from the 16th of one month to the 15th of the next.
        first, last = monthly_period(f"{end.year:04d}-{end.month:02d}")
        if (start, end) != (first, last):
            return [
                Violation(
                    "Exchange/PeriodStart",
                    f"a monthly period runs from the 16th of the previous month to the 15th "
                    f"(QĐ 18/2017 Điều 8.4.a), but this one is {start} to {end}; for "
                    f"{end:%Y-%m} use {first} to {last}",
                    f"kỳ báo cáo hằng tháng có mốc số liệu từ ngày 16 tháng trước đến ngày 15 "
                    f"tháng tiếp theo (QĐ 18/2017 Điều 8.4.a), nhưng kỳ này từ {start} đến {end}; "
                    f"kỳ {end:%m/%Y} là từ {first} đến {last}",
                )
            ]
    return []
