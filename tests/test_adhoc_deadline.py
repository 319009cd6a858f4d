"""Ad-hoc requests: a DueDate on a day off ends with the next working day (BLDS 2015 Điều
148.5), with a fixed clock and the real working-day calendar."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime

from gateway.adhoc import Reply, Request, deemed_consent_item, requests_status
from gateway.workdays import Calendar

CAL = Calendar.load()


def at(day: str, hm: str = "10:00") -> datetime:
    return datetime.fromisoformat(f"{day}T{hm}:00+07:00")


def request(due: date, received: str = "2026-11-02") -> Request:
    return Request(1, "H26.CATP,2026/11/02,1/YC", "H26.CATP", ("H26.SNV",), at(received), due)


def reply(when: datetime) -> Reply:
    return Reply(2, "H26.SNV,2026/11/16,1/TL", "H26.SNV", "H26.CATP,2026/11/02,1/YC", when)


def test_a_due_date_on_a_sunday_ends_with_monday() -> None:
    """DueDate Sunday 15 November 2026: a reply on Monday the 16th is in time, consent is
    deemed only at 24:00 that Monday, and a reply on Tuesday is one working day late."""
    r = request(date(2026, 11, 15))
    day, rule = r.deadline(CAL)
    assert day == date(2026, 11, 16)
    assert "2026-11-15" in rule and "148.5" in rule and "7.3.a" in rule

    def state(now: datetime, *replies: Reply) -> tuple[str, int]:
        [st] = requests_status([r], replies, CAL, now)
        return st.state, st.late_days

    assert state(at("2026-11-15", "23:00")) == ("open", 0)
    assert state(at("2026-11-16", "23:59")) == ("open", 0)
    assert state(at("2026-11-17", "00:00")) == ("deemed-consent", 0)
    monday = reply(at("2026-11-16", "16:00"))
    assert state(at("2026-11-20"), monday) == ("answered", 0)
    tuesday = reply(at("2026-11-17", "09:00"))
    assert state(at("2026-11-20"), tuesday) == ("answered-late", 1)
    [st] = requests_status([r], [], CAL, at("2026-11-20"))
    assert st.as_dict()["deadline_ends"] == "2026-11-17T00:00:00+07:00"
    item = deemed_consent_item(st, at("2026-11-20"))
    assert item.fields["deemed_at"] == "2026-11-17T00:00:00+07:00"


def test_a_due_date_on_a_public_holiday_moves_past_it() -> None:
    """Tuesday 2 September 2025 is National Day (Bộ luật Lao động 2019 Điều 112): Wednesday
    the 3rd. 30 April and 1 May 2026 (Thursday, Friday) are holidays: Monday 4 May."""
    assert request(date(2025, 9, 2), "2025-08-25").deadline(CAL)[0] == date(2025, 9, 3)
    assert request(date(2026, 4, 30), "2026-04-20").deadline(CAL)[0] == date(2026, 5, 4)
    assert request(date(2026, 5, 2), "2026-04-20").deadline(CAL)[0] == date(2026, 5, 4)


def test_a_due_date_on_a_working_day_is_kept() -> None:
    day, rule = request(date(2026, 11, 13)).deadline(CAL)  # a Friday
    assert day == date(2026, 11, 13)
    assert rule == "DueDate given by the requester (QĐ 1342 Điều 7.3.a)"
    # Outside the years the calendar covers (2000–2099) it cannot say: kept as given.
    assert request(date(2100, 1, 2)).deadline(CAL)[0] == date(2100, 1, 2)  # a Saturday


def test_a_due_date_that_had_come_when_the_request_arrived_gives_the_default_period() -> None:
    """DueDate 3 November, received on the 5th: consent was deemed one second after receipt.
    Điều 7.3.a asks the chair to leave time to study it; the default period applies, 15
    working days from receipt (Điều 7.3.c), and so for a DueDate of the day of receipt."""
    for due in (date(2026, 11, 3), date(2026, 11, 5)):
        r = request(due, "2026-11-05")
        day, rule = r.deadline(CAL)
        assert day == CAL.add_working_days(date(2026, 11, 5), 15)
        assert f"DueDate {due} given by the requester had come when the request arrived" in rule
        [st] = requests_status([r], [], CAL, at("2026-11-05", "10:01"))
        assert st.state == "open"
    assert request(date(2026, 11, 6), "2026-11-05").deadline(CAL)[0] == date(2026, 11, 6)


ORIGINAL = "H26.CATP,2026/11/02,1/YC"


def change(business: str, due: date | None, received: str, seq: int = 5) -> Request:
    """The requester's later document naming the request: an update (extension) or revoke."""
    return Request(seq, f"H26.CATP,{received.replace('-', '/')},{seq}/YC", "H26.CATP",
                   ("H26.SNV",), at(received), due, business=business, replaces=ORIGINAL)  # fmt: skip


def test_an_extension_moves_the_deadline_and_a_reply_to_either_answers() -> None:
    """The requester extends its request (an update naming it, with a later DueDate): the
    original kept its deadline and ended in deemed consent, and the update was taken for a
    second request, which a reply to the original did not answer."""
    original = request(date(2026, 12, 14))
    extended = change("update", date(2027, 1, 15), "2026-11-20")
    [st] = requests_status([original, extended], [], CAL, at("2026-12-20"))
    assert (st.request.document_id, st.deadline, st.state) == (ORIGINAL, date(2027, 1, 15), "open")
    answer = reply(at("2027-01-10"))  # to the original's DocumentId
    [st] = requests_status([original, extended], [answer], CAL, at("2027-01-20"))
    assert st.state == "answered"


def test_a_withdrawn_request_is_no_deemed_consent_and_the_revoke_no_request() -> None:
    """A revoke made two deemed consents: one for the request, one for the revoke itself."""
    original = request(date(2026, 11, 20))
    revoke = change("revoke", date(2026, 11, 30), "2026-11-10")
    statuses = requests_status([original, revoke], [], CAL, at("2026-12-20"))
    assert [(st.request.document_id, st.state) for st in statuses] == [(ORIGINAL, "withdrawn")]
    # Another requester cannot withdraw it.
    other = dataclasses.replace(revoke, requester="H26.STP")
    [st] = requests_status([original, other], [], CAL, at("2026-12-20"))
    assert st.state == "deemed-consent"


def test_a_change_after_the_deadline_leaves_the_consent_deemed() -> None:
    """Consent deemed at 24:00 on 20 November (and perhaps filed): a revoke on 10 December
    made the request withdrawn, an update then reopened it; each is too late. A late update
    is a request of its own."""
    original = request(date(2026, 11, 20))
    revoke = change("revoke", None, "2026-12-10")
    [st] = requests_status([original, revoke], [], CAL, at("2026-12-20"))
    assert st.state == "deemed-consent"
    update = change("update", date(2027, 1, 15), "2026-12-10")
    statuses = requests_status([original, update], [], CAL, at("2026-12-20"))
    assert [(st.request.document_id, st.state) for st in statuses] == [
        (ORIGINAL, "deemed-consent"), (update.document_id, "open"),
    ]  # fmt: skip


def test_an_update_never_shortens_the_time_given() -> None:
    """An update with an earlier DueDate (or one that had come) made consent deemed at once,
    and a reply in time for the request turned late after the fact."""
    original = request(date(2026, 11, 20))
    for due in (date(2026, 11, 10), date(2026, 11, 19)):
        shorter = change("update", due, "2026-11-19")
        [st] = requests_status([original, shorter], [], CAL, at("2026-11-19", "12:00"))
        assert (st.deadline, st.state) == (date(2026, 11, 20), "open")


def test_an_update_after_a_revoke_is_a_request_of_its_own() -> None:
    """Revoked, then an update naming it: lost, the request stayed withdrawn."""
    original = request(date(2026, 11, 20))
    revoke = change("revoke", None, "2026-11-10", seq=5)
    again = change("update", date(2026, 12, 30), "2026-11-12", seq=6)
    statuses = requests_status([original, revoke, again], [], CAL, at("2026-11-25"))
    assert [(st.request.document_id, st.state) for st in statuses] == [
        (ORIGINAL, "withdrawn"), (again.document_id, "open"),
    ]  # fmt: skip
