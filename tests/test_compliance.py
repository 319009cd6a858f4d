"""Compliance status and ad-hoc requests: scenarios with a fixed clock walked across a whole
month (pure), the same through real signed messages, the worker and the archive, the CLI
(text, JSON, CSV, the printable HTML), and the Hanoi 2017 preset."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database, sqlite_url
from archive.records import Transport
from archive.service import Archive
from formats.categories import CATEGORIES
from formats.errors import InputError
from formats.payload import Business, Organ, Signer, build_payload
from formats.smime import build_message
from formats.vntime import VN_TZ
from gateway import intake, obligation_store
from gateway.adhoc import Reply, Request, deemed_consent_item, requests_status
from gateway.cli import cli
from gateway.cli_compliance import report_csv, status_text
from gateway.compliance import Submission, matrix, month_bounds, month_labels, status_for
from gateway.compliance_html import label as label_vi
from gateway.compliance_html import render as render_html
from gateway.demo import HUB_ADDRESS, WORK_PERMITS, DemoWorld
from gateway.obligations import Obligation, default_due, periods
from gateway.pipeline import Context
from gateway.workdays import Calendar
from gateway.worker import Worker
from keys import store
from keys.directory import Agency
from keys.issuing import make_crl
from keys.trust import TrustStore

CAL = Calendar.load()
MONTH = [date(2026, 10, 16) + timedelta(days=n) for n in range(31)]  # 16 Oct – 15 Nov 2026


def local(day: str, hm: str = "10:00") -> datetime:
    """``"10-27"`` → 27 Oct 2026 (Nov for 11-…) at ``hm`` in Vietnam."""
    return datetime.fromisoformat(f"2026-{day}T{hm}:00+07:00")


def ob(
    provider: str, category: str = "work-permit", cadence: str = "monthly", **kw: Any
) -> Obligation:
    values: dict[str, Any] = {
        "id": f"t-{provider.lower().replace('.', '-')}-{category}-{cadence}",
        "provider": provider,
        "recipients": ("H26.CATP",) if provider != "H26.CATP" else ("H26.SNV",),
        "category": category,
        "cadence": cadence,
        "due": default_due(cadence),
        "legal_basis": "QĐ 18/2017/QĐ-UBND Điều 8.2.c",
    }
    return Obligation(**{**values, **kw})


def sub(seq: int, provider: str, when: datetime, status: str = "accepted", **kw: Any) -> Submission:
    return Submission(
        seq,
        provider,
        kw.pop("category", "work-permit"),
        kw.pop("period", "2026-10"),
        status,
        when,
        kw.pop("document_id", f"{provider},2026/10/01,{seq}/BC"),
        cadence=kw.pop("cadence", "monthly"),
        **kw,
    )


def timeline(
    days: Sequence[date], state_at: Callable[[datetime], Mapping[str, Any]]
) -> dict[str, list[tuple[str, Any]]]:
    """For each key, the days its state changed (at 23:00 local) and the new state."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for day in days:
        for key, state in state_at(datetime.combine(day, time(23), VN_TZ)).items():
            changes = out.setdefault(key, [])
            if not changes or changes[-1][1] != state:
                changes.append((f"{day:%m-%d}", state))
    return out


# --- status: a whole month, day by day ---------------------------------------------------------

STORY = {
    "H26.A": [sub(1, "H26.A", local("10-20"))],
    "H26.B": [sub(2, "H26.B", local("10-27"))],
    "H26.C": [],
    "H26.D": [
        sub(3, "H26.D", local("10-21"), document_id="D,1"),
        sub(4, "H26.D", local("10-30"), business="update", replaces="D,1", document_id="D,2"),
    ],
    "H26.E": [
        sub(5, "H26.E", local("10-19"), "rejected"),
        sub(6, "H26.E", local("10-21"), "rejected"),
    ],
    "H26.F": [
        sub(7, "H26.F", local("10-24"), document_id="F,1"),  # a Saturday after Thursday's deadline
        sub(8, "H26.F", local("11-03"), business="replace", replaces="F,1", document_id="F,2"),
    ],
    "H26.G": [sub(9, "H26.G", local("10-21"), "rejected"), sub(10, "H26.G", local("10-23"))],
    "H26.H": [
        sub(11, "H26.H", local("10-20")),
        sub(12, "H26.H", local("10-29"), business="revoke"),
    ],
}
EXPECTED = {
    "H26.A": [("10-16", ("not-due-yet", 0)), ("10-20", ("on-time", 0))],
    "H26.B": [("10-16", ("not-due-yet", 0)), ("10-23", ("missing", 0)), ("10-27", ("late", 3))],
    "H26.C": [("10-16", ("not-due-yet", 0)), ("10-23", ("missing", 0))],
    "H26.D": [
        ("10-16", ("not-due-yet", 0)),
        ("10-21", ("on-time", 0)),
        ("10-30", ("corrected", 0)),
    ],
    "H26.E": [("10-16", ("not-due-yet", 0)), ("10-19", ("rejected-only", 0))],
    "H26.F": [
        ("10-16", ("not-due-yet", 0)),
        ("10-23", ("missing", 0)),
        ("10-24", ("late", 1)),
        ("11-03", ("corrected", 1)),
    ],
    "H26.G": [
        ("10-16", ("not-due-yet", 0)),
        ("10-21", ("rejected-only", 0)),
        ("10-23", ("late", 1)),
    ],
    "H26.H": [("10-16", ("not-due-yet", 0)), ("10-20", ("on-time", 0)), ("10-29", ("missing", 0))],
}


def test_a_month_of_status_day_by_day() -> None:
    obligations = [ob(p) for p in STORY]
    subs = [s for story in STORY.values() for s in story]

    def state(now: datetime) -> dict[str, Any]:
        report = matrix(obligations, subs, CAL, "2026-10", now)
        assert {c.due for c in report.cells} == {date(2026, 10, 22)}  # 5 working days after 15th
        assert report.calendar_version == CAL.version
        return {c.obligation.provider: (c.status, c.late_days) for c in report.cells}

    assert timeline(MONTH, state) == EXPECTED
    cells = {
        c.obligation.provider: c
        for c in matrix(obligations, subs, CAL, "2026-10", local("11-15")).cells
    }
    assert (cells["H26.D"].document_id, cells["H26.D"].corrections) == ("D,2", 1)
    assert cells["H26.D"].received_at == local("10-21")  # timeliness of the first
    assert (cells["H26.E"].rejected, cells["H26.G"].rejected) == (2, 1)
    assert cells["H26.H"].withdrawn


def test_the_deadline_ends_at_midnight_in_vietnam() -> None:
    o = ob("H26.A")
    [period] = periods(o, *month_bounds("2026-10"))
    last_second = datetime(2026, 10, 22, 16, 59, 59, tzinfo=UTC)  # 23:59:59 UTC+7
    midnight = datetime(2026, 10, 22, 17, 0, tzinfo=UTC)
    assert status_for(o, period, [], CAL, last_second).status == "not-due-yet"
    assert status_for(o, period, [], CAL, midnight).status == "missing"
    on_time = status_for(o, period, [sub(1, "H26.A", last_second)], CAL, midnight)
    late = status_for(o, period, [sub(1, "H26.A", midnight)], CAL, midnight)
    assert (on_time.status, late.status, late.late_days) == ("on-time", "late", 1)
    other = [
        sub(2, "H26.B", last_second),
        sub(3, "H26.A", last_second, category="tax"),
        sub(4, "H26.A", last_second, period="2026-09"),
    ]
    assert status_for(o, period, other, CAL, midnight).status == "missing"


def test_matrix_agrees_with_status_for_on_random_histories() -> None:
    rng = random.Random(7)
    obligations = [ob(f"H26.R{n}") for n in range(60)]
    subs = []
    for n in range(150):
        provider = f"H26.R{rng.randrange(60)}"
        subs.append(
            sub(
                n,
                provider,
                local("10-10") + timedelta(hours=rng.randrange(24 * 31)),  # some early
                rng.choice(["accepted", "accepted", "rejected"]),
                business=rng.choice(["new", "new", "update", "replace", "revoke"]),
                cadence=rng.choice(["monthly", "monthly", None, "ad-hoc", "annual"]),
                # a revoke names nothing (archived before the rule), or one of the provider's
                replaces=rng.choice([None, f"{provider},2026/10/01,{rng.randrange(n + 1)}/BC"]),
            )
        )
    for now in (local("10-21"), local("10-28"), local("11-15")):
        report = matrix(obligations, subs, CAL, "2026-10", now)
        for cell in report.cells:
            assert cell == status_for(cell.obligation, cell.period, subs, CAL, now)


def test_the_hanoi_preset_matrix() -> None:
    preset = obligation_store.preset("hanoi-2017")
    october = matrix(preset, [], CAL, "2026-10", local("11-01"))
    monthly = [o for o in preset if o.cadence == "monthly" and o.active(date(2026, 10, 15))]
    assert len(october.cells) == len(monthly) > 0
    assert october.counts()["missing"] == len(monthly)
    assert matrix(preset, [], CAL, "2026-10", local("10-20")).counts()["not-due-yet"] == len(
        monthly
    )
    # November: the monthly rows and the annual 8.2.b report, due before 16 November.
    november = matrix(preset, [], CAL, "2026-11", local("11-20"))
    annual = [c for c in november.cells if c.obligation.cadence == "annual"]
    assert [(c.obligation.provider, c.period.label, c.due) for c in annual] == [
        ("H26.VPUBND", "2026", date(2026, 11, 16))  # before the 16th: Sunday 15th → Monday
    ]
    # A monthly November report does not fulfil the annual one.
    report = sub(1, "H26.VPUBND", local("11-18"), category="foreign-affairs", period="2026-11")
    cells = matrix(preset, [report], CAL, "2026-11", local("11-20")).cells
    found = {
        c.obligation.cadence: c.status
        for c in cells
        if (c.obligation.provider, c.obligation.category) == ("H26.VPUBND", "foreign-affairs")
    }
    assert found == {"monthly": "on-time", "annual": "missing"}


def test_submissions_from_entries() -> None:
    fields = {
        "status": "accepted",
        "agency": "H26.SNV",
        "category": "work-permit",
        "period": "2026-10",
        "document_id": "H26.SNV,2026/10/20,1/X",
        "transport": {"received_at": "2026-10-20T03:00:00+00:00"},
        "payload": {
            "business": "replace",
            "replaces": "H26.SNV,2026/10/19,1/X",
            "cadence": "monthly",
        },
    }
    s = Submission.from_entry(5, fields)
    assert s is not None
    assert (s.business, s.replaces, s.received_on) == (
        "replace",
        "H26.SNV,2026/10/19,1/X",
        date(2026, 10, 20),
    )
    assert Submission.from_entry(6, {**fields, "status": "quarantined"}) is None
    assert Submission.from_entry(7, {**fields, "period": None}) is None


def _both(o: Obligation, subs: Sequence[Submission], now: datetime) -> Any:
    """The cell of ``o``'s period ending in the month of ``subs``, by :func:`status_for` and
    by :func:`matrix` (which agree)."""
    label = subs[0].period
    [cell] = [c for c in matrix([o], subs, CAL, label, now).cells]
    assert cell == status_for(o, cell.period, subs, CAL, now)
    return cell


def test_a_revoke_withdraws_only_the_report_it_names() -> None:
    o, now = ob("H26.A"), local("11-15")
    a = sub(1, "H26.A", local("10-20"), document_id="A")
    b = sub(2, "H26.A", local("10-21"), document_id="B")  # a second "new": ignored, A in force
    c = sub(3, "H26.A", local("10-21"), business="update", replaces="A", document_id="C")

    def revoke(replaces: str | None) -> Submission:
        return sub(
            9, "H26.A", local("10-23"), business="revoke", replaces=replaces, document_id="R"
        )

    for history, revoked, expected in (
        ([a, b], "B", ("on-time", "A", False)),  # what it names was never in force
        ([a], "H26.A,2020/01/01,999/XYZ", ("on-time", "A", False)),
        ([a], "A", ("missing", None, True)),
        ([a, c], "C", ("missing", None, True)),  # the report in force
        ([a, c], "A", ("missing", None, True)),  # the report it superseded
        ([a, b, c], "B", ("corrected", "C", False)),
        ([a, b], None, ("missing", None, True)),  # archived before a revoke had to name it
    ):
        cell = _both(o, [*history, revoke(revoked)], now)
        assert (cell.status, cell.document_id, cell.withdrawn) == expected, (history, revoked)
    # A revoke with nothing in force changes nothing, and does not hide the rejected ones.
    rejected = sub(5, "H26.A", local("10-20"), "rejected")
    assert _both(o, [rejected, revoke("A")], now).status == "rejected-only"


def test_a_withdrawn_report_is_as_if_never_sent() -> None:
    """An on-time placeholder, revoked, then the real report a month late: late, not
    corrected; corrections are counted from the real one."""
    o, now = ob("H26.A"), local("11-30")
    placeholder = sub(1, "H26.A", local("10-20"), document_id="P")
    revoke = sub(2, "H26.A", local("10-21"), business="revoke", replaces="P", document_id="R")
    real = sub(3, "H26.A", local("11-20"), document_id="X")
    cell = _both(o, [placeholder, revoke, real], now)
    assert (cell.status, cell.late_days, cell.received_at) == ("late", 21, local("11-20"))
    assert (cell.document_id, cell.corrections, cell.withdrawn) == ("X", 0, False)
    fix = sub(4, "H26.A", local("11-25"), business="replace", replaces="X", document_id="Y")
    cell = _both(o, [placeholder, revoke, real, fix], now)
    assert (cell.status, cell.late_days, cell.document_id, cell.corrections) == (
        "corrected",
        21,
        "Y",
        1,
    )
    # Withdrawn again: nothing in force, and an update of the withdrawn report starts afresh.
    again = sub(5, "H26.A", local("11-26"), business="revoke", replaces="X", document_id="R2")
    cell = _both(o, [placeholder, revoke, real, fix, again], now)
    assert (cell.status, cell.document_id, cell.corrections, cell.withdrawn) == (
        "missing",
        None,
        0,
        True,
    )


def test_an_ad_hoc_payload_fulfils_no_periodic_obligation() -> None:
    """Điều 8.4.a: periodic reports or ad-hoc requests. One ad-hoc payload in November is
    neither the monthly 2026-11 report nor the annual 2026 one."""
    monthly, annual = ob("H26.A"), ob("H26.A", cadence="annual")
    now = local("11-30")
    adhoc = sub(1, "H26.A", local("11-01"), period="2026-11", cadence="ad-hoc")
    cells = matrix([monthly, annual], [adhoc], CAL, "2026-11", now).cells
    assert [(c.obligation.cadence, c.status) for c in cells] == [
        ("monthly", "missing"),
        ("annual", "missing"),
    ]
    for cell in cells:  # also among several payloads, and as the first one
        assert status_for(cell.obligation, cell.period, [adhoc], CAL, now).status == "missing"
    unstated = sub(2, "H26.A", local("11-17"), period="2026-11", cadence=None)
    cell = matrix([monthly], [adhoc, unstated], CAL, "2026-11", now).cells[0]
    assert (cell.status, cell.received_at) == ("on-time", local("11-17"))


def test_a_report_sent_before_its_period_ended_is_early() -> None:
    """Điều 8.4.a: the October data run to Thursday 15 October. A report received by then
    cannot cover the period's last days, but the regulation sets no earliest day to send: it
    keeps its status (on time by the due date) with the ``early`` flag, shown as a note and
    counted under no status of its own. A correction received after the period clears it."""
    o, now = ob("H26.A"), local("11-15")
    on_the_15th = sub(1, "H26.A", local("10-15", "23:00"), document_id="E")
    cell = _both(o, [on_the_15th], now)
    assert (cell.status, cell.early, cell.late_days, cell.document_id) == ("on-time", True, 0, "E")
    assert cell.received_at == local("10-15", "23:00")
    at_once = _both(o, [on_the_15th], local("10-15", "23:30"))
    assert (at_once.status, at_once.early) == ("on-time", True)
    after = _both(o, [sub(2, "H26.A", local("10-16", "00:00"))], now)
    assert (after.status, after.early) == ("on-time", False)

    def fix(when: datetime, business: str = "replace") -> Submission:
        return sub(3, "H26.A", when, business=business, replaces="E", document_id="F")

    # Timeliness is the first report's; the flag follows the report in force.
    completed = _both(o, [on_the_15th, fix(local("10-19"))], now)
    assert (completed.status, completed.early, completed.late_days) == ("corrected", False, 0)
    assert (completed.received_at, completed.document_id) == (local("10-15", "23:00"), "F")
    after_due = _both(o, [on_the_15th, fix(local("10-26"), "update")], now)  # due Thu 22 Oct
    assert (after_due.status, after_due.early, after_due.late_days) == ("corrected", False, 0)
    still = _both(o, [on_the_15th, fix(local("10-15", "23:30"))], now)  # early too
    assert (still.status, still.early, still.corrections) == ("corrected", True, 1)
    second_new = _both(o, [on_the_15th, sub(4, "H26.A", local("10-19"))], now)  # not a fix
    assert (second_new.status, second_new.early) == ("on-time", True)

    # Shown as a note beside the status, in English and Vietnamese; kept in JSON and CSV.
    note = "sent before the period ended: it cannot cover the period's last days"
    assert status_text(cell) == f"on time ({note})"
    assert status_text(still) == f"corrected ({note})"
    assert status_text(completed) == "corrected"
    note_vi = "gửi trước khi hết kỳ: chưa thể có số liệu những ngày cuối kỳ"
    assert label_vi(cell) == f"Đúng hạn ({note_vi})"
    assert "trước khi hết kỳ" not in label_vi(completed)
    assert cell.as_dict(CAL.version)["early"] is True
    assert completed.as_dict(CAL.version)["early"] is False
    report = matrix([o], [on_the_15th], CAL, "2026-10", now)
    assert report.counts()["on-time"] == 1 and "early" not in report.counts()
    [row] = csv.DictReader(io.StringIO(report_csv([report], {})))
    assert row["early"] == "True" and row["status"] == "on-time"
    page = render_html(report, {}, generated=now)
    assert page.count(note_vi) == 2  # the cell's note, and the legend's
    assert 'class="cell early"' not in page and "Gửi trước khi hết kỳ" not in page
    # A report after the due date is late, not early.
    late = _both(o, [sub(5, "H26.A", local("10-26"))], now)
    assert (late.status, late.early, late.late_days) == ("late", False, 2)

    # A report due before a date is due within its period: the annual report of 2026 (16 Nov
    # 2025 – 15 Nov 2026) sent on 10 November is on time, not early; one sent before the
    # period began is on time too, and early.
    annual = ob("H26.A", cadence="annual")
    in_period = sub(6, "H26.A", local("11-10"), period="2026-11", cadence="annual")
    ahead = sub(
        7, "H26.A", datetime(2025, 11, 10, 9, tzinfo=VN_TZ), period="2026-11", cadence="annual"
    )
    for payload, early in ((in_period, False), (ahead, True)):
        found = _both(annual, [payload], now)
        assert (found.status, found.early) == ("on-time", early), payload


def test_an_annual_report_due_on_a_sunday_is_due_the_next_working_day() -> None:
    """BLDS 2015 Điều 148.5: "trước ngày 16/11" makes Sunday 15 November 2026 the last day, so
    the deadline ends with Monday the 16th; Tuesday is a working day late."""
    annual, now = ob("H26.A", cadence="annual"), local("11-30")

    def at(day: str) -> Any:
        return _both(annual, [sub(1, "H26.A", local(day), period="2026-11", cadence="annual")], now)

    assert at("11-16").due == date(2026, 11, 16)
    assert (at("11-16").status, at("11-17").status, at("11-17").late_days) == ("on-time", "late", 1)
    assert _both(annual, [sub(1, "H26.A", local("11-16"), period="2026-11")], now).status == (
        "missing"  # a monthly report is not the annual one
    )
    nothing = matrix([annual], [], CAL, "2026-11", local("11-16", "23:59")).cells[0]
    assert nothing.status == "not-due-yet"


def test_a_payload_without_cadence_counts_for_its_period_length_only() -> None:
    """The envelope requires Cadence; an entry archived without one fulfils the obligation whose
    cadence its period's length fits — not every cadence — and without a period, monthly."""
    monthly, annual, now = ob("H26.A"), ob("H26.A", cadence="annual"), local("11-30")
    a_year = sub(
        1, "H26.A", local("11-13"), period="2026-11", cadence=None,
        period_start=date(2025, 11, 16), period_end=date(2026, 11, 15),
    )  # fmt: skip
    a_month = sub(
        2, "H26.A", local("11-18"), period="2026-11", cadence=None,
        period_start=date(2026, 10, 16), period_end=date(2026, 11, 15),
    )  # fmt: skip
    unknown = sub(3, "H26.A", local("11-18"), period="2026-11", cadence=None)
    for subs, expected in (
        ([a_year], {"monthly": "missing", "annual": "on-time"}),
        ([a_month], {"monthly": "on-time", "annual": "missing"}),
        ([unknown], {"monthly": "on-time", "annual": "missing"}),
    ):
        cells = matrix([monthly, annual], subs, CAL, "2026-11", now).cells
        assert {c.obligation.cadence: c.status for c in cells} == expected, subs
        for cell in cells:
            assert cell == status_for(cell.obligation, cell.period, subs, CAL, now)
    fields = {
        "status": "accepted",
        "agency": "H26.A",
        "category": "work-permit",
        "period": "2026-11",
        "transport": {"received_at": "2026-11-13T03:00:00+00:00"},
        "payload": {"period_start": "2025-11-16", "period_end": "2026-11-15"},
    }
    entry = Submission.from_entry(9, fields)
    assert entry is not None and (entry.cadence, entry.counts_for) == (None, "annual")


def test_a_correction_counts_only_when_it_names_a_report_in_force() -> None:
    """A correction (update, replace) supersedes the report in force only when it names it or
    a report it superseded, filed by the same sender for the same obligation and period (an
    update may name nothing: it updates the report in force). Otherwise it is ignored and the
    cell says so. With nothing in force, a correction is the report: the data were provided."""
    o, now = ob("H26.A"), local("11-15")
    a = sub(1, "H26.A", local("10-20"), document_id="A")
    c = sub(2, "H26.A", local("10-21"), business="update", replaces="A", document_id="C")
    other_period = sub(3, "H26.A", local("10-01"), period="2026-09", document_id="S")
    revoke_a = sub(4, "H26.A", local("10-22"), business="revoke", replaces="A", document_id="R")
    rejected_a = sub(1, "H26.A", local("10-20"), "rejected", document_id="A")

    def fix(replaces: str | None, business: str = "replace") -> Submission:
        return sub(
            9, "H26.A", local("10-23"), business=business, replaces=replaces, document_id="X"
        )

    for history, expected in (
        ([a, fix("H26.A,2020/01/01,999/XYZ")], ("on-time", "A", 0, ("X",))),  # never filed
        ([a, other_period, fix("S")], ("on-time", "A", 0, ("X",))),  # another period's
        # Nothing in force (never sent, or withdrawn): the correction is the report, judged
        # on its own date (the 23rd: a working day late), not ignored.
        ([fix("A")], ("late", "X", 0, ())),
        ([fix(None, "update")], ("late", "X", 0, ())),
        ([a, revoke_a, fix("A")], ("late", "X", 0, ())),
        ([rejected_a, fix("A")], ("late", "X", 0, ())),  # a replace of a rejected report
        ([a, fix("A")], ("corrected", "X", 1, ())),
        ([a, c, fix("A")], ("corrected", "X", 2, ())),  # one it superseded
        ([a, fix(None, "update")], ("corrected", "X", 1, ())),  # an update names nothing
    ):
        cell = _both(o, history, now)
        assert (cell.status, cell.document_id, cell.corrections, cell.ignored) == expected, history
    # Another sender's report of that DocumentId is not this sender's report.
    theirs = sub(5, "H26.B", local("10-20"), document_id="B")
    cell = _both(o, [theirs, a, fix("B")], now)
    assert (cell.status, cell.ignored) == ("on-time", ("X",))
    assert status_text(cell) == "on time (ignored: X names no report in force)"
    assert "bỏ qua bản đính chính X" in label_vi(cell)
    assert cell.as_dict(CAL.version)["ignored_corrections"] == ["X"]


def test_months_have_a_supported_range() -> None:
    assert month_bounds("9999-12") == (date(9999, 12, 1), date(9999, 12, 31))
    assert month_bounds("2028-02") == (date(2028, 2, 1), date(2028, 2, 29))
    for bad in ("0000-01", "2026-13", "2026-1", "26-10", "２０２６-10"):
        with pytest.raises(ValueError, match="is not YYYY-MM"):
            month_bounds(bad)
    assert month_labels("0999-11", "1000-02") == ["0999-11", "0999-12", "1000-01", "1000-02"]


# --- requests: a whole month, day by day -------------------------------------------------------

R1 = Request(
    1,
    "H26.CATP,2026/10/19,1/YC",
    "H26.CATP",
    ("H26.SNV", "H26.STP"),
    local("10-19"),
    date(2026, 10, 30),
)
R2 = Request(2, "H26.STP,2026/10/21,2/YC", "H26.STP", ("H26.CATP",), local("10-21"))
R3 = Request(
    3, "H26.SNV,2026/10/26,3/YC", "H26.SNV", ("H26.STP",), local("10-26"), after_meeting=True
)
REPLIES = [
    Reply(10, "H26.SNV,2026/10/27,1/TL", "H26.SNV", R1.document_id, local("10-27")),
    Reply(11, "H26.STP,2026/11/04,2/TL", "H26.STP", R1.document_id, local("11-04")),
    Reply(12, "H26.CATP,2026/10/28,3/TL", "H26.CATP", R3.document_id, local("10-28")),  # not asked
    Reply(13, "H26.STP,2026/10/28,4/TL", "H26.STP", "H26.SNV,2026/10/26,9/YC", local("10-28")),
    Reply(14, "H26.STP,2026/11/04,5/TL", "H26.STP", R3.document_id, local("11-04", "22:00")),
]


def test_requests_day_by_day_to_deemed_consent() -> None:
    assert [r.deadline(CAL)[0] for r in (R1, R2, R3)] == [
        date(2026, 10, 30),  # DueDate
        date(2026, 11, 11),  # 15 working days from Wed 21 Oct (Điều 7.3.a)
        date(2026, 11, 4),  # 7 working days after the meeting (Điều 7.3.b)
    ]

    def state(now: datetime) -> dict[str, Any]:
        return {
            f"{st.request.seq}→{st.addressee}": (st.state, st.late_days)
            for st in requests_status([R1, R2, R3], REPLIES, CAL, now)
        }

    days = [date(2026, 10, 19) + timedelta(days=n) for n in range(31)]
    assert timeline(days, state) == {
        "1→H26.SNV": [("10-19", ("open", 0)), ("10-27", ("answered", 0))],
        "1→H26.STP": [
            ("10-19", ("open", 0)),
            ("10-31", ("deemed-consent", 0)),
            ("11-04", ("answered-late", 3)),
        ],
        "2→H26.CATP": [("10-21", ("open", 0)), ("11-12", ("deemed-consent", 0))],
        "3→H26.STP": [("10-26", ("open", 0)), ("11-04", ("answered", 0))],
    }
    final = requests_status([R1, R2, R3], REPLIES, CAL, local("11-18"))
    assert [(st.request.seq, st.addressee) for st in final if st.for_chair] == [
        (1, "H26.STP"),
        (2, "H26.CATP"),
    ]
    assert {st.calendar_version for st in final} == {CAL.version}
    item = deemed_consent_item(final[2], local("11-18"))
    assert (item.kind, item.fields["agency"], item.fields["document_id"]) == (
        "deemed-consent",
        "H26.CATP",
        R2.document_id,
    )
    assert item.fields["deemed_at"] == "2026-11-12T00:00:00+07:00"
    with pytest.raises(ValueError, match="not deemed consent"):
        deemed_consent_item(final[0], local("11-18"))


def test_the_documented_default_deadline() -> None:
    r = Request(1, "X,2025/12/24,1/YC", "X", ("Y",), datetime(2025, 12, 24, 9, tzinfo=VN_TZ))
    assert r.deadline(CAL)[0] == date(2026, 1, 15)  # docs/compliance.md


# --- end to end: real signed messages through the worker, the archive, then the CLI -----------

REQUEST = {"Topic": "Người nước ngoài tạm trú", "Question": "Đề nghị cho ý kiến về danh sách"}
REPLY = {"Outcome": "provided", "Text": "Thống nhất"}
HOSTILE = '=1+2 <script>alert("x")</script> & Sở "Ảo"'  # HTML and a CSV formula


class Mail:
    """Agencies of the demo world sending real messages to a hub on an archive at ``home``."""

    def __init__(self, world: DemoWorld, home: Path) -> None:
        self.world, self.n = world, 0
        key = world.hub.key
        assert isinstance(key, rsa.RSAPrivateKey)
        self.db = Database.open(sqlite_url(home / "archive.db"))
        self.archive = Archive(
            self.db, BlobStore(os.urandom(32)), HUB_ADDRESS, (world.hub.cert, key)
        )
        revoked = [
            (c.cert.serial_number, datetime(2026, 10, 1, tzinfo=UTC))
            for c in world.revoked.values()
        ]
        crl = make_crl(
            world.root,
            revoked=revoked,
            this_update=datetime(2026, 10, 3, 4, tzinfo=UTC),
            next_update=datetime(2026, 12, 31, tzinfo=UTC),
            number=2,
        )
        trust = TrustStore(anchors=(world.root.cert,), crls=(crl.public_bytes(Encoding.DER),))
        self.ctx = Context(world.context().keys, trust, world.directory)

    def send(
        self,
        sender: str,
        category: str,
        records: Sequence[Mapping[str, Any]],
        at: datetime,
        *,
        to: str = "H26.CATP",
        payload_from: str | None = None,
        **kw: Any,
    ) -> str:
        """File one message received at ``at``; returns its DocumentId."""
        self.n += 1
        agency = self.world.directory.get(sender)
        assert agency is not None
        address = sorted(agency.emails)[0]
        payload = build_payload(
            category,
            sender=Organ(payload_from or sender, agency.name_vi, address),
            recipients=[Organ(to)],
            records=records,
            document_number=f"{self.n}/BC",
            issued_on=at.astimezone(VN_TZ).date(),
            message_id=uuid.uuid4(),
            signer=Signer("Nguyễn Văn An", "Phó Giám đốc"),
            **kw,
        )
        raw = build_message(
            payload.to_xml(),
            signer_cert=self.world.agencies[sender].cert,
            signer_key=self.world.agencies[sender].key,
            recipients=[self.world.hub.cert],
            from_addr=address,
            to_addrs=[HUB_ADDRESS],
            message_id=f"<{uuid.uuid4()}@test>",
            date=at,
        )
        transport = Transport(at, "smtp", "127.0.0.1", "mail.test", address, (HUB_ADDRESS,))
        intake.accept(self.db, raw, transport)
        worker = Worker(self.archive, lambda: self.ctx, clock=lambda: at + timedelta(minutes=1))
        [outcome] = worker.run_once()
        assert outcome.disposition == ("rejected" if payload_from else "accepted")
        return str(payload.header.document_id)


@pytest.fixture(scope="module")
def home(world: DemoWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("compliance") / "home"
    world.install(home, b"passphrase")
    mail = Mail(world, home)
    with mail.db.session() as s:
        store.add_agency(
            s, Agency("H26.EVIL", HOSTILE, "Hostile", frozenset()), at=world.at, actor="t"
        )
        for o in (
            ob("H26.SNV"),
            ob("H26.STP"),
            ob("H26.CATP"),
            ob("H26.SNV", "judicial-civil"),
            ob("H26.EVIL", "document"),
        ):
            obligation_store.add(s, o, at=world.at, actor="t")
    wp = {"records": WORK_PERMITS, "period": "2026-10"}
    first = mail.send("H26.SNV", "work-permit", at=local("10-20"), **wp)
    mail.send("H26.STP", "work-permit", at=local("10-21"), payload_from="H26.SNV", **wp)
    request = mail.send(
        "H26.CATP", "request", [REQUEST], local("10-21"), to="H26.SNV", due_date=date(2026, 10, 30)
    )
    mail.send("H26.CATP", "work-permit", at=local("10-26"), to="H26.SNV", **wp)
    mail.send("H26.SNV", "reply", [REPLY], local("10-27"), response_for=request)
    mail.send(
        "H26.SNV", "work-permit", at=local("10-28"), business=Business.REPLACE, replaces=first, **wp
    )
    second = mail.send(
        "H26.STP", "request", [REQUEST], local("10-28"), to="H26.CATP", due_date=date(2026, 11, 2)
    )
    assert second.startswith("H26.STP,")
    assert mail.archive.verify().ok
    mail.db.dispose()
    return home


def gateway(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def statuses(home: Path, at: str) -> dict[tuple[str, str], tuple[str, int]]:
    report = json.loads(
        gateway(home, "compliance", "status", "--period", "2026-10", "--at", at, "--json")
    )
    return {(c["provider"], c["category"]): (c["status"], c["late_days"]) for c in report["cells"]}


def test_real_messages_make_every_status(home: Path) -> None:
    assert statuses(home, "2026-10-22T12:00+07:00") == {
        ("H26.SNV", "work-permit"): ("on-time", 0),
        ("H26.STP", "work-permit"): ("rejected-only", 0),
        ("H26.CATP", "work-permit"): ("not-due-yet", 0),
        ("H26.SNV", "judicial-civil"): ("not-due-yet", 0),
        ("H26.EVIL", "document"): ("not-due-yet", 0),
    }
    assert statuses(home, "2026-11-02") == {
        ("H26.SNV", "work-permit"): ("corrected", 0),
        ("H26.STP", "work-permit"): ("rejected-only", 0),
        ("H26.CATP", "work-permit"): ("late", 2),
        ("H26.SNV", "judicial-civil"): ("missing", 0),
        ("H26.EVIL", "document"): ("missing", 0),
    }
    text = gateway(home, "compliance", "status", "--period", "2026-10", "--at", "2026-11-02")
    assert (
        "H26.CATP           work-permit          2026-10  due 2026-10-22  late 2 working days"
        in text
    )
    history = json.loads(
        gateway(
            home,
            "compliance",
            "history",
            "--agency",
            "H26.SNV",
            "--from",
            "2026-09",
            "--to",
            "2026-11",
            "--at",
            "2026-11-30",
            "--json",
        )
    )
    months = [
        (m["period"], {c["category"]: c["status"] for c in m["cells"]}) for m in history["months"]
    ]
    assert months == [
        ("2026-09", {"work-permit": "missing", "judicial-civil": "missing"}),
        ("2026-10", {"work-permit": "corrected", "judicial-civil": "missing"}),
        ("2026-11", {"work-permit": "missing", "judicial-civil": "missing"}),
    ]


def test_requests_are_answered_or_deemed_consent_and_recorded_once(home: Path) -> None:
    def requests(*args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(gateway(home, "compliance", "requests", "--json", *args))
        return out

    at_oct = requests("--at", "2026-10-31")
    assert [(r["requester"], r["addressee"], r["state"]) for r in at_oct["requests"]] == [
        ("H26.CATP", "H26.SNV", "answered"),
        ("H26.STP", "H26.CATP", "open"),
    ]
    first = requests("--at", "2026-11-03", "--chair", "--record")
    [deemed] = first["requests"]
    assert (deemed["addressee"], deemed["state"], deemed["deadline"]) == (
        "H26.CATP",
        "deemed-consent",
        "2026-11-02",
    )
    assert deemed["calendar_version"] == CAL.version and len(first["recorded"]) == 1
    assert requests("--at", "2026-11-04", "--record")["recorded"] == []  # filed once
    db = Database.open(sqlite_url(home / "archive.db"))
    with db.session() as s:
        entry = s.get(t.LogEntry, first["recorded"][0])
        assert entry is not None and (entry.kind, entry.agency, entry.status) == (
            "deemed-consent",
            "H26.CATP",
            "deemed-consent",
        )
        assert s.query(t.LogEntry).filter_by(kind="read").count() >= 3  # every report is a read
    db.dispose()


def test_csv_and_the_printable_html(home: Path, tmp_path: Path) -> None:
    status = ("compliance", "status", "--period", "2026-10", "--at", "2026-11-02")
    rows = list(csv.DictReader(io.StringIO(gateway(home, *status, "--csv"))))
    assert [
        (r["provider"], r["status"], r["late_days"]) for r in rows if r["status"] == "late"
    ] == [("H26.CATP", "late", "2")]
    assert {r["calendar_version"] for r in rows} == {CAL.version} and len(rows) == 5
    assert [r["provider_name"] for r in rows if r["provider"] == "H26.EVIL"] == ["'" + HOSTILE]
    page = tmp_path / "status.html"
    gateway(home, *status, "--html", str(page))
    html = page.read_text("utf-8")
    for label in (
        "Đã đính chính",
        "Chỉ có bản bị từ chối",
        "Trễ 2 ngày làm việc",
        "Chưa gửi",
        "Đúng hạn",
        "Chưa đến hạn",
        "Sở Nội vụ thành phố Hà Nội",
        CATEGORIES["work-permit"].title_vi,
        "16/09/2026 – 15/10/2026",
        CAL.version,
    ):
        assert label in html, label
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Sở &quot;Ảo&quot;" in html
    assert not any(bad in html for bad in ("<script", "http", "src=", "<link"))  # self-contained
    history = tmp_path / "history.html"
    gateway(
        home,
        "compliance",
        "history",
        "--agency",
        "H26.SNV",
        "--from",
        "2026-08",
        "--to",
        "2026-10",
        "--at",
        "2026-11-02",
        "--html",
        str(history),
    )
    html = history.read_text("utf-8")
    assert [m in html for m in ('<th class="agency">08/2026', "10/2026", "Đã đính chính")] == [
        True
    ] * 3


def test_cli_refusals(home: Path) -> None:
    for args, message in (
        (["status", "--period", "2026-13"], "is not a month"),
        (["status", "--period", "2026-10", "--json", "--csv"], "choose one of"),
        (["history", "--agency", "H26.NOPE"], "no agency 'H26.NOPE'"),
    ):
        result = CliRunner().invoke(cli, ["--home", str(home), "compliance", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_months_and_times_out_of_range_are_usage_errors(home: Path) -> None:
    """One line and exit 2, never "internal error" (exit 70): periods and --at outside the
    years the working-day calendar covers (2000–2099). Times at the ends of what Python can
    hold (years 1 and 9999, which overflow in UTC) may be refused earlier, by the CLI's own
    range for times: still one line and exit 2."""
    calendar_range = (
        ["status", "--period", "9999-12"],
        ["status", "--period", "0001-01"],
        ["status", "--period", "1999-12"],
        ["status", "--period", "2100-01"],
        ["history", "--agency", "H26.SNV", "--from", "0001-01", "--to", "2026-10"],
        ["history", "--agency", "H26.SNV", "--to", "9999-12"],
        ["history", "--agency", "H26.SNV", "--to", "0001-01"],
        ["status", "--period", "2026-10", "--at", "1999-12-31T23:00+07:00"],
        ["status", "--period", "2026-10", "--at", "2099-12-31T20:00-05:00"],  # 2100 in Hanoi
        ["history", "--agency", "H26.SNV", "--at", "2100-01-01"],
        ["requests", "--at", "2100-06-01T09:00+07:00"],
    )
    extreme = (
        ["status", "--period", "2026-10", "--at", "0001-01-01T00:00+09:00"],
        ["status", "--period", "2026-10", "--at", "9999-12-31T23:00-05:00"],
        ["history", "--agency", "H26.SNV", "--at", "0001-01-01"],
        ["requests", "--at", "9999-12-31T23:00-05:00"],
    )
    for args in (*calendar_range, *extreme):
        result = CliRunner().invoke(cli, ["--home", str(home), "compliance", *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (args, result.output)
        if args in calendar_range:
            assert "2000" in lines[0] and "2099" in lines[0], (args, lines)
    # The first and last months still work; --to 2000-05 starts at 2000-01, not 1999-06.
    assert "Period 2099-12" in gateway(home, "compliance", "status", "--period", "2099-12")
    assert "Period 2000-01" in gateway(home, "compliance", "status", "--period", "2000-01")
    first = gateway(home, "compliance", "history", "--agency", "H26.SNV", "--to", "2000-05")
    assert first.splitlines()[0].endswith("2000-01 to 2000-05")


def test_real_revokes_and_ad_hoc_payloads(world: DemoWorld, tmp_path: Path) -> None:
    """Through signed messages and the archive: a revoke of an ignored second report leaves
    the first in force; a revoke must name its document; an ad-hoc payload fulfils neither
    the monthly nor the annual obligation it falls in."""
    home = tmp_path / "home"
    world.install(home, b"passphrase")
    mail = Mail(world, home)
    with mail.db.session() as s:
        obligation_store.add(s, ob("H26.SNV"), at=world.at, actor="t")
        obligation_store.add(s, ob("H26.SNV", cadence="annual"), at=world.at, actor="t")
    wp = {"records": WORK_PERMITS, "period": "2026-10"}
    first = mail.send("H26.SNV", "work-permit", at=local("10-20"), **wp)
    second = mail.send("H26.SNV", "work-permit", at=local("10-21"), **wp)
    with pytest.raises(InputError, match=r"Business 1 \(revoke\) requires ReplacesDocumentId"):
        mail.send("H26.SNV", "work-permit", at=local("10-22"), business=Business.REVOKE, **wp)
    revoke = {"business": Business.REVOKE, "at": local("10-22"), **wp}
    mail.send("H26.SNV", "work-permit", replaces=second, **revoke)
    mail.send(
        "H26.SNV", "work-permit", WORK_PERMITS, local("11-01"), cadence="ad-hoc",
        period_start=date(2026, 11, 1), period_end=date(2026, 11, 1),
    )  # fmt: skip
    mail.db.dispose()

    def cells(period: str) -> list[tuple[str, str, str | None, bool]]:
        report = json.loads(
            gateway(
                home, "compliance", "status", "--period", period, "--at", "2026-11-30", "--json"
            )
        )
        return [
            (c["cadence"], c["status"], c["document_id"], c["withdrawn"]) for c in report["cells"]
        ]

    assert cells("2026-10") == [("monthly", "on-time", first, False)]
    assert sorted(cells("2026-11")) == [
        ("annual", "missing", None, False),
        ("monthly", "missing", None, False),
    ]
