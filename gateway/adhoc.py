"""Ad-hoc requests and deemed consent (pure; DESIGN §6).

A ``request`` payload asks its addressees for information or an opinion by a deadline; each
addressee answers with a ``reply`` whose ``ResponseFor`` is the request's DocumentId. QĐ
1342/QĐ-UBND 2023 (Quy chế, Điều 7.3 and 8.2.a):

* the deadline is the requester's (``DueDate``), "theo yêu cầu của cơ quan, đơn vị chủ trì";
  a DueDate on a weekly rest day or a public holiday ends with the next working day (BLDS 2015
  Điều 148.5), as an obligation's due date does (:func:`gateway.obligations.due_date`);
* otherwise 15 working days "kể từ ngày nhận đầy đủ hồ sơ" (7.3.a) — the request as received
  is taken to be the complete dossier — or 7 working days after a meeting (7.3.b);
* "Nếu quá thời gian trên thì xem như đồng ý": no reply by 24:00 UTC+7 of the last day is
  **deemed consent**, which the chair's report lists (8.2.a, 10.2), as it does late replies.

The payload rules require ``DueDate`` on every request (formats/payload_rules.py), so the
default counts only serve entries without one; nothing in a request says "after a meeting",
so :attr:`Request.after_meeting` is set only by callers that know. Working days come from the
calendar passed in, and every status carries its version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any, Final, Literal, get_args

from archive.log import Item
from formats.vntime import local_day
from gateway.compliance import Calendar, end_of, working_days_late
from gateway.obligations import next_working_day
from gateway.workdays import MAX_YEAR, MIN_YEAR

RequestState = Literal["open", "answered", "answered-late", "deemed-consent", "withdrawn"]
REQUEST_STATES: Final[tuple[RequestState, ...]] = get_args(RequestState)
#: QĐ 1342/QĐ-UBND 2023 Điều 7.3.a: "trả lời văn bản trong vòng 15 (mười lăm) ngày làm việc
#: kể từ ngày nhận đầy đủ hồ sơ" when the requester sets no time.
DEFAULT_REPLY_DAYS: Final = 15
#: Điều 7.3.b: "chậm nhất trong vòng 07 (bảy) ngày làm việc sau khi cuộc họp kết thúc".
AFTER_MEETING_DAYS: Final = 7


@dataclass(frozen=True, slots=True)
class Request:
    """An accepted ``request`` payload: ``requester`` asks each of ``addressees``."""

    seq: int
    document_id: str
    requester: str
    addressees: tuple[str, ...]
    received_at: datetime
    due_date: date | None = None  # DueDate, given by the requester
    after_meeting: bool = False
    subject: str = ""
    business: str = "new"  # new | update | replace | revoke (edXML BusinessDocType)
    replaces: str | None = None  # the DocumentId an update, replace or revoke names

    @classmethod
    def from_entry(cls, seq: int, fields: Mapping[str, Any]) -> Request | None:
        payload = fields.get("payload") or {}
        if fields.get("status") != "accepted" or fields.get("category") != "request":
            return None
        due = payload.get("due_date")
        return cls(
            seq,
            str(fields.get("document_id")),
            str(fields.get("agency")),
            tuple(payload.get("to") or ()),
            datetime.fromisoformat(fields["transport"]["received_at"]),
            date.fromisoformat(due) if due else None,
            subject=str(fields.get("subject") or ""),
            business=str(payload.get("business") or "new"),
            replaces=payload.get("replaces"),
        )

    def deadline(self, calendar: Calendar) -> tuple[date, str]:
        """The last day to reply, and the rule it comes from."""
        if self.due_date is not None:
            # Điều 7.3.a: "thời gian trả lời văn bản theo yêu cầu của cơ quan, đơn vị chủ trì".
            given = self.due_date
            rule = "DueDate given by the requester (QĐ 1342 Điều 7.3.a)"
            if not MIN_YEAR <= given.year <= MAX_YEAR:  # the calendar cannot say: as given
                return given, rule
            # BLDS 2015 Điều 148.5: "Khi ngày cuối cùng của thời hạn là ngày nghỉ cuối tuần
            # hoặc ngày nghỉ lễ thì thời hạn kết thúc tại thời điểm kết thúc ngày làm việc tiếp
            # theo ngày nghỉ đó".
            day = next_working_day(calendar, given)
            received = local_day(self.received_at)
            if day <= received:
                # Điều 7.3.a: the chair "phải dành thời gian tối thiểu để đảm bảo các đơn vị được
                # lấy ý kiến có thời gian nghiên cứu": a DueDate that had passed (or was that
                # very day) when the request arrived leaves none, and would be deemed consent
                # at once. The default period applies (Điều 7.3.c: at most 15 working days).
                return calendar.add_working_days(received, DEFAULT_REPLY_DAYS), (
                    f"DueDate {given} given by the requester had come when the request arrived "
                    f"({received}): {DEFAULT_REPLY_DAYS} working days from receipt "
                    "(QĐ 1342 Điều 7.3.a, 7.3.c)"
                )
            if day == given:
                return day, rule
            return day, (
                f"DueDate {given} given by the requester (QĐ 1342 Điều 7.3.a), a day off: "
                "the next working day (BLDS 2015 Điều 148.5)"
            )
        if self.after_meeting:
            day = calendar.add_working_days(local_day(self.received_at), AFTER_MEETING_DAYS)
            return day, f"{AFTER_MEETING_DAYS} working days after the meeting (Điều 7.3.b)"
        day = calendar.add_working_days(local_day(self.received_at), DEFAULT_REPLY_DAYS)
        return day, f"{DEFAULT_REPLY_DAYS} working days from receipt (Điều 7.3.a)"


@dataclass(frozen=True, slots=True)
class Reply:
    """An accepted ``reply`` payload answering the request ``response_for``."""

    seq: int
    document_id: str
    sender: str
    response_for: str
    received_at: datetime

    @classmethod
    def from_entry(cls, seq: int, fields: Mapping[str, Any]) -> Reply | None:
        payload = fields.get("payload") or {}
        answers = payload.get("response_for")
        if fields.get("status") != "accepted" or fields.get("category") != "reply" or not answers:
            return None
        received = datetime.fromisoformat(fields["transport"]["received_at"])
        return cls(
            seq, str(fields.get("document_id")), str(fields.get("agency")), answers, received
        )


@dataclass(frozen=True, slots=True)
class RequestStatus:
    """Where one addressee stands with one request at ``now``."""

    request: Request
    addressee: str
    deadline: date  # ends 24:00 UTC+7
    rule: str
    calendar_version: str
    state: RequestState
    reply: Reply | None = None
    late_days: int = 0

    @property
    def for_chair(self) -> bool:
        """Listed for the chair's report (Điều 8.2.a, 10.2): no written reply in time."""
        return self.state in ("deemed-consent", "answered-late")

    def as_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "request": r.document_id,
            "request_seq": r.seq,
            "requester": r.requester,
            "addressee": self.addressee,
            "subject": r.subject,
            "received_at": r.received_at.isoformat(),
            "deadline": self.deadline.isoformat(),
            "deadline_ends": end_of(self.deadline).isoformat(),
            "rule": self.rule,
            "calendar_version": self.calendar_version,
            "state": self.state,
            "reply": self.reply.document_id if self.reply else None,
            "replied_at": self.reply.received_at.isoformat() if self.reply else None,
            "late_days": self.late_days,
            "for_chair": self.for_chair,
        }


def requests_status(
    requests: Iterable[Request], replies: Iterable[Reply], calendar: Calendar, now: datetime
) -> list[RequestStatus]:
    """Each (request, addressee): answered in time, answered late, open, or deemed consent
    (Điều 7.3.a: "Nếu quá thời gian trên thì xem như đồng ý"). A reply counts when it comes
    from the addressee and its ResponseFor is the request's DocumentId; the first one decides.
    """
    first: dict[tuple[str, str], Reply] = {}
    for answer in sorted(replies, key=lambda r: (r.received_at, r.seq)):
        if answer.received_at <= now:
            first.setdefault((answer.response_for, answer.sender), answer)
    today = local_day(now)
    out = []
    for req, names, withdrawn in _chains((r for r in requests if r.received_at <= now), calendar):
        deadline, rule = req.deadline(calendar)
        for addressee in req.addressees:
            # A reply to the request, or to any update of it, answers it (the first one).
            found = [first[n, addressee] for n in names if (n, addressee) in first]
            reply = min(found, key=lambda r: (r.received_at, r.seq)) if found else None
            late = 0
            if reply is not None:
                late = working_days_late(calendar, deadline, local_day(reply.received_at))
            state: RequestState = (
                ("answered-late" if late else "answered")
                if reply
                else "withdrawn"
                if withdrawn
                else "deemed-consent"
                if today > deadline
                else "open"
            )
            out.append(
                RequestStatus(req, addressee, deadline, rule, calendar.version, state, reply, late)
            )
    return out


def _chains(
    requests: Iterable[Request], calendar: Calendar
) -> list[tuple[Request, tuple[str, ...], bool]]:
    """Each request as its requester's later documents left it: (the request, with the
    deadline and addressees of its last update; the DocumentIds a reply may answer; whether a
    revoke withdrew it).

    An ``update`` or ``replace`` that names a request of the same requester, received by its
    deadline, extends it: the later of the two deadlines (a change never shortens the time the
    addressees were given), its addressees, and the replies to either document count. A
    ``revoke`` received by the deadline withdraws it, and is no request itself. After the
    deadline the request is decided (consent was deemed then, and may be filed): a change that
    comes later, or names no such request, or a withdrawn one, is a request of its own (a
    revoke: nothing)."""
    chains: dict[str, list[Any]] = {}  # any DocumentId of a chain → [request, names, withdrawn]
    order: list[list[Any]] = []
    for req in sorted(requests, key=lambda r: (r.received_at, r.seq)):
        chain = chains.get(req.replaces) if req.replaces else None
        if chain is not None and chain[0].requester != req.requester:
            chain = None  # only the requester changes its own request
        # After its deadline a request is decided: consent was deemed then (and may be filed).
        late = chain is not None and local_day(req.received_at) > chain[0].deadline(calendar)[0]
        if req.business == "revoke":
            if chain is not None and not late:
                chain[2] = True
            continue
        if (
            chain is not None
            and not late
            and not chain[2]
            and req.business in ("update", "replace")
        ):
            original: Request = chain[0]
            extended = replace(
                original,
                addressees=req.addressees or original.addressees,
                due_date=req.due_date or original.due_date,
                subject=req.subject or original.subject,
            )
            if extended.deadline(calendar)[0] >= original.deadline(calendar)[0]:
                chain[0] = extended
            else:  # (an earlier DueDate: the addressees keep the time they were given)
                chain[0] = replace(extended, due_date=original.due_date)
            chain[1] = (*chain[1], req.document_id)
            chains[req.document_id] = chain
            continue
        chain = [req, (req.document_id,), False]
        chains[req.document_id] = chain
        order.append(chain)
    return [(c[0], c[1], c[2]) for c in order]


def deemed_consent_item(status: RequestStatus, at: datetime) -> Item:
    """The archive entry recording that ``status.addressee`` is deemed to consent."""
    if status.state != "deemed-consent":
        raise ValueError(f"{status.request.document_id} is {status.state}, not deemed consent")
    return Item(
        "deemed-consent",
        at,
        {
            "status": "deemed-consent",
            "agency": status.addressee,
            "category": "request",
            "document_id": status.request.document_id,
            **{k: v for k, v in status.as_dict().items() if k not in ("request", "addressee")},
            "deemed_at": end_of(status.deadline).isoformat(),
        },
    )
