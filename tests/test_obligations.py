"""Obligations: the model (periods, due dates), the Hanoi 2017 preset against Article 8 and the
agency preset, and ``gateway obligations …`` against a real SQLite database (click's runner)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from archive.db import Database, sqlite_url
from formats.categories import CATEGORIES
from formats.errors import InputError
from formats.vntime import VN_TZ
from gateway import obligation_store
from gateway.cli import cli
from gateway.compliance import Submission, status_for
from gateway.obligations import (
    DueRule,
    Obligation,
    Period,
    active,
    cadence_of,
    complete_from,
    default_due,
    due_date,
    fulfilled_by,
    period_containing,
    periods,
)
from gateway.workdays import Calendar
from keys import agency_io, presets, store

# --- helpers -------------------------------------------------------------------------------------


class Weekdays:
    """A calendar stub: Monday to Friday are working days, no holidays."""

    def add_working_days(self, start: date, n: int) -> date:
        day = start
        while n:
            day += timedelta(days=1)
            if day.weekday() < 5:
                n -= 1
        return day


def obligation(cadence: str = "monthly", **kw: Any) -> Obligation:
    values: dict[str, Any] = {
        "id": "t-1",
        "provider": "H26.STP",
        "recipients": ("H26.CATP",),
        "category": "judicial-civil",
        "cadence": cadence,
        "due": default_due(cadence),
        "legal_basis": "QĐ 18/2017/QĐ-UBND Điều 8.2.e",
    }
    return Obligation(**{**values, **kw})


PRESET = obligation_store.preset("hanoi-2017")
DIRECTORY = {e.agency.organ_id: e.agency for e in agency_io.read(
    presets.data("hanoi"), source="hanoi", fmt="toml"
)}  # fmt: skip
#: Article 8's points with a provider → recipients list: 8.1.đ and 8.2.a–i (đ included).
POINTS = {"8.1.đ", *(f"8.2.{p}" for p in ("a", "b", "c", "d", "đ", "e", "f", "g", "h", "i"))}
_CITED = re.compile(r"^QĐ 18/2017/QĐ-UBND Điều (8\.1\.đ|8\.2\.[a-iđ])\b")


def point(o: Obligation) -> str:
    match = _CITED.match(o.legal_basis)
    assert match, f"{o.id} does not cite a point of Article 8.1.đ/8.2.a–i: {o.legal_basis}"
    return match[1]


# --- the preset against the regulation and the agency preset -----------------------------------


def test_every_row_cites_a_point_and_every_point_is_covered() -> None:
    assert {point(o) for o in PRESET} == POINTS
    assert len({o.id for o in PRESET}) == len(PRESET) == 108


@pytest.mark.parametrize("o", PRESET, ids=lambda o: o.id)
def test_row_category_matches_its_point_and_its_id_follows_the_rule(o: Obligation) -> None:
    category = CATEGORIES[o.category]
    assert category.point is not None
    assert category.point.split(" ")[0] == point(o)  # "8.1.đ (first dash)" → 8.1.đ
    slug = o.provider.lower().removeprefix("h26.").replace(".", "-")
    expected = f"hn2017-{point(o).replace('đ', 'dd')}-{slug}-{o.category}"
    expected += "" if o.cadence == "monthly" else f"-{o.cadence}"
    expected += "" if o.valid_from == date(2017, 7, 1) else f"-from-{o.valid_from}"
    assert o.id == expected


@pytest.mark.parametrize("o", PRESET, ids=lambda o: o.id)
def test_every_agency_is_in_the_directory_preset_for_the_whole_window(o: Obligation) -> None:
    assert obligation_store.window_problems(o, DIRECTORY) == []
    assert o.valid_from is not None and o.valid_from >= date(2017, 7, 1)  # Điều 2: in force


def test_successions_leave_no_gap_and_no_overlap() -> None:
    """For each point, category and cadence, one row per provider line on every day from the
    regulation's start; the districts' own point 8.2.i ends with them on 2025-06-30."""
    lines: dict[tuple[str, str, str], list[Obligation]] = {}
    for o in PRESET:
        lines.setdefault((point(o), o.category, o.cadence), []).append(o)
    day = date(2017, 7, 1)
    while day <= date(2026, 12, 31):
        for key, rows in lines.items():
            providers = [o.provider for o in rows if active(o, day)]
            assert len(providers) == len(set(providers)), (key, day)
            if key[0] != "8.2.i" or day <= date(2025, 6, 30):
                assert providers, (key, day)
            for o in rows:  # the directory agrees: every party exists that day
                if active(o, day):
                    assert all(DIRECTORY[x].active_on(day) for x in (o.provider, *o.recipients))
        day += timedelta(days=1)


@pytest.mark.parametrize(
    ("category", "before", "after"),
    [
        ("work-permit", "H26.SLDTBXH", "H26.SNV"),
        ("foreign-organisation", "H26.SKHDT", "H26.STC"),
        ("foreign-affairs", "H26.SNGV", "H26.VPUBND"),
        ("industrial-zone", "H26.BQLKCN", "H26.BQLKCNC"),
        ("tax", "H26.CTHUE", "H26.CCTKV1"),
        ("bank-transaction", "H26.NHNN", "H26.NHNNKV1"),
    ],
)
def test_an_obligation_passes_to_the_successor_the_day_after(
    category: str, before: str, after: str
) -> None:
    def providers(day: date) -> set[str]:
        return {o.provider for o in PRESET if o.category == category and active(o, day)}

    assert providers(date(2025, 2, 28)) == {before}
    assert providers(date(2025, 3, 1)) == {after}
    successor = [o for o in PRESET if o.provider == after and o.valid_from == date(2025, 3, 1)]
    assert successor and all(before in o.note for o in successor if o.cadence == "monthly")


def test_the_period_of_the_merger_month_is_owed_once() -> None:
    rows = [o for o in PRESET if o.category == "work-permit"]
    owed = {
        p.label: o.provider for o in rows for p in periods(o, date(2025, 1, 1), date(2025, 8, 31))
    }
    assert owed["2025-02"] == "H26.SLDTBXH"  # 16 Jan – 15 Feb: before the merger
    assert owed["2025-03"] == "H26.SNV"  # 16 Feb – 15 Mar: due after it, owed by the successor
    labels = [p.label for o in rows for p in periods(o, date(2025, 1, 1), date(2025, 8, 31))]
    assert sorted(labels) == [f"2025-{m:02}" for m in range(1, 9)]


def test_the_annual_part_of_8_2_b_is_due_before_16_november() -> None:
    annual = [o for o in PRESET if o.cadence == "annual"]
    assert {point(o) for o in annual} == {"8.2.b"}
    owed = [
        (o.provider, p) for o in annual for p in periods(o, date(2025, 1, 1), date(2025, 12, 31))
    ]
    assert owed == [("H26.VPUBND", Period("2025", date(2024, 11, 16), date(2025, 11, 15)))]
    # Before the 16th: the 15th, a Saturday in 2025, so Monday the 17th (BLDS 2015 Điều 148.5).
    assert due_date(annual[0], owed[0][1], Weekdays()) == date(2025, 11, 17)


# --- periods and due dates -----------------------------------------------------------------------


def test_monthly_periods_run_from_the_16th_to_the_15th() -> None:
    o = obligation()
    assert period_containing(o, date(2026, 10, 1)) == Period(
        "2026-10", date(2026, 9, 16), date(2026, 10, 15)
    )
    assert period_containing(o, date(2026, 10, 15)).label == "2026-10"
    assert period_containing(o, date(2026, 10, 16)).label == "2026-11"
    january = period_containing(o, date(2025, 12, 20))
    assert january == Period("2026-01", date(2025, 12, 16), date(2026, 1, 15))
    listed = periods(o, date(2025, 11, 1), date(2026, 2, 15))
    assert [p.label for p in listed] == ["2025-11", "2025-12", "2026-01", "2026-02"]
    assert all(b.first == a.last + timedelta(days=1) for a, b in itertools.pairwise(listed))


def test_periods_are_those_whose_last_day_is_in_range_and_in_force() -> None:
    o = obligation(valid_from=date(2025, 3, 1), valid_to=date(2025, 6, 30))
    assert [p.label for p in periods(o, date(2000, 1, 1), date(2030, 1, 1))] == [
        "2025-03",
        "2025-04",
        "2025-05",
        "2025-06",
    ]
    assert periods(o, date(2025, 6, 16), date(2025, 7, 14)) == []
    assert periods(o, date(2025, 5, 1), date(2025, 4, 1)) == []


def test_monthly_due_is_5_working_days_after_the_15th() -> None:
    o = obligation()
    october = period_containing(o, date(2026, 10, 1))  # ends Thursday 15 Oct 2026
    assert due_date(o, october, Weekdays()) == date(2026, 10, 22)
    november = period_containing(o, date(2025, 11, 1))  # ends Saturday 15 Nov 2025
    assert due_date(o, november, Weekdays()) == date(2025, 11, 21)
    seven = obligation(due=DueRule.working_days_after(7))
    assert due_date(seven, october, Weekdays()) == date(2026, 10, 26)


def test_semiannual_periods_and_due_dates() -> None:
    o = obligation("semiannual", category="document")  # before 15 May and 15 Nov
    listed = periods(o, date(2026, 1, 1), date(2026, 12, 31))
    assert listed == [
        Period("2026-H1", date(2025, 11, 15), date(2026, 5, 14)),
        Period("2026-H2", date(2026, 5, 15), date(2026, 11, 14)),
    ]
    # Thursday 14 May; Saturday 14 November moves to Monday the 16th (BLDS 2015 Điều 148.5).
    assert [due_date(o, p, Weekdays()) for p in listed] == [date(2026, 5, 14), date(2026, 11, 16)]
    by_days = obligation("semiannual", category="document", due=DueRule.working_days_after(3))
    h1 = period_containing(by_days, date(2026, 1, 1))  # same periods, due 3 working days later
    assert h1 == listed[0] and due_date(by_days, h1, Weekdays()) == date(2026, 5, 19)


def test_annual_periods_and_due_dates() -> None:
    o = obligation("annual", category="document")  # before 16 Nov (Điều 13.1)
    listed = periods(o, date(2025, 1, 1), date(2026, 12, 31))
    assert [p.label for p in listed] == ["2025", "2026"]
    assert listed[1] == Period("2026", date(2025, 11, 16), date(2026, 11, 15))
    assert due_date(o, listed[1], Weekdays()) == date(2026, 11, 16)  # Sunday 15th → Monday


def test_a_payload_is_owed_under_an_obligation_of_its_own_cadence_only() -> None:
    """What the worker delivers to an obligation's recipients (as compliance counts it): the
    same cadence or none stated; an ad-hoc payload answers a request (Điều 8.4.a)."""
    monthly, day = obligation(), date(2026, 10, 15)
    assert fulfilled_by(monthly, "H26.STP", "judicial-civil", "monthly", day)
    assert fulfilled_by(monthly, "H26.STP", "judicial-civil", None, day)  # no period: monthly
    for cadence in ("ad-hoc", "annual", "semiannual"):
        assert not fulfilled_by(monthly, "H26.STP", "judicial-civil", cadence, day), cadence
    annual = obligation("annual", category="document")
    assert not fulfilled_by(annual, "H26.STP", "document", "ad-hoc", date(2026, 11, 1))
    assert fulfilled_by(annual, "H26.STP", "document", "annual", date(2026, 11, 1))
    assert not fulfilled_by(monthly, "H26.CATP", "judicial-civil", "monthly", day)
    assert not fulfilled_by(
        obligation(valid_to=date(2026, 9, 30)), "H26.STP", "judicial-civil", "monthly", day
    )


def test_labels_of_custom_before_dates_take_the_year_of_the_last_day() -> None:
    """A period due before 1 January ends on 31 December: it is that year's, not the next."""
    annual = obligation("annual", category="document", due=DueRule.before("01-01"))
    assert period_containing(annual, date(2026, 6, 1)) == Period(
        "2026", date(2026, 1, 1), date(2026, 12, 31)
    )
    halves = obligation("semiannual", category="document", due=DueRule.before("01-01", "07-01"))
    assert periods(halves, date(2026, 1, 1), date(2026, 12, 31)) == [
        Period("2026-H1", date(2026, 1, 1), date(2026, 6, 30)),
        Period("2026-H2", date(2026, 7, 1), date(2026, 12, 31)),
    ]
    late_cut = obligation("semiannual", category="document", due=DueRule.before("06-30", "12-31"))
    assert [p.label for p in periods(late_cut, date(2026, 1, 1), date(2026, 12, 31))] == [
        "2026-H1",  # 31 Dec 2025 – 29 Jun 2026
        "2026-H2",  # 30 Jun – 30 Dec 2026
    ]
    # The defaults keep their labels: 2026-H1 ends 14 May 2026, the annual 2026 on 15 Nov.
    default = obligation("semiannual", category="document")
    assert period_containing(default, date(2026, 1, 1)).label == "2026-H1"
    assert period_containing(obligation("annual", category="document"), date(2026, 1, 1)) == (
        Period("2026", date(2025, 11, 16), date(2026, 11, 15))
    )
    # Labels are zero-padded like the months: periods of year 999 sort with the others.
    assert period_containing(obligation(), date(999, 10, 1)).label == "0999-10"
    assert period_containing(annual, date(999, 10, 1)).label == "0999"


def test_a_due_date_on_a_day_off_moves_to_the_next_working_day() -> None:
    """BLDS 2015 Điều 148.5: a period whose last day is a weekly rest day or a public holiday
    ends at the end of the next working day — for every cadence and rule."""
    cal = Calendar.load()
    annual = obligation("annual", category="document")  # before 16 Nov
    assert due_date(annual, period_containing(annual, date(2026, 1, 1)), cal) == date(2026, 11, 16)
    # Before 3 September: Tuesday 2 September 2025 is National Day, so Wednesday the 3rd.
    national = obligation("annual", category="document", due=DueRule.before("09-03"))
    assert due_date(national, period_containing(national, date(2025, 1, 1)), cal) == date(
        2025, 9, 3
    )
    # Before 1 May: 30 April and 1 May are holidays, Friday 2 May 2025 was swapped off
    # (Công văn 8726/VPCP-KGVX), then the weekend: Monday 5 May.
    may = obligation("annual", category="document", due=DueRule.before("05-01"))
    assert due_date(may, period_containing(may, date(2025, 1, 1)), cal) == date(2025, 5, 5)
    # Every cadence's due date, over four years, is a working day.
    rules = [
        obligation(),
        obligation(due=DueRule.working_days_after(1)),
        obligation("semiannual", category="document"),
        obligation("semiannual", category="document", due=DueRule.before("01-01", "07-01")),
        obligation("annual", category="document"),
        national,
        may,
    ]
    for o in rules:
        for p in periods(o, date(2024, 1, 1), date(2027, 12, 31)):
            due = due_date(o, p, cal)
            assert cal.is_working_day(due) and due >= p.last, (o.due, p)
            if o.due.kind == "before-date":  # the last day, or the first working day after it
                passed = [p.last + timedelta(days=n) for n in range((due - p.last).days)]
                assert not any(cal.is_working_day(d) for d in passed), (o.due, p)


def test_a_report_can_be_complete_once_its_data_are() -> None:
    """Điều 8.4.a: the data run to the 15th, so a monthly report is complete from the 16th; a
    report due before a date is due within its period, so only one before the period is early.
    Early is a flag beside the status, not a status: the report is still on time."""
    cal = Calendar.load()
    monthly = obligation()
    october = period_containing(monthly, date(2026, 10, 1))
    assert complete_from(monthly, october) == date(2026, 10, 16)
    annual = obligation("annual", category="document")
    year = period_containing(annual, date(2026, 1, 1))
    assert complete_from(annual, year) == date(2025, 11, 16) == year.first
    by_days = obligation("annual", category="document", due=DueRule.working_days_after(5))
    assert complete_from(by_days, year) == date(2026, 11, 16)

    def cell(o: Obligation, period: Period, day: date) -> tuple[str, bool]:
        label = f"{period.last:%Y-%m}"
        at = datetime.combine(day, time(10), VN_TZ)
        report = Submission(1, "H26.STP", o.category, label, "accepted", at, cadence=o.cadence)
        found = status_for(o, period, [report], cal, datetime(2027, 1, 1, tzinfo=VN_TZ))
        return found.status, found.early

    for o, period, day, expected in (
        (monthly, october, date(2026, 10, 15), ("on-time", True)),  # the period's last day
        (monthly, october, date(2026, 10, 16), ("on-time", False)),
        (annual, year, date(2025, 11, 15), ("on-time", True)),  # before the period began
        (annual, year, date(2025, 11, 16), ("on-time", False)),  # due within its period
        (by_days, year, date(2026, 11, 15), ("on-time", True)),
        (by_days, year, date(2026, 11, 16), ("on-time", False)),
    ):
        assert cell(o, period, day) == expected, (o.due, day)


def test_the_cadence_of_a_payload_without_one_is_its_period_length() -> None:
    """The envelope schema requires Cadence; entries archived without one count for the
    cadence their period's length fits, never for every cadence."""
    assert cadence_of("annual", date(2026, 10, 1), date(2026, 10, 15)) == "annual"  # as stated
    assert cadence_of(None) == "monthly"  # no period either (Điều 8.4.a: monthly)
    assert cadence_of(None, date(2026, 9, 16), date(2026, 10, 15)) == "monthly"
    assert cadence_of(None, date(2026, 5, 15), date(2026, 11, 14)) == "semiannual"
    assert cadence_of(None, date(2025, 11, 16), date(2026, 11, 15)) == "annual"
    monthly, annual = obligation(), obligation("annual", category="document")
    year = (date(2026, 11, 15), date(2025, 11, 16))
    assert not fulfilled_by(monthly, "H26.STP", "judicial-civil", None, *year)
    assert fulfilled_by(annual, "H26.STP", "document", None, *year)
    month = (date(2026, 11, 15), date(2026, 10, 16))
    assert fulfilled_by(monthly, "H26.STP", "judicial-civil", None, *month)
    assert not fulfilled_by(annual, "H26.STP", "document", None, *month)


def test_a_period_of_another_cadence_is_refused() -> None:
    monthly = period_containing(obligation(), date(2026, 10, 1))
    with pytest.raises(ValueError, match="not a annual period"):
        due_date(obligation("annual", category="document"), monthly, Weekdays())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"category": "taxes"}, "unknown category 'taxes'"),
        ({"category": "status"}, "unknown category 'status'"),
        ({"cadence": "weekly", "due": DueRule.working_days_after()}, "unknown cadence 'weekly'"),
        ({"due": DueRule.before("11-16")}, "monthly obligation is due working days after"),
        ({"recipients": ()}, "no recipients"),
        ({"recipients": ("H26.STP",)}, "cannot be its own recipient"),
        ({"recipients": ("H26.CATP", "H26.CATP")}, "given twice"),
        ({"id": "Has Spaces"}, "lower-case letters"),
        ({"legal_basis": " "}, "cite its legal basis"),
        ({"valid_from": date(2026, 1, 2), "valid_to": date(2026, 1, 1)}, "before valid_from"),
    ],
)
def test_bad_obligations_are_refused_with_the_fix(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        obligation(**change)


def test_due_rules_check_themselves() -> None:
    with pytest.raises(InputError, match="not a day of every year"):
        DueRule.before("02-29")
    with pytest.raises(InputError, match="calendar order"):
        DueRule.before("11-15", "05-15")
    with pytest.raises(InputError, match="two dates"):
        obligation("semiannual", due=DueRule.before("11-16"))
    with pytest.raises(InputError, match="1–60"):
        DueRule.working_days_after(0)
    rule = DueRule.before("05-15", "11-15")
    assert DueRule.from_dict(rule.as_dict()) == rule
    assert rule.describe() == "before 15 May and 15 Nov"


# --- the CLI and the store ------------------------------------------------------------------------

Run = Callable[..., Result]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()  # the CLI refuses a home that does not exist
    return home


@pytest.fixture
def run(home: Path) -> Run:
    def invoke(*args: str | Path, ok: bool = True) -> Result:
        result = CliRunner().invoke(cli, ["--home", str(home), *map(str, args)])
        assert (result.exit_code == 0) == ok, result.output
        return result

    return invoke


def events(home: Path) -> list[tuple[str, str]]:
    db = Database.open(sqlite_url(home / "archive.db"))
    try:
        with db.session() as s:
            return [(e.action, e.subject) for e in store.events(s) if "obligation" in e.action]
    finally:
        db.dispose()


def listing(run: Run, *args: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(run("obligations", "list", "--json", *args).stdout)
    return out


def test_load_preset_needs_the_agencies_first(run: Run, home: Path) -> None:
    result = run("obligations", "load-preset", ok=False)
    assert result.exit_code == 2
    assert "is not in the agency directory" in result.output
    assert "`gateway agencies import --preset hanoi`" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert events(home) == [] and listing(run) == []


def test_load_preset_twice_is_idempotent_and_recorded(run: Run, home: Path) -> None:
    run("agencies", "import", "--preset", "hanoi")
    dry = json.loads(run("obligations", "load-preset", "--dry-run", "--json").stdout)
    assert len(dry["added"]) == 108 and dry["dry_run"] and listing(run) == []
    first = json.loads(run("obligations", "load-preset", "--json").stdout)
    assert first["added"] == dry["added"] and first["warnings"] == []
    recorded = events(home)
    assert len(recorded) == 109 and recorded[-1] == ("obligation.load-preset", "obligations")
    assert {a for a, _ in recorded[:-1]} == {"obligation.add"}
    before = listing(run)
    second = run("obligations", "load-preset").stdout
    assert second.startswith("loaded preset hanoi-2017: 0 added, 0 updated, 108 unchanged")
    assert listing(run) == before and len(events(home)) == 109
    on_day = listing(run, "--at", "2026-10-22", "--provider", "H26.SNV")
    assert [o["id"] for o in on_day] == ["hn2017-8.2.c-snv-work-permit-from-2025-07-01"]
    assert on_day[0]["due"] == {"kind": "working-days-after-period", "n": 5}
    assert on_day[0]["legal_basis"] == "QĐ 18/2017/QĐ-UBND Điều 8.2.c"


def test_retire_is_kept_on_reload_unless_overwrite(run: Run, home: Path) -> None:
    run("agencies", "import", "--preset", "hanoi")
    run("obligations", "load-preset")
    oid = "hn2017-8.2.h-nhnnkv1-bank-transaction-from-2025-03-01"
    out = json.loads(run("obligations", "retire", oid, "--last-day", "2026-06-30", "--json").stdout)
    assert out["status"] == "retired" and out["obligation"]["valid_to"] == "2026-06-30"
    again = json.loads(
        run("obligations", "retire", oid, "--last-day", "2026-06-30", "--json").stdout
    )
    assert again["status"] == "unchanged"
    assert (
        "extend" in run("obligations", "retire", oid, "--last-day", "2027-01-01", ok=False).output
    )
    assert (
        "starts on 2025-03-01"
        in run("obligations", "retire", oid, "--last-day", "2025-01-01", ok=False).output
    )
    assert oid not in [o["id"] for o in listing(run, "--at", "2026-07-01")]
    reload = json.loads(run("obligations", "load-preset", "--json").stdout)
    assert reload["kept"] == [{"id": oid, "differs": ["valid_to"]}] and reload["added"] == []
    # --overwrite puts the preset back; a new due rule changes every working-days row.
    over = json.loads(
        run("obligations", "load-preset", "--overwrite", "--due-working-days", "7", "--json").stdout
    )
    assert oid in over["updated"] and len(over["updated"]) == 106  # all but the two annual rows
    assert listing(run, "--at", "2026-07-01", "--provider", "H26.NHNNKV1")[0]["due"]["n"] == 7
    actions = [a for a, s in events(home) if s == oid]
    assert actions == ["obligation.add", "obligation.retire", "obligation.update"]


def test_load_preset_warns_when_the_directory_was_edited(run: Run) -> None:
    run("agencies", "import", "--preset", "hanoi")
    run("agencies", "retire", "H26.SDL", "--on", "2026-12-31")
    out = run("obligations", "load-preset").stdout
    assert (
        "warning: obligation hn2017-8.1.dd-catp-residence-card-from-2025-03-01: recipient " in out
    )
    assert "H26.SDL is valid until 2026-12-31" in out


def test_add_list_json_and_errors(run: Run, home: Path) -> None:
    run("agencies", "import", "--preset", "hanoi")
    added = json.loads(
        run(
            "obligations", "add", "q11-semiannual-report", "--provider", "H26.STP",
            "--recipient", "H26.UBND", "--recipient", "H26.CATP", "--category", "document",
            "--cadence", "semiannual", "--legal-basis", "QĐ 1342/QĐ-UBND 2023 Điều 13.1",
            "--valid-from", "2026-01-01", "--note", "example", "--json",
        ).stdout
    )  # fmt: skip
    assert added == {
        "status": "added",
        "obligation": {
            "id": "q11-semiannual-report",
            "provider": "H26.STP",
            "recipients": ["H26.UBND", "H26.CATP"],
            "category": "document",
            "cadence": "semiannual",
            "due": {"kind": "before-date", "dates": ["05-15", "11-15"]},
            "legal_basis": "QĐ 1342/QĐ-UBND 2023 Điều 13.1",
            "valid_from": "2026-01-01",
            "valid_to": None,
            "note": "example",
        },
    }
    assert listing(run) == [added["obligation"]]
    assert listing(run, "--at", "2025-12-31") == []
    text = run("obligations", "list").stdout
    assert "q11-semiannual-report" in text and "before 15 May and 15 Nov" in text
    base = ["obligations", "add", "x", "--recipient", "H26.CATP", "--legal-basis", "QĐ"]
    errors = {
        "already exists": [*base[:2], "q11-semiannual-report", *base[3:], "--provider", "H26.STP",
                           "--category", "tax"],
        "provider H26.NOPE is not in the agency directory": [*base, "--provider", "H26.NOPE",
                                                              "--category", "tax"],
        "unknown category 'taxes'": [*base, "--provider", "H26.STP", "--category", "taxes"],
        "H26.SKHDT is valid until 2025-02-28": [*base, "--provider", "H26.SKHDT",
                                                "--category", "foreign-organisation"],
        "not a date": [*base, "--provider", "H26.STP", "--category", "tax", "--valid-to", "1/2"],
        "not both": [*base, "--provider", "H26.STP", "--category", "tax",
                     "--due-working-days", "3", "--due-before", "11-16"],
    }  # fmt: skip
    for message, args in errors.items():
        result = run(*args, ok=False)
        assert message in result.output and "Traceback" not in result.output, message
    assert "no obligation 'nope'" in run("obligations", "retire", "nope", "--last-day",
                                         "2026-01-01", ok=False).output  # fmt: skip
    assert [a for a, _ in events(home)] == ["obligation.add"]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[obligation]]\nid = "a"\nprovider = "X"\nrecipients = ["@nope"]', "no group '@nope'"),
        ('[groups]\ng = ["X", "Y"]\n[[obligation]]\nid = "a"\nprovider = "@g"', "{provider} in"),
        ('[[obligation]]\nid = "a"\ncadence = "weekly"', "unknown cadence 'weekly'"),
        ('[[obligation]]\nid = "a"\ncolour = "red"', "unknown key 'colour'"),
        ("[[obligation]]\nrecipients = []\nvalid_to = '2025-2-3'", "valid_to '2025-2-3' is not a"),
        ("obligation = 3", "'obligation' must be an array of tables"),
        ("groups = 3", "groups must be a table"),
        ("obligation = 3\nbogus = 1", "unknown top-level key 'bogus'"),
        ("[[obligation", "not valid UTF-8 TOML"),
    ],
)
def test_bad_preset_files_are_refused_with_the_line(toml: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        obligation_store.read_preset(toml.encode(), source="p.toml")


def test_a_preset_id_used_twice_is_refused() -> None:
    row = '[[obligation]]\nid = "a"\nprovider = "X"\nrecipients = ["Y"]\ncategory = "tax"\n'
    row += 'legal_basis = "QĐ"\n'
    with pytest.raises(
        InputError, match=re.escape("p.toml: line 7: id a is already used at p.toml: line 1")
    ):
        obligation_store.read_preset((row + row).encode(), source="p.toml")


def test_due_dates_with_the_real_working_day_calendar() -> None:
    """Through gateway.workdays: Tết 2026 (16–20 Feb) pushes the February report back a week."""
    workdays = pytest.importorskip("gateway.workdays")
    calendar = workdays.Calendar.load()
    o = next(x for x in PRESET if x.id == "hn2017-8.2.c-snv-work-permit-from-2025-07-01")
    owed = {
        p.label: due_date(o, p, calendar) for p in periods(o, date(2026, 1, 1), date(2026, 3, 31))
    }
    assert owed == {
        "2026-01": date(2026, 1, 22),
        "2026-02": date(2026, 2, 27),  # 15 Feb is a Sunday; then five days off for Tết
        "2026-03": date(2026, 3, 20),
    }
