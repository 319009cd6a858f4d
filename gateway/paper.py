"""Reports received outside the gateway, recorded by hand (pure).

QĐ 18/2017 Điều 8.4.a: information is provided "bằng văn bản hoặc qua thư điện tử công vụ" — in
writing, or by official e-mail. A report that reached its recipients on paper fulfils its
obligation as much as one the gateway filed; without a record of it, the status would show it
missing and the gateway would send late notices and escalations for it. An administrator
records it (``gateway compliance record-paper``): an archive entry of kind ``paper``, in the
tamper-evident log like everything else, naming who recorded it and when.

The compliance status (:mod:`gateway.compliance`) takes such an entry as evidence that the
report of its obligation and period was received on the day the administrator gives: the report
when no e-mailed one is in force, and the day timeliness is judged on when it is earlier than
the first e-mailed report's. It counts from the moment it was recorded (a status as at an
earlier moment does not see it: it shows what was known then). A mistaken record is withdrawn by a second entry naming
it (``gateway compliance withdraw-paper``): from then on the status counts it no more, as if it
had never been recorded; nothing is deleted. (Not a revoke: a revoke is the provider's, and
withdraws the report in force, which may by then be an electronic one.)
"""

from __future__ import annotations

from datetime import date, datetime, time
from typing import Any, Final

from archive.log import Item
from formats.categories import NOT_XML_CHAR
from formats.errors import InputError
from formats.vntime import VN_TZ, local_day
from gateway.obligations import Obligation, Period, cut_dates

KIND: Final = "paper"
#: The status of an entry withdrawing a paper record (that of a record is ``accepted``).
WITHDRAWAL: Final = "withdrawal"
#: Longest reference or note kept (a document number and date; a sentence or two).
MAX_REFERENCE, MAX_NOTE = 200, 1000


def owes_when(obligation: Obligation) -> str:
    """When ``obligation`` owes reports, for a refusal: its periods' ends and its validity."""
    if obligation.cadence == "monthly":
        periods = "a period ends on the 15th of each month"
    else:
        cuts = ", ".join(f"{day:02d}/{month:02d}" for month, day in cut_dates(obligation))
        periods = f"a period begins on {cuts}"
    valid = f"{obligation.valid_from or '…'} → {obligation.valid_to or '…'}"
    return f"{obligation.id} ({obligation.cadence}: {periods}; valid {valid})"


def _text(value: str, what: str, most: int, *, empty: str | None = None) -> str:
    """``value`` on one line; :class:`InputError` if too long, or empty when ``empty`` says
    what to give."""
    text = " ".join(value.split())
    if empty is not None and not text:
        raise InputError(f"{what} is empty; {empty}")
    if len(text) > most:
        raise InputError(f"{what} has {len(text)} characters; at most {most}")
    if NOT_XML_CHAR.search(text) or "\x7f" in text:
        raise InputError(f"{what} contains control characters")
    return text


def paper_item(
    obligation: Obligation,
    period: Period,
    *,
    received_on: date,
    reference: str,
    note: str,
    actor: str,
    at: datetime,
) -> Item:
    """The archive entry recording that ``obligation``'s report for ``period`` was received
    on paper on ``received_on`` (a local day), recorded by ``actor`` at ``at``."""
    if received_on > local_day(at):
        raise InputError(f"--received {received_on} is in the future; give the day it came")
    if received_on < period.first:
        raise InputError(
            f"--received {received_on} is before the period {period.first} – {period.last} "
            "began: no report of it could have come then"
        )
    reference = _text(
        reference, "--reference", MAX_REFERENCE, empty="give the paper document's number and date"
    )
    fields: dict[str, Any] = {
        "status": "accepted",
        "via": "paper",
        "agency": obligation.provider,
        "category": obligation.category,
        "period": f"{period.last:%Y-%m}",
        "document_id": reference,
        "obligation": obligation.id,
        "received_at": received_at(received_on).isoformat(),
        "recorded_by": actor,
        "note": _text(note, "--note", MAX_NOTE),
        "payload": {
            "business": "new",
            "cadence": obligation.cadence,
            "period_start": period.first.isoformat(),
            "period_end": period.last.isoformat(),
        },
    }
    return Item(KIND, at, fields)


def withdrawal_item(
    recorded: dict[str, Any], seq: int, *, reason: str, actor: str, at: datetime
) -> Item:
    """The entry withdrawing paper record ``seq`` (whose fields are ``recorded``): from ``at``
    on, the status counts it no more, as if it had never been recorded (a status as at an
    earlier moment still does: it was known then)."""
    if recorded.get("kind") != KIND or recorded.get("status") != "accepted":
        raise InputError(f"archive entry {seq} is not a record of a report received on paper")
    fields = {
        "status": WITHDRAWAL,
        "via": "paper",
        **{k: recorded[k] for k in ("agency", "category", "period", "obligation")},
        "withdraws": seq,
        "recorded_by": actor,
        "note": _text(reason, "--reason", MAX_NOTE, empty="say why the record is withdrawn"),
    }
    return Item(KIND, at, fields)


def received_at(day: date) -> datetime:
    """The moment a paper report received on local ``day`` is taken to have come: the day's
    start, UTC+7 (only its day counts)."""
    return datetime.combine(day, time(0), VN_TZ)
