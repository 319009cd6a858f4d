"""The storage module on both engines: SQLite (a file in tmp_path) and a real PostgreSQL
server (a throw-away cluster, tests/pg.py).

Most tests take ``database_url`` and so run twice; the ones about one engine's behaviour take
``pg_url`` or build an SQLite URL themselves.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import (
    Integer,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from archive import tables as t
from archive.db import (
    Database,
    _alembic_config,
    _begin_promptly,
    insert_returning,
    insert_rows,
    shown_url,
    update_rows,
)
from archive.records import Transport
from archive.tables import Base
from formats.errors import ConfigError, DatabaseDamaged, TransientError
from gateway import intake, outbound
from gateway.demo import DemoWorld
from keys import store
from keys.directory import Agency
from tests import pg
from tests.conftest import WORLD_AT
from tests.servers import free_port

ACTOR = "test"
PASS = b"test-only passphrase"
KEY_TABLES = {
    "agencies",
    "agency_emails",
    "certificates",
    "private_keys",
    "revocations",
    "revocation_evidence",
    "counters",
    "admin_events",
}

Opener = Callable[..., Database]


@pytest.fixture
def open_db() -> Iterator[Opener]:
    """``Database.open`` that disposes every engine it made when the test ends (an engine left
    to the garbage collector would leave psycopg connections open: a ResourceWarning)."""
    opened: list[Database] = []

    def _open(url: str, **kwargs: Any) -> Database:
        db = Database.open(url, **kwargs)
        opened.append(db)
        return db

    yield _open
    for db in opened:
        db.dispose()


@pytest.fixture
def db(database_url: str, open_db: Opener) -> Database:
    return open_db(database_url)


@pytest.fixture
def pg_url(pg_cluster: pg.PgCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = pg_cluster.create_database(request.node.name)
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_database(name)


def _head() -> str:
    head = ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def _event(s: Any, subject: str, at: datetime = WORLD_AT) -> t.AdminEvent:
    return store.record(s, at=at, actor=ACTOR, action="test.event", subject=subject)


# --- schema and migrations -----------------------------------------------------------------------


def test_open_migrates_to_head_and_the_schema_equals_the_models(db: Database) -> None:
    assert db.tables() == set(Base.metadata.tables) | {"alembic_version"}
    assert set(Base.metadata.tables) >= KEY_TABLES
    with db.engine.connect() as c:
        assert MigrationContext.configure(c).get_current_revision() == _head()
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []


def test_opening_again_is_a_no_op(db: Database, open_db: Opener) -> None:
    with db.session() as s:
        _event(s, "before reopening")
    again = open_db(str(db.engine.url.render_as_string(hide_password=False)))
    with again.engine.connect() as c:
        assert MigrationContext.configure(c).get_current_revision() == _head()
    with again.session() as s:
        assert [e.subject for e in store.events(s)] == ["before reopening"]


def test_open_without_migrating_leaves_the_database_empty(
    database_url: str, open_db: Opener
) -> None:
    assert open_db(database_url, migrate=False).tables() == set()


# --- durability (DESIGN §5 rule 7) ---------------------------------------------------------------


def test_durability_settings_are_in_force(db: Database) -> None:
    db.check_durability()
    with db.engine.connect() as c:
        if db.dialect == "sqlite":
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        else:
            assert db.dialect == "postgresql"
            assert c.execute(text("SHOW synchronous_commit")).scalar() == "on"
            assert c.execute(text("SHOW fsync")).scalar() == "on"


@pytest.mark.postgres
def test_sqlite_keeps_its_statement_journals_in_memory(tmp_path: Path, open_db: Opener) -> None:
    """A multi-row statement in a transaction (the intake's insert before its 250) needs a
    statement journal; kept on disk, each commit created, wrote and unlinked two temporary
    files. What they hold is undone at the statement's end either way: nothing durable."""
    with open_db(f"sqlite:///{tmp_path / 'a.db'}").engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA temp_store").scalar() == 2  # MEMORY


def test_rows_written_before_a_250_keep_only_the_indexes_queries_use(db: Database) -> None:
    """Each index is a page written to the log with every message taken in: intake keeps the
    one claims look rows up by (and the unique IMAP origin), the outbox none by entry."""
    with db.engine.connect() as c:
        indexes = {
            table: {i["name"] for i in inspect(c).get_indexes(table) if not i["unique"]}
            for table in ("intake", "outbox")
        }
    assert indexes == {
        "intake": {"ix_intake_state"},
        "outbox": {"ix_outbox_kind", "ix_outbox_state"},
    }


def test_postgresql_without_synchronous_commit_is_refused(pg_url: str, open_db: Opener) -> None:
    with pytest.raises(ConfigError, match="synchronous_commit is off"):
        open_db(f"{pg_url}&options=-csynchronous_commit%3Doff")
    assert open_db(pg_url, migrate=False).tables() == set()  # refused before migrating


@pytest.mark.postgres
def test_postgresql_without_fsync_is_refused(
    pg_cluster: pg.PgCluster, pg_url: str, open_db: Opener
) -> None:
    admin = pg_cluster.connect()
    try:
        _set_fsync(pg_cluster, admin, "off")
        with pytest.raises(ConfigError, match="fsync is off"):
            open_db(pg_url)
    finally:
        _set_fsync(pg_cluster, admin, "on")
        admin.close()


def _set_fsync(cluster: pg.PgCluster, admin: Any, value: str) -> None:
    """fsync is server-wide (reload, not per session); wait until new sessions see it."""
    if value == "on":
        admin.execute("ALTER SYSTEM RESET fsync")
    else:
        admin.execute(f"ALTER SYSTEM SET fsync = {value}")
    admin.execute("SELECT pg_reload_conf()")
    for _ in range(200):
        with cluster.connect() as c:
            row = c.execute("SHOW fsync").fetchone()
        if row is not None and row[0] == value:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"fsync did not become {value}")


def test_a_new_sqlite_database_has_large_pages_and_an_old_one_keeps_its_own(
    tmp_path: Path, open_db: Opener
) -> None:
    new = open_db(f"sqlite:///{tmp_path}/new.db")
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE made_before (x)")  # SQLite's default 4 KiB pages
    old.close()
    reopened = open_db(f"sqlite:///{tmp_path}/old.db")
    for db, size in ((new, 16384), (reopened, 4096)):
        with db.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA page_size").scalar() == size
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    with reopened.session() as s:
        _event(s, "written on 4 KiB pages")


def test_sqlite_without_wal_is_refused(open_db: Opener) -> None:
    # A database in SQLite's in-memory VFS (its name is not ":memory:") cannot use WAL.
    with pytest.raises(ConfigError, match="journal_mode is memory, not WAL"):
        open_db("sqlite:///file:not-wal?vfs=memdb&uri=true")


def test_a_database_from_a_newer_gateway_is_one_clear_line(tmp_path: Path, open_db: Opener) -> None:
    """Every command opens the database: an unknown revision was an 'internal error'."""
    url = f"sqlite:///{tmp_path}/archive.db"
    open_db(url)
    raw = sqlite3.connect(tmp_path / "archive.db")
    with raw:
        raw.execute("UPDATE alembic_version SET version_num = '0099_future'")
    raw.close()
    with pytest.raises(ConfigError, match=r"newer than this gateway knows.*upgrade the gateway"):
        open_db(url)


def test_sqlite_without_synchronous_full_is_refused(tmp_path: Path, open_db: Opener) -> None:
    good = open_db(f"sqlite:///{tmp_path}/archive.db")
    engine = create_engine(good.engine.url)
    event.listen(engine, "connect", _pragmas_then_normal)
    weakened = Database(engine, sessionmaker(engine))
    try:
        with pytest.raises(ConfigError, match="synchronous is 1, not FULL"):
            weakened.check_durability()
    finally:
        engine.dispose()


def _pragmas_then_normal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# --- sessions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["session", "connection"])
def test_sqlite_writers_wait_at_the_gate_while_a_priority_write_is_open(
    tmp_path: Path, open_db: Opener, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """Intake commits (priority) go before background writers: while one is open, another
    writer does not even begin, in this process or another (the gate is a file lock). The
    priority write is an ORM session or a bare connection (what the intake uses)."""
    url = f"sqlite:///{tmp_path}/archive.db"
    db, other = open_db(url), open_db(url)  # two engines, as two processes have
    umask = os.umask(0o022)  # the usual one, whatever this shell's
    opened, release, at_gate = threading.Event(), threading.Event(), threading.Event()
    steps: list[str] = []
    flock = fcntl.flock

    def watched(fd: int, operation: int) -> None:  # the background writer's pass of the gate
        mine = threading.current_thread().name == "background"
        if mine and not at_gate.is_set():  # (it tries again and again while it waits)
            steps.append("background at the gate")
            at_gate.set()
        flock(fd, operation)
        if mine:
            steps.append("background passed the gate")

    monkeypatch.setattr(fcntl, "flock", watched)

    def priority() -> None:
        if writer == "session":
            with db.session(priority=True) as s:
                _event(s, "intake")
                opened.set()
                release.wait(10)
                steps.append("priority write ends")
        else:
            with db.connection(priority=True) as c:
                c.execute(insert(t.Counter).values(name="intake", value=1))
                opened.set()
                release.wait(10)
                steps.append("priority write ends")

    def background() -> None:
        with other.session() as s:
            steps.append("background began")
            _event(s, "background")

    first = threading.Thread(target=priority)
    first.start()
    try:
        assert opened.wait(10)
        # The gate is closed: not even a shared lock can be had.
        probe = os.open(tmp_path / "archive.db-gate", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            second = threading.Thread(target=background, name="background")
            second.start()
            assert at_gate.wait(10)
            release.set()
            first.join(10)
            second.join(10)
            flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # open again
        finally:
            os.close(probe)
    finally:
        release.set()  # whatever failed, the priority writer ends
        first.join(10)
        os.umask(umask)
    assert steps == [
        "background at the gate",
        "priority write ends",
        "background passed the gate",
        "background began",
    ]
    with db.session(read_only=True) as s:
        subjects = list(s.scalars(select(t.AdminEvent.subject).order_by(t.AdminEvent.seq)))
        counters = list(s.scalars(select(t.Counter.name)))
    assert subjects == (["intake", "background"] if writer == "session" else ["background"])
    assert counters == ([] if writer == "session" else ["intake"])
    # Opened read-only, and readable by all: the service's user can pass a gate that root
    # created by running a command first (it could not open a 0600 file of root's).
    assert (tmp_path / "archive.db-gate").stat().st_mode & 0o044 == 0o044


def test_a_priority_begin_that_fails_otherwise_than_locked_is_transient(tmp_path: Path) -> None:
    """A driver error raised while a priority writer begins is not wrapped by SQLAlchemy; it
    must still be the TransientError (451) intake expects, with the connection's timeout kept."""
    connection = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    try:
        connection.execute("PRAGMA busy_timeout=1234")
        connection.execute("BEGIN")  # a transaction is open: BEGIN again fails, not "locked"
        with pytest.raises(TransientError, match="within a transaction"):
            _begin_promptly(connection)
        assert connection.execute("PRAGMA busy_timeout").fetchone() == (1234,)
    finally:
        connection.close()


def test_a_session_that_raises_writes_nothing(db: Database) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        _write_then_raise(db)
    with pytest.raises(IntegrityError):
        _write_then_clash(db)
    with db.session() as s:
        assert store.events(s) == []
        assert s.scalars(select(t.Counter)).all() == []
        _event(s, "kept")
    with db.session() as s:
        assert [e.subject for e in store.events(s)] == ["kept"]


@pytest.mark.parametrize("driver", [False, True], ids=["connection", "driver"])
def test_a_connection_commits_on_exit_writes_nothing_if_it_raises_and_is_transient_if_locked(
    tmp_path: Path, open_db: Opener, driver: bool
) -> None:
    """The bare-connection transaction, and the one on SQLite's driver connection, keep the
    session's promises (the intake relies on them before answering 250 or 451)."""
    url = f"sqlite:///{tmp_path}/archive.db"
    db = open_db(url, busy_timeout_ms=50)
    _insert(db, "kept", priority=True, driver=driver)
    with pytest.raises(RuntimeError, match="boom"):
        _insert(db, "lost", driver=driver, then=RuntimeError("boom"))
    with pytest.raises(IntegrityError):  # a constraint: not transient
        _insert(db, "kept", driver=driver)
    holder = sqlite3.connect(tmp_path / "archive.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
        for priority in (False, True):
            with pytest.raises(TransientError, match="database unavailable"):
                _insert(db, "locked out", priority=priority, driver=driver)
    finally:
        holder.close()
    _insert(db, "after", driver=driver)  # the connections given back are good
    with db.session(read_only=True) as s:
        rows = list(s.execute(select(t.Counter.name, t.Counter.value).order_by(t.Counter.name)))
        assert rows == [("after", 1), ("kept", 1)]


def test_a_driver_transaction_says_a_damaged_file_and_is_sqlites_only(
    tmp_path: Path, open_db: Opener, pg_url: str
) -> None:
    path = tmp_path / "archive.db"
    db = open_db(f"sqlite:///{path}")
    db.engine.dispose()  # the next transaction opens the file anew
    path.write_bytes(b"this is no SQLite header any more" * 200)
    with pytest.raises(DatabaseDamaged, match="is not a SQLite database"):
        _insert(db, "lost", driver=True)
    with pytest.raises(ValueError, match="SQLite's, not postgresql's"):
        _insert(open_db(pg_url), "lost", driver=True)


@pytest.mark.parametrize("priority", [True, False])
def test_a_gate_held_past_the_busy_timeout_is_transient_not_a_hang(
    tmp_path: Path, open_db: Opener, priority: bool
) -> None:
    """Another process holds the gate (stopped, or hung on its disk, mid-transaction): a
    writer waits busy_timeout for it, as for the write lock, then gives up with the
    TransientError an intake answers 451 for — it never waits for ever. Once the gate is
    free, writes go through."""
    db = open_db(f"sqlite:///{tmp_path}/archive.db", busy_timeout_ms=200)
    holder = os.open(tmp_path / "archive.db-gate", os.O_RDONLY | os.O_CREAT, 0o644)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            _insert(db, "behind a held gate", priority=priority)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        writer = threading.Thread(target=write)
        writer.start()
        writer.join(60)  # a hang guard: without a bound, the writer waits for ever
        assert not writer.is_alive(), "the writer still waits at the gate"
    finally:
        os.close(holder)  # frees the gate, whatever happened
    [error] = outcome
    assert isinstance(error, TransientError) and "database busy" in error.message
    _insert(db, "after", priority=priority)
    with db.session(read_only=True) as s:
        assert list(s.scalars(select(t.Counter.name))) == ["after"]


def _insert(
    db: Database,
    name: str,
    *,
    priority: bool = False,
    driver: bool = False,
    then: Exception | None = None,
) -> None:
    """A counter row in a bare connection's transaction, or a driver's; ``then`` is raised
    after it."""
    if driver:
        with db.driver_transaction(priority=priority) as d:
            sql = "INSERT INTO counters (name, value) VALUES (?, 1)"
            d.connection.execute(sql, (name,))
            if then is not None:
                raise then
    else:
        with db.connection(priority=priority) as c:
            c.execute(insert(t.Counter).values(name=name, value=1))
            if then is not None:
                raise then


def _write_then_raise(db: Database) -> None:
    with db.session() as s:
        _event(s, "lost")
        s.flush()  # really sent to the database, then rolled back
        raise RuntimeError("boom")


def _write_then_clash(db: Database) -> None:
    with db.session() as s:
        _event(s, "lost too")
        s.add(t.Counter(name="n", value=1))
        s.flush()
        s.add(t.Counter(name="n", value=2))  # same primary key


@pytest.mark.postgres
def test_postgresql_trouble_that_passes_is_transient(pg_url: str, open_db: Opener) -> None:
    """A server that cannot be reached, or a lock not granted in time, is a 451, not a 500."""
    db = open_db(pg_url)
    unreachable = create_engine(pg_url.replace("port=", "port=1"))  # no such socket
    try:
        gone = Database(unreachable, sessionmaker(unreachable))
        with pytest.raises(TransientError), gone.session() as s:
            s.execute(text("SELECT 1"))
    finally:
        unreachable.dispose()
    impatient = open_db(f"{pg_url}&options=-clock_timeout%3D50")
    by_default = open_db(pg_url, busy_timeout_ms=200)  # lock_timeout from busy_timeout
    with db.session() as holder:
        holder.execute(text("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE"))
        for waiting in (impatient, by_default):
            with pytest.raises(TransientError), waiting.session() as s:
                s.scalars(select(t.Counter)).all()
        with by_default.session(read_only=True) as s:
            assert s.scalar(text("SHOW lock_timeout")) == "200ms"
        with impatient.session(read_only=True) as s:
            assert s.scalar(text("SHOW lock_timeout")) == "50ms"  # the URL's own kept


def test_a_postgresql_server_that_does_not_answer_is_one_transient_line(open_db: Opener) -> None:
    """Opening a database whose server is down (or a wrong port: the client cannot tell) is
    :class:`TransientError` in one line that names the database without its password; it was
    an OperationalError, which the CLI reported as an internal error (exit 70) over three
    lines."""
    port = free_port()  # nothing listens there
    with pytest.raises(TransientError) as caught:
        open_db(f"postgresql+psycopg://gw:s3cret@127.0.0.1:{port}/gw")
    message = caught.value.message
    assert message.startswith(f"the database postgresql+psycopg://gw:***@127.0.0.1:{port}/gw ")
    assert "is not reachable" in message and "[database] url" in message
    assert "s3cret" not in message and "\n" not in message


def test_a_sqlite_database_locked_while_it_is_opened_says_so(tmp_path: Path) -> None:
    """A database to migrate, locked by a writer for longer than the busy timeout: the line
    said "not reachable … correct [database] url, or try again once its server accepts
    connections", which is about a server, not a file another process is writing."""
    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE t (x)")
    try:
        with pytest.raises(TransientError) as caught:
            Database.open(f"sqlite:///{path}", busy_timeout_ms=100)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    message = caught.value.message
    assert "is locked: another process has been writing to it for more than 100 ms" in message
    assert "server" not in message


def test_a_database_at_its_schemas_head_is_opened_without_the_write_lock(tmp_path: Path) -> None:
    Database.open(f"sqlite:///{tmp_path}/a.db").dispose()  # made, migrated
    writer = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        Database.open(f"sqlite:///{tmp_path}/a.db", busy_timeout_ms=100).dispose()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_sqlite_database_that_cannot_be_opened_is_a_setting_error(
    tmp_path: Path, open_db: Opener
) -> None:
    """A SQLite URL naming a directory: waiting will not mend it, ``[database] url`` must
    change (it was an OperationalError: an internal error in the CLI)."""
    (tmp_path / "archive.db").mkdir()
    with pytest.raises(ConfigError, match=r"archive\.db cannot be opened \(unable to open"):
        open_db(f"sqlite:///{tmp_path / 'archive.db'}")


# --- times ---------------------------------------------------------------------------------------


def test_times_round_trip_as_utc(db: Database) -> None:
    hanoi = timezone(timedelta(hours=7))
    at = datetime(2026, 11, 2, 9, 30, 15, 123456, tzinfo=hanoi)
    with db.session() as s:
        ev = _event(s, "aware", at=at)
        s.flush()
        seq = ev.seq
    with db.session() as s:
        back = s.get(t.AdminEvent, seq)
        assert back is not None
        assert back.at == at
        assert back.at.tzinfo is UTC
        assert back.at.hour == 2
        stored = s.execute(
            text("SELECT CAST(at AS TEXT) FROM admin_events")
            if db.dialect == "sqlite"
            else text("SELECT CAST(at AT TIME ZONE 'UTC' AS TEXT) FROM admin_events")
        ).scalar()
    assert str(stored).startswith("2026-11-02 02:30:15.123456")  # stored in UTC


def test_naive_times_are_refused(db: Database) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        _write_naive(db)
    with db.session() as s:
        assert store.events(s) == []


def _write_naive(db: Database) -> None:
    with db.session() as s:
        _event(s, "naive", at=datetime(2026, 11, 2, 9, 30))
        s.flush()


# --- concurrency ---------------------------------------------------------------------------------


def test_concurrent_admin_events_commit_with_distinct_increasing_seq(db: Database) -> None:
    """Two writers at once, each appending admin events in its own sessions: every event
    commits, with a seq of its own, increasing in each writer's order."""
    rounds = 10
    start = threading.Barrier(2, timeout=10)
    seqs: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            start.wait()
            for i in range(rounds):
                with db.session() as s:
                    ev = _event(s, f"{name}{i}")
                    s.flush()
                seqs[name].append(ev.seq)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in seqs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    assert errors == []
    for mine in seqs.values():
        assert len(mine) == rounds
        assert mine == sorted(mine)
    assert len(set(seqs["a"]) | set(seqs["b"])) == 2 * rounds
    with db.session() as s:
        events = store.events(s)
    assert [e.seq for e in events] == sorted(seqs["a"] + seqs["b"])
    assert {e.subject for e in events} == {f"{n}{i}" for n in "ab" for i in range(rounds)}


def test_a_read_only_session_sees_one_snapshot(db: Database) -> None:
    """A reader of several statements (`archive verify`) sees the database as it was at its
    first read, whatever a writer commits meanwhile; the next transaction sees the commit."""
    with db.session() as s:
        _event(s, "before")
    with db.session(read_only=True) as reader:
        assert [e.subject for e in store.events(reader)] == ["before"]
        with db.session() as writer:  # its own connection, committed while the reader reads
            _event(writer, "during")
        assert [e.subject for e in store.events(reader)] == ["before"]
    with db.session(read_only=True) as s:
        assert [e.subject for e in store.events(s)] == ["before", "during"]


@pytest.mark.postgres
def test_postgresql_read_only_sessions_are_repeatable_read_and_write_nothing(
    pg_url: str, open_db: Opener
) -> None:
    db = open_db(pg_url)
    with db.session(read_only=True) as s:
        assert s.scalar(text("SHOW transaction_isolation")) == "repeatable read"
        assert s.scalar(text("SHOW transaction_read_only")) == "on"
    with pytest.raises(DBAPIError, match="read-only transaction"):
        _write_read_only(db)
    with db.session() as s:  # the pooled connection is a plain read-write one again
        assert s.scalar(text("SHOW transaction_isolation")) == "read committed"
        assert s.scalar(text("SHOW transaction_read_only")) == "off"
        _event(s, "written")
    with db.session(read_only=True) as s:
        assert [e.subject for e in store.events(s)] == ["written"]


def _write_read_only(db: Database) -> None:
    with db.session(read_only=True) as s:
        _event(s, "refused")
        s.flush()


# --- the key store on both engines ---------------------------------------------------------------


def test_key_store_round_trip(db: Database, world: DemoWorld) -> None:
    snv = world.agencies["H26.SNV"]
    with db.session() as s:
        for agency in world.directory:
            store.add_agency(s, agency, at=WORLD_AT, actor=ACTOR)
        store.add_certificate(s, world.root.cert, role="anchor", at=WORLD_AT, actor=ACTOR)
        store.add_certificate(
            s,
            snv.cert,
            role="agency",
            organ_id="H26.SNV",
            use_until=WORLD_AT + timedelta(days=90),
            at=WORLD_AT,
            actor=ACTOR,
        )
        store.add_private_key(
            s, world.hub.cert, world.hub.key, role="hub", passphrase=PASS, at=WORLD_AT, actor=ACTOR
        )
    with db.session() as s:
        assert store.agencies(s) == sorted(world.directory, key=lambda a: a.organ_id)
        assert store.directory(s) == world.directory
        [anchor] = store.certificates(s, role="anchor")
        assert anchor.certificate == world.root.cert
        [stored] = store.certificates(s, role="agency", organ_id="H26.SNV")
        assert stored.certificate == snv.cert
        assert stored.not_before == snv.cert.not_valid_before_utc
        assert stored.use_until == WORLD_AT + timedelta(days=90)
        assert stored.imported_at == WORLD_AT
        [registered] = store.enrolled(s)["H26.SNV"]
        assert registered.sha256 == store.fingerprint(snv.cert)
        [hub] = store.hub_recipient_keys(s, PASS)
        assert hub.cert == world.hub.cert
        actions = [e.action for e in store.events(s)]
    assert actions.count("agency.add") == len(list(world.directory))
    assert actions[-3:] == [
        "certificate.add.anchor",
        "certificate.add.agency",
        "certificate.add.hub",
    ]


def test_agency_dates_and_vietnamese_text_round_trip(db: Database) -> None:
    agency = Agency(
        organ_id="H26.TEST",
        name_vi="Sở Tư pháp thành phố Hà Nội",
        name_en="Hanoi Department of Justice",
        emails=frozenset({"vanthu@stp.hanoi.gov.vn"}),
        valid_from=date(2026, 1, 1),
        valid_to=date(2026, 12, 31),
    )
    with db.session() as s:
        store.add_agency(s, agency, at=WORLD_AT, actor=ACTOR)
    with db.session() as s:
        assert store.get_agency(s, "H26.TEST") == agency


def test_an_anchor_with_a_long_subject_is_stored(db: Database) -> None:
    cert = _self_signed_with_a_long_subject()
    assert len(cert.subject.rfc4514_string()) > 256
    with db.session() as s:
        store.add_certificate(s, cert, role="anchor", at=WORLD_AT, actor=ACTOR)
    with db.session() as s:
        assert [c.certificate for c in store.certificates(s, role="anchor")] == [cert]


def _self_signed_with_a_long_subject() -> x509.Certificate:
    attributes = (
        NameOID.COUNTRY_NAME,
        NameOID.STATE_OR_PROVINCE_NAME,
        NameOID.LOCALITY_NAME,
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.COMMON_NAME,
    )
    text_ = "Hanoi City People's Committee, Department of Home Affairs"
    name = x509.Name(
        [x509.NameAttribute(NameOID.COUNTRY_NAME, "VN")]
        + [x509.NameAttribute(oid, f"{text_} {i}") for i, oid in enumerate(attributes[1:])]
    )
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(WORLD_AT - timedelta(days=1))
        .not_valid_after(WORLD_AT + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


@pytest.mark.postgres
def test_instances_starting_together_on_one_postgresql_migrate_once(pg_url: str) -> None:
    """Two gateway instances opening a fresh database at the same moment: one migrates under
    the advisory lock, the other waits and finds the schema at head; neither fails."""
    import threading

    results: list[object] = []
    barrier = threading.Barrier(3)

    def open_it() -> None:
        barrier.wait()
        try:
            db = Database.open(pg_url)
            results.append(db.tables())
            db.dispose()
        except Exception as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == 3
    assert all(isinstance(r, set) and "intake" in r for r in results), results


# --- many rows, one statement ----------------------------------------------------------------


def _intake_rows(n: int, at: datetime) -> list[dict[str, Any]]:
    hanoi = timezone(timedelta(hours=7))
    return [
        {
            "received_at": (at + timedelta(seconds=i)).astimezone(hanoi),
            "transport": {"protocol": "smtp", "rcpt_to": ["hub@test"], "note": "Sở Nội vụ"},
            "raw": bytes([i]) * (i + 1),
            "sha256": f"{i:064x}",
            "state": "new",
            "attempts": i,
            "next_attempt_at": None if i % 2 else at,
            "archive_seq": None,
            "updated_at": at,
            "size": i + 1,
            "source_key": None if i % 2 else f"imap:k/{i}",
        }
        for i in range(n)
    ]


def _stored(db: Database, columns: str) -> list[tuple[Any, ...]]:
    """The intake rows as the database holds them (times as text: what other readers parse)."""
    cast = "CAST({} AS TEXT)" if db.dialect == "sqlite" else "CAST({} AT TIME ZONE 'UTC' AS TEXT)"
    names = [cast.format(c) if c.endswith("_at") else c for c in columns.split(", ")]
    with db.session(read_only=True) as s:
        query = text(f"SELECT {', '.join(names)} FROM intake ORDER BY id")
        return [tuple(row) for row in s.execute(query)]


def _write_many(db: Database, rows: list[dict[str, Any]], changes: list[dict[str, Any]]) -> None:
    with db.connection() as c:
        assert insert_returning(c, t.Intake, rows[:2], "id") == [1, 2]
    with db.session() as s:
        insert_rows(s, t.Intake, rows[2:5])
    with db.connection() as c:
        assert insert_returning(c, t.Intake, rows[5:], "id") == [6]  # in the order of the rows
    with db.session() as s:
        update_rows(s, t.Intake, changes)


LATER = WORLD_AT + timedelta(hours=1)
CHANGES = [
    {"id": n, "state": "done", "archive_seq": n * 10, "updated_at": LATER, "raw": b""}
    for n in (2, 3)
] + [{"id": 5, "state": "retry", "next_attempt_at": LATER, "worker": None}]


def test_rows_written_many_at_a_time_read_back_as_written(db: Database) -> None:
    """insert_rows / update_rows / insert_returning on both engines: every value reads back,
    aware times in UTC, JSON with Vietnamese text, bytes, NULLs; keys in the order of the rows."""
    rows = _intake_rows(6, WORLD_AT)
    _write_many(db, rows, CHANGES)
    changed = {c["id"]: c for c in CHANGES}
    with db.session(read_only=True) as s:
        back = s.scalars(select(t.Intake).order_by(t.Intake.id)).all()
        for number, (row, got) in enumerate(zip(rows, back, strict=True), start=1):
            want = row | {k: v for k, v in changed.get(number, {}).items() if k != "id"}
            assert {k: getattr(got, k) for k in want} == want
            assert got.received_at.tzinfo is UTC


def test_rows_written_many_at_a_time_are_stored_as_sqlalchemy_stores_them(
    tmp_path: Path, open_db: Opener
) -> None:
    """On SQLite the rows go to the driver through one compiled statement and the column types'
    own conversions: what the file holds (times as text, JSON, bytes) is what SQLAlchemy's own
    executemany writes, so every other reader parses it alike."""
    ours = open_db(f"sqlite:///{tmp_path}/ours.db")
    theirs = open_db(f"sqlite:///{tmp_path}/theirs.db")
    rows = _intake_rows(6, WORLD_AT)
    _write_many(ours, rows, CHANGES)
    with theirs.session() as s:
        s.execute(insert(t.Intake), rows)
        for change in CHANGES:
            s.execute(update(t.Intake).where(t.Intake.id == change["id"]).values(change))
    columns = (
        "id, received_at, transport, raw, sha256, state, attempts, next_attempt_at, "
        "archive_seq, updated_at, size, source_key, worker"
    )
    assert _stored(ours, columns) == _stored(theirs, columns)


def test_a_column_left_to_its_python_default_still_gets_it(db: Database) -> None:
    """Rows that leave out columns whose default is a constant (intake ``attempts`` and
    ``claims``, 0) get it, on both engines, whichever way the rows go in."""
    rows = [{k: v for k, v in row.items() if k != "attempts"} for row in _intake_rows(3, WORLD_AT)]
    with db.session() as s:
        insert_rows(s, t.Intake, rows[:2])
    with db.connection() as c:
        assert insert_returning(c, t.Intake, rows[2:], "id") == [3]
    assert _stored(db, "attempts, claims") == [(0, 0), (0, 0), (0, 0)]


class _Other(DeclarativeBase):
    pass


class _Counted(_Other):
    """A table whose column's default is computed for each row."""

    __tablename__ = "counted"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=lambda: 41 + 1)


def test_the_rows_the_gateway_writes_most_go_in_by_the_compiled_statement(
    tmp_path: Path, open_db: Opener
) -> None:
    """The intake's insert before each 250, and the receipts and deliveries a filing owes, go
    to SQLite's driver as one statement compiled once, not through SQLAlchemy's per-row
    machinery (CPU on the path of every message, bench/e2e_bench.py): a column left to its
    constant default (``claims``) does not send them back to it. A default computed per row
    still does, and still gets its value."""
    db = open_db(f"sqlite:///{tmp_path}/a.db")
    built: list[str] = []  # tables SQLAlchemy built an INSERT for itself

    @event.listens_for(db.engine, "before_execute")
    def _seen(_c: Any, clause: Any, *_args: Any) -> None:
        if not isinstance(clause, str) and clause.is_dml:
            built.append(clause.table.name)

    transport = Transport(WORLD_AT, "smtp", "127.0.0.1", mail_from="a@b.vn", rcpt_to=("h@b.vn",))
    assert intake.accept(db, b"From: a@b.vn\r\n\r\nhello\r\n", transport) == 1
    with db.session() as s:
        insert_rows(s, t.Outbox, [outbound.resend(1, 7, "H26.SNV", WORLD_AT)])
    assert built == []
    assert _stored(db, "claims, attempts") == [(0, 0)]

    _Counted.metadata.create_all(db.engine)
    with db.connection() as c:
        assert insert_returning(c, _Counted, [{"id": 5}], "id") == [5]
        assert c.execute(select(_Counted.n)).scalar_one() == 42
    assert built == ["counted"]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+nosuchdriver://clerk:s3cret-pw@db.hanoi.gov.vn/archive",
        "postgresql://clerk:s3cret-pw@db.hanoi.gov.vn:notaport/archive",
        "not a url://clerk:s3cret-pw@db.hanoi.gov.vn/archive",
        "not a url://clerk:s3cret-pw/with/slashes@db.hanoi.gov.vn/archive",
        "not a url://clerk:s3cret-pw@with@ats@db.hanoi.gov.vn/archive",
        "postgresql+nosuchdriver://clerk:***@db.hanoi.gov.vn/archive?password=s3cret-pw",
        "postgresql+nosuchdriver://clerk:***@db.hanoi.gov.vn/archive?sslpassword=s3cret-pw",
        "postgresql+nosuchdriver://clerk:s3c@ret-pw@db.hanoi.gov.vn/archive",
        "postgresql+nosuchdriver://clerk:s3c?ret-pw@db.hanoi.gov.vn/archive?sslmode=require",
    ],
)
def test_an_unusable_database_url_is_refused_without_its_password(url: str) -> None:
    """The error names the URL so the admin can see what is wrong with it, but the password in
    it, shown in a terminal or a service log, is masked however the URL fails."""
    with pytest.raises(ConfigError, match="is not usable") as refused:
        Database.open(url)
    assert "s3cret-pw" not in str(refused.value) and "ret-pw" not in str(refused.value)
    assert "clerk:***@db.hanoi.gov.vn" in str(refused.value)
    assert "ret-pw" not in shown_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////var/lib/gateway@hanoi/archive.db",
        "sqlite:////srv/a:b@c/archive.db",
        "sqlite:////srv/a:b/c@d.db",
        "postgresql+psycopg://db.hanoi.gov.vn/archive?application_name=gw@hanoi",
    ],
)
def test_a_url_without_a_password_is_shown_as_it_is(url: str) -> None:
    assert shown_url(url) == url


def test_the_drivers_words_are_masked_before_they_are_cut_short() -> None:
    """The driver's message is cut to 300 characters: cut first, a password it quoted across
    the cut was masked only where whole, and its first part was shown."""
    url = "postgresql+psycopg://clerk:longsecretpassword@127.0.0.1:1/archive"
    engine = create_engine(url)
    db = Database(engine, sessionmaker(engine))
    words = "x" * 285 + " login with longsecretpassword refused"
    with pytest.raises((TransientError, ConfigError)) as refused, db._unreachable():
        raise OperationalError("connect", {}, Exception(words))
    assert "with lon" not in str(refused.value)  # the cut fell inside the password
    assert "with ***" in str(refused.value)
    engine.dispose()
