"""`gateway archive verify` compares the agency directory with the admin events that made it.

A home whose directory was built only by `gateway agencies add|update|retire|import` verifies;
each edit made behind the gateway's back (a mailbox written into an agency, a name or validity
changed, an agency written in or deleted) is a PROBLEM line naming the agency and the field,
with exit status 1. Edits that leave values of the wrong kind never stop verify.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database, sqlite_url
from archive.service import Archive
from gateway import cli
from keys import store
from keys.directory import Agency
from tests.conftest import WORLD_AT

#: The directory the template home holds, as the admin made it (in this order).
ADMIN_COMMANDS = (
    ("agencies", "import", "--preset", "hanoi"),
    ("agencies", "add", "T01.POLICE", "--name-vi", "Công an tỉnh T01", "--name-en", "Police",
     "--email", "vanthu@ca.t01.gov.vn", "--valid-from", "2020-01-01"),
    ("agencies", "add", "T01.LABOUR", "--name-vi", "Sở Lao động T01", "--email",
     "vanthu@sld.t01.gov.vn", "--supervisor", "T01.POLICE", "--contact", "Phòng Việc làm"),
    ("agencies", "update", "T01.POLICE", "--add-email", "pa08@ca.t01.gov.vn", "--name-en",
     "Provincial Police"),
    ("agencies", "update", "T01.LABOUR", "--email", "mot-cua@sld.t01.gov.vn"),
    ("agencies", "retire", "T01.LABOUR", "--on", "2026-12-31"),
    ("agencies", "update", "H26.SNV", "--add-email", "vanthu@snv.hanoi.gov.vn"),
)  # fmt: skip


def run(home: Path, *args: str | Path) -> Result:
    return CliRunner().invoke(cli.cli, ["--home", str(home), *map(str, args)])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("directory") / "home"
    home.mkdir()
    for command in ADMIN_COMMANDS:
        result = run(home, *command)
        assert result.exit_code == 0, (command, result.output)
    return home


@pytest.fixture
def home(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "home"))


def verify(home: Path) -> Result:
    return run(home, "archive", "verify", "--no-blobs")


def problems(result: Result) -> list[str]:
    return [ln.removeprefix("PROBLEM: ") for ln in result.stdout.splitlines() if "PROBLEM" in ln]


def last_event(home: Path, organ_id: str, *, first: bool = False) -> int:
    """The number of the newest (or the ``first``) admin event about ``organ_id``."""
    db = Database.open(sqlite_url(home / "archive.db"))
    try:
        with db.session() as s:
            number = s.scalar(
                select(t.AdminEvent.seq)
                .where(t.AdminEvent.subject == organ_id)
                .order_by(t.AdminEvent.seq if first else t.AdminEvent.seq.desc())
            )
    finally:
        db.dispose()
    assert isinstance(number, int)
    return number


def tamper(home: Path, edit: Callable[[Connection], object]) -> None:
    """``edit`` the database directly, as someone with write access to it could."""
    db = Database.open(sqlite_url(home / "archive.db"))
    try:
        with db.engine.begin() as c:
            edit(c)
    finally:
        db.dispose()


def test_a_directory_made_by_admin_commands_verifies(home: Path) -> None:
    result = verify(home)
    assert result.exit_code == 0, result.output
    assert problems(result) == []
    assert "archive verifies" in result.stdout


def test_a_mailbox_written_into_an_agency_is_named(home: Path) -> None:
    tamper(
        home,
        lambda c: c.execute(
            insert(t.AgencyEmail).values(organ_id="T01.POLICE", address="thief@evil.example")
        ),
    )
    result = verify(home)
    assert result.exit_code == 1
    event = last_event(home, "T01.POLICE")
    assert problems(result) == [
        "agency T01.POLICE: its e-mail thief@evil.example was given to it by none of the admin "
        f"events (the last: event {event}): written in; mail the hub sends the agency "
        "(receipts, deliveries) would go to it"
    ]
    assert "does NOT verify (1 problems)" in result.stdout


def test_a_mailbox_changed_is_named_both_ways(home: Path) -> None:
    tamper(
        home,
        lambda c: c.execute(
            update(t.AgencyEmail)
            .where(t.AgencyEmail.address == "mot-cua@sld.t01.gov.vn")
            .values(address="mot-cua@evil.example")
        ),
    )
    result = verify(home)
    assert result.exit_code == 1
    event = last_event(home, "T01.LABOUR")
    since = f"the admin events (the last: event {event})"
    assert problems(result) == [
        f"agency T01.LABOUR: its e-mail mot-cua@evil.example was given to it by none of {since}: "
        "written in; mail the hub sends the agency (receipts, deliveries) would go to it",
        f"agency T01.LABOUR: its e-mail mot-cua@sld.t01.gov.vn, given by {since}, is missing "
        "(deleted)",
    ]


@pytest.mark.parametrize(
    ("organ_id", "values", "said"),
    [
        ("T01.POLICE", {"name_vi": "Công an giả"},
         "its name_vi is 'Công an giả', but {since} made it 'Công an tỉnh T01'"),
        ("T01.POLICE", {"name_en": "Police"},
         "its name_en is 'Police', but {since} made it 'Provincial Police'"),
        ("T01.LABOUR", {"valid_to": date(2099, 12, 31)},
         "its valid_to is '2099-12-31', but {since} made it '2026-12-31'"),
        ("T01.LABOUR", {"valid_to": None},
         "its valid_to is none, but {since} made it '2026-12-31'"),
        ("T01.POLICE", {"valid_from": date(2019, 1, 1)},
         "its valid_from is '2019-01-01', but {since} made it '2020-01-01'"),
        ("T01.LABOUR", {"supervisor": None},
         "its supervisor is none, but {since} made it 'T01.POLICE'"),
        ("T01.LABOUR", {"contact": "thief"},
         "its contact is 'thief', but {since} made it 'Phòng Việc làm'"),
        ("T01.POLICE", {"created_at": datetime(2020, 1, 1, tzinfo=UTC)},
         "its created_at is '2020-01-01 00:00:00.000000', but {since} made it"),
    ],
    ids=["name_vi", "name_en", "valid_to widened", "valid_to cleared", "valid_from", "supervisor",
         "contact", "created_at"],
)  # fmt: skip
def test_a_field_edited_is_named(
    home: Path, organ_id: str, values: dict[str, object], said: str
) -> None:
    tamper(
        home,
        lambda c: c.execute(update(t.Agency).where(t.Agency.organ_id == organ_id).values(values)),
    )
    result = verify(home)
    assert result.exit_code == 1
    since = f"the admin events (the last: event {last_event(home, organ_id)})"
    [problem] = problems(result)
    assert problem.startswith(f"agency {organ_id}: " + said.format(since=since)), problem
    assert problem.endswith(": edited in the database")


def test_an_agency_written_in_is_named(home: Path) -> None:
    at = datetime(2026, 11, 2, tzinfo=UTC)

    def write_in(c: Connection) -> None:
        c.execute(
            insert(t.Agency).values(
                organ_id="T01.FAKE", name_vi="Cơ quan giả", name_en="", created_at=at,
                updated_at=at,
            )
        )  # fmt: skip
        c.execute(insert(t.AgencyEmail).values(organ_id="T01.FAKE", address="fake@evil.example"))

    tamper(home, write_in)
    result = verify(home)
    assert result.exit_code == 1
    assert problems(result) == [
        "agency T01.FAKE ('Cơ quan giả', e-mail [fake@evil.example]) is in the directory, but "
        "no admin event added it: written in"
    ]


def test_an_agency_deleted_is_named(home: Path) -> None:
    added = last_event(home, "T01.LABOUR", first=True)

    def remove(c: Connection) -> None:
        c.execute(delete(t.AgencyEmail).where(t.AgencyEmail.organ_id == "T01.LABOUR"))
        c.execute(delete(t.Agency).where(t.Agency.organ_id == "T01.LABOUR"))

    tamper(home, remove)
    result = verify(home)
    assert result.exit_code == 1
    assert problems(result) == [
        f"agency T01.LABOUR added by admin event {added} is missing from the directory (deleted)"
    ]


def test_a_mailbox_written_in_then_kept_by_an_admin_update_is_still_named(home: Path) -> None:
    """The admin's later `--add-email` records the mailbox set it found (the rogue one
    included) as its starting point: that start is not where the events before it left it."""
    tamper(
        home,
        lambda c: c.execute(
            insert(t.AgencyEmail).values(organ_id="T01.POLICE", address="thief@evil.example")
        ),
    )
    before = last_event(home, "T01.POLICE")
    assert (
        run(home, "agencies", "update", "T01.POLICE", "--add-email", "a@ca.t01.gov.vn").exit_code
        == 0
    )
    result = verify(home)
    assert result.exit_code == 1
    [problem] = problems(result)
    update_event = last_event(home, "T01.POLICE")
    assert update_event > before
    assert problem == (
        f"agency T01.POLICE: admin event {update_event} changed its emails from "
        "[pa08@ca.t01.gov.vn, thief@evil.example, vanthu@ca.t01.gov.vn], but the events before "
        "it left [pa08@ca.t01.gov.vn, vanthu@ca.t01.gov.vn]: the row had been edited in the "
        "database before that change"
    )


#: Edits that leave a value of another kind than the column's, each with what verify says.
ODD_EDITS = {
    "a name made binary": (
        "UPDATE agencies SET name_vi = X'ff00' WHERE organ_id = 'T01.POLICE'",
        "agency T01.POLICE: its name_vi is b'\\xff\\x00', but",
    ),
    "a name made text that is not UTF-8": (
        "UPDATE agencies SET name_vi = CAST(X'ff41' AS TEXT) WHERE organ_id = 'T01.POLICE'",
        "agency T01.POLICE: its name_vi is '\\udcffA', but",
    ),
    "a day that is no day": (
        "UPDATE agencies SET valid_to = 'someday' WHERE organ_id = 'T01.LABOUR'",
        "agency T01.LABOUR: its valid_to is 'someday', but",
    ),
    "a time that is no time": (
        "UPDATE agencies SET updated_at = 42 WHERE organ_id = 'T01.LABOUR'",
        "agency T01.LABOUR: its updated_at is 42, but",
    ),
    "an OrganId made binary": (
        "UPDATE agencies SET organ_id = X'00' WHERE organ_id = 'T01.LABOUR'",
        "agency T01.LABOUR added by admin event",
    ),
    "a mailbox's agency made binary": (
        "UPDATE agency_emails SET organ_id = X'01' WHERE organ_id = 'T01.POLICE'",
        "agency b'\\x01': e-mail [pa08@ca.t01.gov.vn, vanthu@ca.t01.gov.vn] is stored for it, "
        "but it has no directory row",
    ),
    "a mailbox made a number": (
        "UPDATE agency_emails SET address = 7 WHERE address = 'vanthu@ca.t01.gov.vn'",
        "agency T01.POLICE: its e-mail vanthu@ca.t01.gov.vn, given by",
    ),
    "an agency row deleted, its mailboxes left": (
        "DELETE FROM agencies WHERE organ_id = 'T01.LABOUR'",
        "agency T01.LABOUR: e-mail [mot-cua@sld.t01.gov.vn] is stored for it, but it has no "
        "directory row (written in, or left when its row was deleted)",
    ),
}


@pytest.mark.parametrize("edit", ODD_EDITS)
def test_odd_edits_of_the_directory_are_problems_never_internal_errors(
    home: Path, edit: str
) -> None:
    sql, said = ODD_EDITS[edit]
    db = sqlite3.connect(home / "archive.db")  # foreign keys off: as any sqlite3 shell
    with db:
        db.execute(sql)
    db.close()
    result = verify(home)
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert any(p.startswith(said) for p in problems(result)), result.stdout


def test_on_both_engines_the_directory_verifies_and_an_edit_is_named(database_url: str) -> None:
    """PostgreSQL gives dates and times back as values, SQLite as text: the same verdict."""
    db = Database.open(database_url)
    try:
        agency = Agency(
            "T02.A", "Cơ quan A", "", frozenset({"a@t02.gov.vn"}), valid_from=date(2020, 1, 1)
        )
        with db.session() as s:
            store.add_agency(s, agency, at=WORLD_AT, actor="t")
            more = replace(agency, emails=agency.emails | {"b@t02.gov.vn"})
            store.update_agency(s, more, at=WORLD_AT + timedelta(minutes=1), actor="t")
            store.retire_agency(
                s, "T02.A", last_day=date(2026, 12, 31), at=WORLD_AT + timedelta(hours=1), actor="t"
            )
            retired = s.scalar(select(func.max(t.AdminEvent.seq)))
        archive = Archive(db, BlobStore(os.urandom(32)), "hub@test")
        assert archive.verify().problems == []
        with db.engine.begin() as c:
            c.execute(update(t.Agency).values(valid_to=date(2099, 12, 31)))
            c.execute(insert(t.AgencyEmail).values(organ_id="T02.A", address="thief@evil.example"))
        since = f"the admin events (the last: event {retired})"
        assert archive.verify().problems == [
            f"agency T02.A: its e-mail thief@evil.example was given to it by none of {since}: "
            "written in; mail the hub sends the agency (receipts, deliveries) would go to it",
            f"agency T02.A: its valid_to is '2099-12-31', but {since} made it '2026-12-31': "
            "edited in the database",
        ]
    finally:
        db.dispose()
