"""A damaged ``archive.db``: every command says which file is damaged and how to mend it, in one
line with exit 2, whether SQLite finds the damage as the database opens (a file of random bytes,
a truncated file) or only when a command reads a damaged table."""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from archive.db import Database, sqlite_url
from formats.errors import ConfigError
from gateway import cli
from gateway.claims import sweep_stale_claims

COMMANDS = [
    ("archive", "list"),
    ("archive", "verify", "--no-blobs"),
    ("outbox", "list"),
    ("remind", "--dry-run", "--at", "2026-11-05T09:00+07:00"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home as `gateway init` writes it, with the database its first command makes."""
    home = tmp_path_factory.mktemp("corrupt") / "home"
    assert run(home, "init").exit_code == 0
    assert run(home, "outbox", "list").exit_code == 0
    assert (home / "archive.db").stat().st_size > 100_000
    assert not (home / "archive.db-wal").exists()  # all in the file: nothing mends it
    return home


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli.cli, ["--home", str(home), *args])


def random_bytes(db: Path) -> None:
    db.write_bytes(random.Random(8).randbytes(db.stat().st_size))


def truncated(db: Path) -> None:
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 3)


def outbox_pages_overwritten(db: Path) -> None:
    """The outbox table and its indexes overwritten with noise; the schema, the Alembic
    revision and the other tables intact: the database opens, reading the outbox fails."""
    with sqlite3.connect(db) as c:
        (page_size,) = c.execute("PRAGMA page_size").fetchone()
        roots = [
            r for (r,) in c.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'outbox'")
        ]
    c.close()
    noise = random.Random(9)
    with db.open("r+b") as f:
        for root in roots:
            f.seek((root - 1) * page_size)
            f.write(noise.randbytes(page_size))


@pytest.fixture
def damaged(template: Path, tmp_path: Path) -> Callable[[Callable[[Path], None]], Path]:
    def make(how: Callable[[Path], None]) -> Path:
        home = Path(shutil.copytree(template, tmp_path / "home"))
        how(home / "archive.db")
        return home

    return make


def assert_names_the_file(result: Result, home: Path, what: str) -> None:
    assert result.exit_code == 2, (result.exception, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert message.startswith(f"Error: the database file {home / 'archive.db'} {what} (SQLite: ")
    assert message.endswith("restore it from a backup")
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("args", COMMANDS)
def test_a_file_of_random_bytes_is_not_a_database(
    damaged: Callable[[Callable[[Path], None]], Path], args: tuple[str, ...]
) -> None:
    home = damaged(random_bytes)
    assert_names_the_file(run(home, *args), home, "is not a SQLite database")


@pytest.mark.parametrize("args", COMMANDS)
def test_a_truncated_file_is_damaged(
    damaged: Callable[[Callable[[Path], None]], Path], args: tuple[str, ...]
) -> None:
    home = damaged(truncated)
    assert_names_the_file(run(home, *args), home, "is damaged")


def test_damage_found_by_a_read_after_opening(
    damaged: Callable[[Callable[[Path], None]], Path],
) -> None:
    home = damaged(outbox_pages_overwritten)
    Database.open(sqlite_url(home / "archive.db")).dispose()  # opens and migrates: no damage seen
    assert_names_the_file(run(home, "outbox", "list"), home, "is damaged")


def test_opening_a_damaged_database_is_a_config_error(
    damaged: Callable[[Callable[[Path], None]], Path],
) -> None:
    home = damaged(random_bytes)
    with pytest.raises(ConfigError, match="is not a SQLite database"):
        Database.open(sqlite_url(home / "archive.db"))


def test_the_real_command_exits_2_not_70(
    damaged: Callable[[Callable[[Path], None]], Path],
) -> None:
    home = damaged(truncated)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--home", str(home), "archive", "list"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"Error: the database file {home / 'archive.db'} is damaged")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_supervisors_sweep_of_stale_claims_outlives_damage(
    damaged: Callable[[Callable[[Path], None]], Path], caplog: pytest.LogCaptureFixture
) -> None:
    """`gateway serve` looks for claims of dead processes every few seconds: damage met there is
    a warning, and the supervisor goes on (its workers wait the same way), not a crash."""
    home = damaged(outbox_pages_overwritten)
    db = Database.open(sqlite_url(home / "archive.db"))
    try:
        sweep_stale_claims(db, "host")
    finally:
        db.dispose()
    [record] = [r for r in caplog.records if "stale claims" in r.getMessage()]
    assert record.levelname == "WARNING" and "is damaged" in record.getMessage()
