"""Numbers and moments out of range on the command line: a usage error (exit 2) that names the
range, never an ``OverflowError`` from the database driver or ``datetime`` reported as
"internal error" (exit 70)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gateway import cli

#: Wider than any integer column: SQLite's INTEGER and PostgreSQL's BIGINT are 64-bit.
HUGE = "99999999999999999999"
INT64_MAX = str(2**63 - 1)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home as `gateway init` writes it, and its (empty) database."""
    home = tmp_path_factory.mktemp("ranges") / "home"
    assert run(home, "init").exit_code == 0
    assert run(home, "outbox", "list").exit_code == 0
    return home


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli.cli, ["--home", str(home), *args])


def refused(result: Result) -> str:
    """A clean refusal: exit 2 and a message, not an exception escaping the command."""
    assert result.exit_code == 2, (result.exception, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("archive", "show", HUGE),
        ("archive", "release", HUGE),
        ("archive", "export", HUGE, "--out", "bundle.zip"),
        ("archive", "prove", HUGE),
        ("archive", "prove", "0", "--size", HUGE),
        ("archive", "prove", "--consistency", "1", HUGE),
        ("archive", "list", "--after", HUGE),
        ("archive", "list", "--limit", HUGE),
        ("archive", "search", "--after", HUGE),
        ("archive", "search", "--limit", HUGE),
        ("outbox", "list", "--limit", HUGE),
        ("outbox", "retry", HUGE),
        ("outbox", "retry", "1", str(2**31)),  # outbox ids are PostgreSQL INTEGERs
    ],
)
def test_a_number_wider_than_the_database_is_a_usage_error(
    home: Path, args: tuple[str, ...]
) -> None:
    assert "is not in the range" in refused(run(home, *args))


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        (("archive", "show", INT64_MAX), f"no entry {INT64_MAX}"),
        (("archive", "release", INT64_MAX), f"no entry {INT64_MAX}"),
        (("archive", "prove", "0", "--size", INT64_MAX), "no entry 0"),
        (("outbox", "retry", str(2**31 - 1)), f"no outbox row {2**31 - 1}"),
    ],
)
def test_the_widest_number_accepted_is_answered(
    home: Path, args: tuple[str, ...], answer: str
) -> None:
    assert answer in refused(run(home, *args))


def test_listing_after_the_widest_number_finds_nothing(home: Path) -> None:
    result = run(home, "archive", "list", "--after", INT64_MAX, "--limit", INT64_MAX)
    assert result.exit_code == 0, (result.exception, result.output)
    assert result.stdout == "(no entries)\n"


@pytest.mark.parametrize(
    ("option", "bound"),
    [
        ("--to", "9999-12-31"),  # the day after overflows
        ("--from", "9999-12-31"),
        ("--from", "0001-01-01"),  # in UTC: before year 1
        ("--to", "0001-01-01T00:00"),
        ("--from", "1899-12-31T23:59:59+00:00"),
    ],
)
def test_a_search_bound_out_of_range_is_refused(home: Path, option: str, bound: str) -> None:
    message = refused(run(home, "archive", "search", option, bound))
    assert message == f"Error: {bound!r} is out of range: give a day or time in 1900–9998\n"


@pytest.mark.parametrize(
    ("first", "last"),
    [
        ("1900-01-01T00:00Z", "9998-12-31"),
        ("1900-01-01", "9998-12-31T23:59-12:00"),  # in UTC: 1899-12-31 17:00, 9999-01-01
    ],
)
def test_search_bounds_at_the_ends_of_the_range_are_searched(
    home: Path, first: str, last: str
) -> None:
    """The years are those of the bound in its own time zone: 1900-01-01 (Vietnam time) was
    refused, its UTC moment being in 1899."""
    result = run(home, "archive", "search", "--from", first, "--to", last)
    assert result.exit_code == 0, (result.exception, result.output)


@pytest.mark.parametrize(
    "at",
    [
        "1999-12-31T16:59:59+00:00",  # 1999-12-31 23:59:59 in Vietnam
        "2100-01-01T00:00+07:00",
    ],
)
def test_remind_at_a_moment_outside_the_calendar_is_refused(home: Path, at: str) -> None:
    message = refused(run(home, "remind", "--dry-run", "--at", at))
    assert f"--at {at!r} is outside the years the working-day calendar covers (2000–2099" in message
    assert len(message.strip().splitlines()) == 1


@pytest.mark.parametrize("at", ["2000-01-01T00:00+07:00", "2099-12-31T23:59:59+07:00"])
def test_remind_at_the_ends_of_the_calendar_runs(home: Path, at: str) -> None:
    result = run(home, "remind", "--dry-run", "--at", at)
    assert result.exit_code == 0, (result.exception, result.output)


@pytest.mark.parametrize("within", [HUGE + "d", "36501d", "5215w", "876001h"])
def test_an_expiry_horizon_beyond_a_century_is_refused(home: Path, within: str) -> None:
    message = refused(run(home, "keys", "expiring", "--within", within))
    assert f"--within {within}: give at most 36500 days" in message
    assert len(message.strip().splitlines()) == 1


@pytest.mark.parametrize("within", ["36500d", "5214w", "876000h", "0d"])
def test_an_expiry_horizon_up_to_a_century_is_answered(home: Path, within: str) -> None:
    result = run(home, "keys", "expiring", "--within", within)
    assert result.exit_code == 0, (result.exception, result.output)
    assert result.stdout == f"nothing ends within {within}\n"


@pytest.mark.parametrize(
    "args",
    [
        ("archive", "show", HUGE),
        ("outbox", "retry", HUGE),
        ("remind", "--at", "9999-12-31T23:59"),
        ("keys", "expiring", "--within", "99999999999d"),
    ],
)
def test_the_real_command_exits_2_not_70(home: Path, args: tuple[str, ...]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--home", str(home), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "internal error" not in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("doctor", "--at", "9999-12-31T23:59"),
        ("doctor", "--at", "0001-01-01T00:00"),
        ("remind", "--dry-run", "--at", "9999-12-31T23:59"),  # to Vietnam time: past 9999
        ("remind", "--dry-run", "--at", "0001-01-01T00:00+23:59"),  # to UTC: before year 1
    ],
)
def test_a_time_on_the_command_line_outside_the_years_served_is_refused(
    home: Path, args: tuple[str, ...]
) -> None:
    assert "out of range: give a time in the years 1970–2999" in refused(run(home, *args))


@pytest.mark.parametrize(
    "args", [("archive", "list"), ("keys", "list"), ("agencies", "list"), ("outbox", "list")]
)
def test_a_home_that_does_not_exist_is_refused_not_made(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A mistyped --home would otherwise become a new home, with a new archive master key."""
    missing = tmp_path / "mistyped"
    result = run(missing, *args)
    assert f"no gateway home at {missing} (run `gateway init --home {missing}` first)" in refused(
        result
    )
    assert not missing.exists()


def test_a_reminder_run_or_a_record_in_the_future_is_refused(home: Path) -> None:
    """A reminder is queued once, by its key: queued ahead of its time (`remind --at` a future
    moment), it went then and never when it was due. A deemed consent filed for the future
    (`compliance requests --at FUTURE --record`) stayed in the archive for good, true or not."""
    ahead = "2099-01-01T09:00+07:00"
    assert "is in the future: look ahead with --dry-run" in refused(
        run(home, "remind", "--at", ahead)
    )
    assert run(home, "remind", "--dry-run", "--at", ahead).exit_code == 0
    message = refused(run(home, "compliance", "requests", "--at", ahead, "--record"))
    assert "not with a --at in the future" in message
    assert run(home, "compliance", "requests", "--at", ahead).exit_code == 0


def test_remind_reads_a_time_without_an_offset_as_vietnam_time(home: Path) -> None:
    """As the compliance commands do: 20:00 on the due date was 03:00 the next day in Hanoi,
    and a late notice was planned for a report not yet late."""
    result = run(home, "remind", "--dry-run", "--json", "--at", "2026-10-22T20:00")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["at"] == "2026-10-22T20:00:00+07:00"
