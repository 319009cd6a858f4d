"""The Vietnamese working-day calendar: known dates, deadlines, the overlay, the CLI.

The facts are asserted against the package + overlay result, whatever the installed
``holidays`` version lists by itself.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.errors import ConfigError, InputError
from formats.vntime import VN_TZ
from gateway.cli import cli
from gateway.workdays import Calendar, Overlay

CAL = Calendar.load()
NO_PROPOSED = Calendar.load(include_proposed=False)
WITH_CULTURE_DAY = Calendar.load(include={"vn-culture-day"})


def days(first: date, last: date) -> list[date]:
    return [first + timedelta(n) for n in range((last - first).days + 1)]


# --- known dates -------------------------------------------------------------------------------


def test_tet_2026_is_16_to_20_february() -> None:
    assert [CAL.is_working_day(d) for d in days(date(2026, 2, 13), date(2026, 2, 23))] == [
        True,  # Fri 13
        False,  # Sat 14
        False,  # Sun 15
        *[False] * 5,  # Mon 16 – Fri 20: Tết
        False,  # Sat 21
        False,  # Sun 22
        True,  # Mon 23
    ]
    assert [d.date for d in CAL.days_off(2026) if d.date.month == 2] == days(
        date(2026, 2, 16), date(2026, 2, 20)
    )


def test_new_year_2026_swap() -> None:
    assert not CAL.is_working_day(date(2026, 1, 1))
    assert not CAL.is_working_day(date(2026, 1, 2))  # Fri 2 Jan off …
    assert CAL.is_working_day(date(2026, 1, 10))  # … worked on Sat 10 Jan
    assert not CAL.is_working_day(date(2026, 1, 3))
    assert CAL.is_working_day(date(2026, 1, 5))
    (friday,) = (d for d in CAL.days_off(2026) if d.date == date(2026, 1, 2))
    assert "12729/VPCP-KGVX" in friday.source
    assert friday.status == "law"


def test_labour_day_2025_swap() -> None:
    assert not CAL.is_working_day(date(2025, 5, 2))
    assert CAL.is_working_day(date(2025, 4, 26))
    assert not CAL.is_working_day(date(2025, 4, 30))
    assert not CAL.is_working_day(date(2025, 5, 1))


def test_15_working_days_from_24_december_2025_end_15_january() -> None:
    assert CAL.add_working_days(date(2025, 12, 24), 15) == date(2026, 1, 15)


def test_7_working_days_from_20_august_2026_with_and_without_the_proposed_swap() -> None:
    assert CAL.add_working_days(date(2026, 8, 20), 7) == date(2026, 8, 28)
    assert NO_PROPOSED.add_working_days(date(2026, 8, 20), 7) == date(2026, 8, 31)
    dropped = Calendar.load(exclude={"2026-national-day-swap"})
    assert dropped.add_working_days(date(2026, 8, 20), 7) == date(2026, 8, 31)
    # Without the proposal, the package's own listing of the swap is overridden too.
    assert NO_PROPOSED.is_working_day(date(2026, 8, 31))
    assert not NO_PROPOSED.is_working_day(date(2026, 8, 22))
    assert not NO_PROPOSED.is_working_day(date(2026, 9, 1))  # National Day stays


def test_culture_day_is_excluded_by_default_and_included_in_one_line() -> None:
    assert CAL.is_working_day(date(2026, 11, 24))
    assert CAL.is_working_day(date(2027, 11, 24))
    assert CAL.is_working_day(date(2029, 11, 26))  # the package's observed day for a Saturday
    assert not WITH_CULTURE_DAY.is_working_day(date(2026, 11, 24))
    assert not WITH_CULTURE_DAY.is_working_day(date(2027, 11, 24))
    assert CAL.is_working_day(date(2025, 11, 24))  # before 2026 it was never listed


def test_weekends_are_off_and_weekdays_work() -> None:
    assert CAL.is_working_day(date(2026, 3, 11))  # Wed
    assert not CAL.is_working_day(date(2026, 3, 14))  # Sat
    assert not CAL.is_working_day(date(2026, 3, 15))  # Sun
    assert CAL.add_working_days(date(2026, 3, 13), 1) == date(2026, 3, 16)  # Fri → Mon
    assert CAL.add_working_days(date(2026, 3, 14), 1) == date(2026, 3, 16)  # received on Sat


# --- deadlines -----------------------------------------------------------------------------------


def test_deadline_ends_at_24_00_local_which_is_17_00_utc() -> None:
    received = datetime(2025, 12, 24, 9, 30, tzinfo=VN_TZ)
    due = CAL.deadline(received, 15)
    assert due == datetime(2026, 1, 16, 0, 0, tzinfo=VN_TZ)
    assert due.astimezone(UTC) == datetime(2026, 1, 15, 17, 0, tzinfo=UTC)
    assert due.utcoffset() == timedelta(hours=7)


def test_deadline_counts_from_the_local_day_of_receipt() -> None:
    # 18:00 UTC on 24 Dec is 01:00 on 25 Dec in Hanoi: counting starts on Fri 26 Dec.
    late = datetime(2025, 12, 24, 18, 0, tzinfo=UTC)
    assert CAL.deadline(late, 15) == datetime(2026, 1, 17, tzinfo=VN_TZ)  # 24:00 Fri 16 Jan


def test_misuse_fails_at_once_with_the_fix() -> None:
    with pytest.raises(ValueError, match="aware"):
        CAL.deadline(datetime(2026, 1, 1, 9, 0), 3)  # naive on purpose
    with pytest.raises(ValueError, match="≥ 1"):
        CAL.add_working_days(date(2026, 1, 1), 0)
    with pytest.raises(TypeError, match="deadline"):
        CAL.add_working_days(datetime(2026, 1, 1, tzinfo=UTC), 3)
    with pytest.raises(InputError, match="2000–2099"):
        CAL.is_working_day(date(2100, 1, 4))


# --- the property --------------------------------------------------------------------------------


@settings(deadline=None, max_examples=150)
@given(
    start=st.dates(min_value=date(2000, 1, 1), max_value=date(2090, 12, 31)),
    n=st.integers(min_value=1, max_value=300),
    proposed=st.booleans(),
)
def test_adding_n_working_days_lands_on_a_working_day_and_is_monotone(
    start: date, n: int, proposed: bool
) -> None:
    cal = CAL if proposed else NO_PROPOSED
    end = cal.add_working_days(start, n)
    assert cal.is_working_day(end)
    assert sum(cal.is_working_day(d) for d in days(start + timedelta(1), end)) == n
    assert cal.add_working_days(start, n + 1) > end
    assert cal.add_working_days(start + timedelta(1), n) >= end


# --- version and overlay -------------------------------------------------------------------------


def test_version_is_stable_and_names_the_options() -> None:
    assert Calendar.load().version == CAL.version
    assert CAL.version.startswith("vn-") and len(CAL.version) == 15
    assert len({CAL.version, NO_PROPOSED.version, WITH_CULTURE_DAY.version}) == 3
    assert "not applied: vn-culture-day" in CAL.label
    assert "2026-national-day-swap" in NO_PROPOSED.label


def test_every_shipped_entry_has_a_source_and_a_status() -> None:
    shipped = Overlay.shipped()
    assert {e.id for e in shipped.entries} >= {
        "2025-labour-day-swap",
        "2026-new-year-swap",
        "2026-national-day-swap",
        "vn-culture-day",
    }
    assert all(e.source.strip() and e.status for e in shipped.entries)
    statuses = {e.id: e.status for e in shipped.entries}
    assert statuses["2026-national-day-swap"] == "proposed"
    assert statuses["vn-culture-day"] == "not-yet-law"


ENTRY = 'id = "x"\ndate = {date}\nkind = "{kind}"\nname = "n"\nsource = "s"\nstatus = "law"\n'


@pytest.mark.parametrize(
    ("date_", "kind", "message"),
    [
        ("2026-01-09", "workday", "already a working day"),
        ("2026-01-10", "off", "already a day off"),
        ("2026-01-09", "holiday", "kind 'holiday' is not one of"),
        ('"2026-01-09"', "off", "must be a TOML date"),
    ],
)
def test_a_bad_overlay_entry_is_refused_with_the_fix(date_: str, kind: str, message: str) -> None:
    text = "[[entry]]\n" + ENTRY.format(date=date_, kind=kind)
    with pytest.raises(ConfigError, match=message):
        Overlay.parse(text, "extra.toml")


def test_unknown_ids_and_double_claims_are_refused() -> None:
    with pytest.raises(ConfigError, match="no overlay entry nope to include"):
        Calendar.load(include={"nope"})
    clash = Overlay.parse("[[entry]]\n" + ENTRY.format(date="2026-01-02", kind="off"), "x.toml")
    with pytest.raises(ConfigError, match="named by both"):
        Calendar.build(Overlay.shipped().merged(clash))


def test_an_extra_overlay_adds_and_replaces_entries(tmp_path: Path) -> None:
    extra = tmp_path / "hanoi.toml"
    extra.write_text(
        'name = "hanoi"\n'
        # The proposal becomes law: same id, new source and status.
        '[[entry]]\nid = "2026-national-day-swap"\ndate = 2026-08-31\nkind = "off"\n'
        'name = "Day off"\nsource = "Công văn giả định/VPCP-KGVX"\nstatus = "law"\n'
        '[[entry]]\nid = "2026-national-day-swap"\ndate = 2026-08-22\nkind = "workday"\n'
        'name = "Make-up day"\nsource = "Công văn giả định/VPCP-KGVX"\nstatus = "law"\n',
        encoding="utf-8",
    )
    cal = Calendar.load(include_proposed=False, extra_overlay=extra)
    assert cal.add_working_days(date(2026, 8, 20), 7) == date(2026, 8, 28)
    assert "calendar-vn+hanoi" in cal.label
    assert cal.version != CAL.version


# --- the CLI -------------------------------------------------------------------------------------


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["compliance", "calendar", *args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def test_cli_lists_the_year_with_reasons_sources_and_month_counts() -> None:
    code, out = run("2026")
    assert code == 0, out
    assert CAL.version in out
    assert "Fri 2026-01-02  off" in out and "12729/VPCP-KGVX" in out
    assert "Sat 2026-01-10  working" in out
    assert "Mon 2026-08-31  off" in out and "proposed" in out
    assert "Tue 2026-11-24  working" in out and "not applied" in out
    assert "Jan 21" in out and "Feb 15" in out


def test_cli_json_parses_and_follows_the_options() -> None:
    code, out = run("2026", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["version"] == CAL.version
    assert data["working_days"]["2026-01"] == 21
    assert data["total_working_days"] == sum(data["working_days"].values())
    listed = {d["date"]: d for d in data["days"]}
    assert listed["2026-01-02"]["working"] is False
    assert listed["2026-01-10"]["working"] is True

    code, out = run("2026", "--json", "--without-proposed", "--include", "vn-culture-day")
    assert code == 0, out
    other = json.loads(out)
    assert other["version"] not in (CAL.version, NO_PROPOSED.version)
    listed = {d["date"]: d for d in other["days"]}
    assert listed["2026-08-31"]["working"] is True and listed["2026-08-31"]["applied"] is False
    assert listed["2026-11-24"]["working"] is False


def test_cli_errors_are_one_line() -> None:
    code, out = run("2026", "--include", "nope")
    assert code == 2
    assert out.strip().splitlines()[-1].startswith("Error: no overlay entry nope")
    code, out = run("1999")
    assert code == 2
