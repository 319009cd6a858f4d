"""The storage module: the one place that opens the database (DESIGN §2).

SQLite is the embedded default (one file in the gateway home); PostgreSQL is used at scale.
Whatever the engine, a commit must be durable before the gateway acknowledges anything
(DESIGN §5 rule 7), so :meth:`Database.open` sets and then *checks* the durability settings:

- SQLite: ``journal_mode=WAL`` and ``synchronous=FULL`` on every connection, foreign keys on;
- PostgreSQL: ``synchronous_commit`` must be ``on`` (or stronger) for the session.

The schema is created and upgraded by Alembic (``archive/migrations``); :meth:`Database.open`
upgrades to the newest revision unless asked not to. Sessions are handed out by
:meth:`Database.session`, one transaction each::

    db = Database.open("sqlite:///gateway-home/archive.db")
    with db.session() as s:
        s.add(...)
    # committed (durably) here, or rolled back if the block raised
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Table,
    and_,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    make_url,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from formats.errors import ConfigError, DatabaseDamaged, TransientError

MIGRATIONS = "archive:migrations"


@dataclass
class Database:
    engine: Engine
    _sessions: sessionmaker[Session]
    #: How long a writer waits for the database (SQLite's write lock and the gate, a
    #: PostgreSQL lock) before it gives up with :class:`TransientError`.
    busy_timeout_ms: int = 5000

    @classmethod
    def open(cls, url: str, *, migrate: bool = True, busy_timeout_ms: int = 5000) -> Database:
        """Connect, check durability, and (by default) bring the schema up to date.

        ``busy_timeout_ms``: how long a SQLite writer waits for the write lock before the
        operation fails as transient (a listener then answers 451).
        """
        engine = _engine(url, busy_timeout_ms)
        db = cls(engine, sessionmaker(engine, expire_on_commit=False), busy_timeout_ms)
        try:
            with db._damaged(), db._unreachable():
                db.check_durability()
                if migrate:
                    db.upgrade()
        except BaseException:
            engine.dispose()  # a refused database leaves no connection open
            raise
        return db

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def reading(self) -> Connection:
        """A connection for reads outside a session (durability settings, the schema's
        revision): on SQLite a plain BEGIN, which takes no write lock."""
        return self.engine.connect().execution_options(**{_READ_ONLY: True})

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to ``revision``. A schema already at head is only read:
        a reader (`archive verify`) need not wait for the write lock a writer holds."""
        config = _alembic_config(self.engine.url.render_as_string(hide_password=False))
        if revision == "head":
            with self.reading() as c:
                current = set(MigrationContext.configure(c).get_current_heads())
            if current == set(ScriptDirectory.from_config(config).get_heads()):
                return
        with self.engine.begin() as connection:
            if self.dialect == "postgresql":
                # Several gateway instances may start at once: one migrates, the others wait
                # here and then find nothing left to do.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
            config.attributes["connection"] = connection
            try:
                command.upgrade(config, revision)
            except CommandError as exc:
                if "Can't locate revision" not in str(exc):
                    raise
                raise ConfigError(
                    "the database's schema is newer than this gateway knows (a later version "
                    "wrote it): upgrade the gateway package, never the other way"
                ) from None

    def tables(self) -> set[str]:
        with self.reading() as c:
            return set(inspect(c).get_table_names())

    def check_durability(self) -> None:
        """Refuse to run on a database that could lose an acknowledged commit."""
        with self.reading() as c:
            if self.dialect == "sqlite":
                mode = c.exec_driver_sql("PRAGMA journal_mode").scalar()
                sync = c.exec_driver_sql("PRAGMA synchronous").scalar()
                if str(mode).lower() != "wal" and str(self.engine.url.database) not in (
                    "",
                    ":memory:",
                ):
                    raise ConfigError(
                        f"SQLite journal_mode is {mode}, not WAL; the database file "
                        "must be on a local file system that supports WAL"
                    )
                if sync != 2:  # 2 == FULL
                    raise ConfigError(f"SQLite synchronous is {sync}, not FULL (2)")
            elif self.dialect == "postgresql":
                value = c.execute(text("SHOW synchronous_commit")).scalar()
                if value not in ("on", "remote_write", "remote_apply"):
                    raise ConfigError(
                        f"PostgreSQL synchronous_commit is {value}; set it to on so that a "
                        "commit is durable before the gateway acknowledges a message"
                    )
                if c.execute(text("SHOW fsync")).scalar() != "on":
                    raise ConfigError(
                        "PostgreSQL fsync is off: a commit is not durable; turn it on"
                    )

    @contextmanager
    def _damaged(self) -> Iterator[None]:
        """A SQLite file that is not a database, or a damaged one, as :class:`DatabaseDamaged`
        naming the file: no retry or restart mends it, an administrator must (meanwhile the
        service's work waits: the messages in hand are not to blame)."""
        try:
            yield
        except DBAPIError as exc:
            damage = _sqlite_damage(exc.orig)
            if damage is None:
                raise
            raise DatabaseDamaged(
                f"the database file {self.engine.url.database} {damage} (SQLite: {exc.orig}); "
                "restore it from a backup"
            ) from exc

    @contextmanager
    def _unreachable(self) -> Iterator[None]:
        """A database that cannot be opened, as one line naming it (never its password).

        No connection to a PostgreSQL server is :class:`TransientError`, as it is for a
        session: a server that is down comes back, and the next start or command succeeds.
        (psycopg gives no SQLSTATE for a connection that failed, so a wrong host, user or
        database name cannot be told from a server that is down but by the server's own,
        possibly translated, words: the line quotes them and names both remedies.) Any other
        trouble in opening (a SQLite file that cannot be opened) is :class:`ConfigError`."""
        try:
            yield
        except OperationalError as exc:
            url = self.engine.url
            where = shown_url(url.render_as_string(hide_password=False))
            cause = " ".join(str(exc.orig).split())
            if url.password:  # the driver's words may quote it, or (an "@" in it) the host
                cause = cause.replace(str(url.password), _MASKED)
            if url.host and "@" in url.host:
                cause = cause.replace(url.host, url.host.rpartition("@")[2])
            cause = cause[:300] or type(exc.orig).__name__  # (cut once masked: no half left)
            if self.dialect == "sqlite" and "locked" in cause:
                raise TransientError(
                    f"the database {where} is locked: another process has been writing to it "
                    f"for more than {self.busy_timeout_ms} ms ([database] busy_timeout_ms); "
                    "try again"
                ) from exc
            if exc.connection_invalidated or _is_transient(exc):
                raise TransientError(
                    f"the database {where} is not reachable ({cause}); correct [database] url, "
                    "or try again once its server accepts connections"
                ) from exc
            raise ConfigError(
                f"the database {where} cannot be opened ({cause}); check [database] url"
            ) from exc

    @contextmanager
    def session(self, *, read_only: bool = False, priority: bool = False) -> Iterator[Session]:
        """One transaction: committed on normal exit, rolled back on any exception.

        Database trouble that may pass (locked, connection lost) becomes
        :class:`TransientError` (SMTP 451); the caller retries later.

        ``read_only``: a transaction that writes nothing and sees one snapshot of the whole
        database from its first read to its end, whatever writers commit meanwhile (on
        PostgreSQL, writing in it is an error).

        ``priority``: a write that someone is waiting on (intake, before its 250). On SQLite,
        one writer at a time holds the database, and a writer kept waiting polls with growing
        sleeps; so while a priority write waits or runs, other writers — in every process —
        wait at the *gate* (:meth:`_gate`) before they begin, and the priority write is next.
        """
        with self._through_gate(priority, writes=not read_only) as closed:
            session = self._sessions()
            if read_only and self.dialect == "sqlite":
                # A plain (deferred) BEGIN: a long read such as `archive verify` must not hold
                # the write lock and stall intake (writers begin IMMEDIATE). A SQLite read
                # transaction sees one snapshot from its first read to its end.
                session.connection(execution_options={_READ_ONLY: True})
            elif read_only:
                # PostgreSQL's READ COMMITTED takes a new snapshot for every statement: a reader
                # of several tables (`archive verify`: entries, then nodes, then the head and the
                # checkpoints) would see a writer's commit halfway and report the log as damaged.
                # REPEATABLE READ is one snapshot for the whole transaction, and a transaction
                # that writes nothing is never cancelled for a serialization failure there; READ
                # ONLY makes sure it writes nothing. Writers do not wait for it (MVCC). Both
                # settings are undone when the connection goes back to the pool.
                session.connection(execution_options=_PG_READ_ONLY)
            elif closed:
                session.connection(execution_options={_PRIORITY: True})
            try:
                with self._damaged(), _transient():
                    try:
                        yield session
                        session.commit()
                    except BaseException:
                        session.rollback()
                        raise
            finally:
                session.close()

    @contextmanager
    def connection(self, *, priority: bool = False) -> Iterator[Connection]:
        """One write transaction on a bare connection (SQLAlchemy Core, no ORM unit of work),
        for a hot path whose statements need none: the intake's insert before its 250. As
        :meth:`session` for a writer: committed on normal exit, rolled back on any exception,
        :class:`TransientError` for trouble that may pass, the same ``priority`` gate; the
        ORM's bookkeeping around one small transaction costs more CPU than SQLite's commit
        (bench/e2e_bench.py)."""
        with (
            self._through_gate(priority) as closed,
            self._damaged(),
            _transient(),
            self.engine.connect() as connection,
        ):
            if closed:
                connection = connection.execution_options(**{_PRIORITY: True})
            with connection.begin():
                yield connection

    @contextmanager
    def driver_transaction(self, *, priority: bool = False) -> Iterator[Driver]:
        """:meth:`connection` on SQLite's own driver connection: no SQLAlchemy connection,
        transaction and result objects around the statements, which cost more CPU than the
        intake's insert itself (a lone 10 KB message's commit: 0.41 → 0.29 ms of CPU). The
        statements go to the driver compiled (:class:`Driver`); the driver's errors are told
        apart as :meth:`connection` tells them (:class:`TransientError`,
        :class:`DatabaseDamaged`, or SQLAlchemy's wrapping of the error)."""
        if self.dialect != "sqlite":
            raise ValueError(f"a driver transaction is SQLite's, not {self.dialect}'s")
        with self._through_gate(priority), self._damaged(), _transient():
            try:
                pooled = self.engine.raw_connection()
            except sqlite3.Error as exc:  # (the pool does not wrap what connecting raised)
                raise DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
            try:
                dbapi = pooled.dbapi_connection
                assert isinstance(dbapi, sqlite3.Connection)
                try:
                    if priority:
                        _begin_promptly(dbapi)
                    else:
                        dbapi.execute("BEGIN IMMEDIATE")
                    yield Driver(dbapi, self.engine.dialect)
                    dbapi.commit()
                except BaseException as exc:
                    _roll_back(pooled)
                    if isinstance(exc, sqlite3.Error):
                        raise DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
                    raise
            finally:
                pooled.close()  # back to the pool

    @contextmanager
    def _through_gate(self, priority: bool, *, writes: bool = True) -> Iterator[bool]:
        """A writer's pass through the gate (:meth:`_gate`; none for a reader, PostgreSQL or a
        database in memory). Yields whether this writer holds it closed, a priority write on
        SQLite, until the block ends: then the other writers go through."""
        gate = self._gate(priority) if writes and self._gate_path else None
        try:
            yield gate is not None
        finally:
            if gate is not None:
                os.close(gate)

    @functools.cached_property
    def _gate_path(self) -> str | None:
        """The gate file next to a SQLite database file (none for PostgreSQL or memory)."""
        name = self.engine.url.database
        if self.dialect != "sqlite" or not name or name == ":memory:" or name.startswith("file:"):
            return None
        return f"{name}-gate"

    def _gate(self, priority: bool) -> int | None:
        """Pass the gate: a priority writer closes it (an exclusive ``flock``, held until its
        transaction ends; the descriptor is returned); any other writer waits while it is
        closed (a shared ``flock``, released at once). ``flock`` wakes a waiter as soon as the
        gate opens. Each pass opens the file anew: locks on one open file would be shared by
        the threads of a process. The file is empty and opened read-only (``flock`` needs no
        more), so whoever created it, root running a CLI command or the service, every user
        that may write the database can pass it."""
        assert self._gate_path is not None
        try:
            fd = os.open(self._gate_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None  # a read-only home: no gate, writes fail on their own
        try:
            _flock_within(fd, fcntl.LOCK_EX if priority else fcntl.LOCK_SH, self)
        except BaseException:
            os.close(fd)
            raise
        if priority:
            return fd
        os.close(fd)
        return None

    def dispose(self) -> None:
        self.engine.dispose()


def _roll_back(pooled: Any) -> None:
    """Roll back a driver connection's transaction; one that cannot be (its file gone, an I/O
    error) is not given out again: the pool opens a new one instead."""
    try:
        pooled.dbapi_connection.rollback()
    except sqlite3.Error:
        pooled.invalidate()


@dataclass(frozen=True)
class Driver:
    """SQLite's driver connection in a write transaction (:meth:`Database.driver_transaction`)
    and the dialect its statements are compiled for."""

    connection: sqlite3.Connection
    dialect: Any

    def rows(self, statement: Any) -> list[tuple[Any, ...]]:
        """The rows of a SELECT, compiled here every time, as the driver gives them: for
        columns whose type converts nothing (integers, text)."""
        compiled = statement.compile(
            dialect=self.dialect, compile_kwargs={"render_postcompile": True}
        )
        params = compiled.construct_params()
        values = [params[name] for name in compiled.positiontup or ()]
        return [tuple(row) for row in self.connection.execute(compiled.string, values)]


# --- many rows, one statement ----------------------------------------------------------------


def insert_rows(
    s: Session, model: type[DeclarativeBase], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Insert ``rows`` (dicts keyed by column name) into ``model``'s table, one ``executemany``
    per run of rows with the same keys, in order.

    The ORM's bulk insert (``s.execute(insert(Model), rows)``) does the same, plus bookkeeping
    for every row that costs more than SQLite's own insert: a filed batch of 64 messages writes
    about 600 rows (bench/e2e_bench.py). Nothing ORM-specific is needed here: the rows are
    plain column values, and column types (:class:`archive.tables.UtcDateTime`) still apply
    (:func:`_execute_many`).
    """
    table = _table(model)
    for shape, run in itertools.groupby(rows, key=_shape):
        _execute_many(s, ("insert", table.name, shape), lambda: insert(table), list(run))


def update_rows(
    s: Session, model: type[DeclarativeBase], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Update rows of ``model``'s table by primary key, as the ORM's bulk update by primary key
    (each dict holds the key and the new values), one ``executemany`` per run of dicts with the
    same keys."""
    table = _table(model)
    keys = [c.name for c in table.primary_key]
    for shape, run in itertools.groupby(rows, key=_shape):
        values = [k for k in shape if k not in keys]

        def statement(values: list[str] = values) -> Any:
            where = and_(*(table.c[k] == bindparam(f"k_{k}") for k in keys))
            return update(table).where(where).values({k: bindparam(f"v_{k}") for k in values})

        _execute_many(
            s,
            ("update", table.name, shape),
            statement,
            [{f"k_{k}": row[k] for k in keys} | {f"v_{k}": row[k] for k in values} for row in run],
        )


def _shape(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(row)


def _table(model: type[DeclarativeBase]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


@dataclass(frozen=True)
class _Plan:
    """A statement compiled once for a dialect with positional parameters (SQLite's ``?``):
    its SQL, and for each parameter in order the name it is taken from and the column type's
    conversion (what SQLAlchemy would apply to it) or, for a column the rows leave to its
    constant Python default, that value (name ``None``), converted once."""

    sql: str
    params: tuple[tuple[str | None, Callable[[Any], Any] | None, Any], ...]

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(
            fixed if name is None else row[name] if convert is None else convert(row[name])
            for name, convert, fixed in self.params
        )


_PLANS: dict[tuple[Any, ...], _Plan | None] = {}


def _execute_many(
    s: Session | Connection,
    key: tuple[Any, ...],
    statement: Callable[[], Any],
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """Run ``statement()`` once per row of ``rows``, as one ``executemany``.

    On SQLite the statement is compiled once per shape (``key``: the shapes are the code's own,
    a few dozen) and the rows go to the driver as tuples, each value converted by its column
    type as SQLAlchemy would. SQLAlchemy's own executemany builds every row's parameters
    through its general machinery: an intake row's update took 10 µs, of which SQLite's part
    is 2.4; this way, 6.6 — and a filing holds the write lock meanwhile. A column the rows leave
    to a constant Python default gets it from the plan; a statement SQLAlchemy would give more
    than that (a default computed per row), and any other dialect, take SQLAlchemy's path."""
    plan = _plan_for(s, key, statement, rows[0])
    if plan is None:
        s.execute(statement(), rows)
    else:
        _connection(s).exec_driver_sql(plan.sql, [plan.values(row) for row in rows])


def insert_returning(
    c: Connection | Driver,
    model: type[DeclarativeBase],
    rows: Sequence[Mapping[str, Any]],
    column: str,
) -> list[Any]:
    """Insert ``rows`` into ``model``'s table and return each one's ``column`` (its generated
    key), in the order of the rows: the intake's insert before its 250, a row or a few at a
    time, by the same compiled statement as :func:`insert_rows`."""
    table = _table(model)
    out: list[Any] = []
    for shape, run in itertools.groupby(rows, key=_shape):
        group = list(run)

        def statement() -> Any:
            return insert(table).returning(table.c[column], sort_by_parameter_order=True)

        plan = _plan_for(c, ("insert-returning", table.name, column, shape), statement, group[0])
        if isinstance(c, Driver):
            if plan is None:
                raise ValueError(f"no compiled insert for {table.name} rows of {shape}")
            out += [c.connection.execute(plan.sql, plan.values(row)).fetchone()[0] for row in group]
        elif plan is None:
            out += c.scalars(statement(), group).all()
        else:
            out += [c.exec_driver_sql(plan.sql, plan.values(row)).scalar_one() for row in group]
    return out


def _connection(s: Session | Connection) -> Connection:
    return s.connection() if isinstance(s, Session) else s


def _plan_for(
    s: Session | Connection | Driver,
    key: tuple[Any, ...],
    statement: Callable[[], Any],
    row: Mapping[str, Any],
) -> _Plan | None:
    dialect = s.dialect if isinstance(s, Driver) else _connection(s).dialect
    plan_key = (dialect.name, dialect.driver, *key)
    if plan_key not in _PLANS:
        _PLANS[plan_key] = _plan(dialect, statement(), list(row))
    return _PLANS[plan_key]


def _plan(dialect: Any, statement: Any, names: list[str]) -> _Plan | None:
    if not dialect.positional:
        return None
    compiled = statement.compile(dialect=dialect, column_keys=names)
    if compiled.positiontup is None:
        return None
    params: list[tuple[str | None, Callable[[Any], Any] | None, Any]] = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if bind.key in names:
            params.append((bind.key, convert, None))
            continue
        # A value SQLAlchemy fills in itself: an insert's column left to its Python default.
        # A constant (intake ``claims`` = 0) is the same for every row: it goes in the plan;
        # one computed per row (a callable, a SQL expression) keeps SQLAlchemy's path.
        default = _scalar_default(statement, bind.key)
        if default is _NO_DEFAULT:
            return None
        params.append((None, None, default if convert is None else convert(default)))
    return _Plan(compiled.string, tuple(params))


_NO_DEFAULT = object()


def _scalar_default(statement: Any, key: str) -> Any:
    """The constant Python default of the column ``key`` an INSERT ``statement`` leaves out,
    or :data:`_NO_DEFAULT` (no such column, or a default that is not a constant)."""
    if not isinstance(statement, Insert):
        return _NO_DEFAULT
    column = statement.table.c.get(key)
    default = None if column is None else column.default
    if not isinstance(default, ScalarElementColumnDefault):
        return _NO_DEFAULT
    return default.arg


def _flock_within(fd: int, operation: int, db: Database) -> None:
    """``flock(fd, operation)``, waiting at most the database's busy timeout. The gate is held
    for one short transaction at a time; held longer (a process stopped, or hung on its disk,
    while it holds it), it is the same trouble as a write lock held as long, and ends the
    same way: :class:`TransientError` (an intake answers 451). Tried without blocking, with
    pauses growing from 0.1 to 1 ms: a blocking ``flock`` cannot be given a time limit."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    deadline = time.monotonic() + db.busy_timeout_ms / 1000
    pause = 0.0001
    while True:
        time.sleep(pause)
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TransientError(
                    f"database busy: another writer has held it for {db.busy_timeout_ms} ms "
                    f"(its gate {db._gate_path})"
                ) from None
        pause = min(pause * 2, 0.001)


@contextmanager
def _transient() -> Iterator[None]:
    """Database trouble that may pass (locked, connection lost) as :class:`TransientError`."""
    try:
        yield
    except DBAPIError as exc:
        if exc.connection_invalidated or _is_transient(exc):
            raise TransientError(f"database unavailable ({type(exc.orig).__name__})") from exc
        raise


#: SQLite's primary result codes for a file that is damaged (SQLITE_CORRUPT: "database disk
#: image is malformed") or is no database at all (SQLITE_NOTADB: "file is not a database"),
#: with what each means to an administrator.
_SQLITE_DAMAGE = {11: "is damaged", 26: "is not a SQLite database"}


def _sqlite_damage(error: BaseException | None) -> str | None:
    """What a sqlite3 error says about the file, if it says it is damaged or no database."""
    if not isinstance(error, sqlite3.DatabaseError):
        return None
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _SQLITE_DAMAGE.get(code & 0xFF)  # extended codes carry the primary in the low byte
    message = str(error)
    if "file is not a database" in message:
        return _SQLITE_DAMAGE[26]
    return _SQLITE_DAMAGE[11] if "malformed" in message else None


# PostgreSQL SQLSTATEs worth a retry: connection exception, transaction rollback (serialization
# failure, deadlock), insufficient resources, operator intervention (shutdown, statement timeout),
# lock not available.
_TRANSIENT_SQLSTATES = ("08", "40", "53", "57", "55P03")


def _is_transient(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate.startswith(_TRANSIENT_SQLSTATES)
    if isinstance(exc, OperationalError) and type(exc.orig).__module__.startswith("psycopg"):
        return True  # no SQLSTATE: the server could not be reached, or the connection broke
    message = str(exc.orig).lower()
    return any(m in message for m in ("database is locked", "could not connect", "server closed"))


#: Seconds a PostgreSQL connection may take to be made (libpq's connect_timeout), unless the
#: URL gives its own.
PG_CONNECT_TIMEOUT = 10


def _engine(url: str, busy_timeout_ms: int = 5000) -> Engine:
    try:
        parsed = make_url(url)
        options: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            # A server that does not answer is a 451 in seconds, not after TCP's minutes.
            options["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT}
        engine = create_engine(parsed, future=True, **options)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        shown = shown_url(url)
        reason = str(exc).replace(url, shown)
        raise ConfigError(f"database URL {shown!r} is not usable: {reason}") from None
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_timeout_ms))
        # pysqlite's own transaction handling begins lazily and deferred; take it over so that
        # every transaction starts with BEGIN IMMEDIATE: writers queue on the write lock
        # (busy_timeout) instead of failing when a read lock cannot be upgraded.
        event.listen(engine, "begin", _sqlite_begin)
    elif engine.dialect.name == "postgresql":
        # A lock not granted within busy_timeout is an error (SQLSTATE 55P03: transient, a
        # 451), as on SQLite, not a wait without end; unless the URL sets its own.
        event.listen(engine, "connect", functools.partial(_pg_lock_timeout, busy_timeout_ms))
    else:
        raise ConfigError(
            f"database {engine.dialect.name} is not supported; use sqlite or postgresql"
        )
    return engine


def _pg_lock_timeout(busy_timeout_ms: int, dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("SHOW lock_timeout")
    (current,) = cursor.fetchone()
    if current in ("0", "0ms"):  # the server's default: wait for ever
        cursor.execute(f"SET lock_timeout = {int(busy_timeout_ms)}")
    cursor.close()
    dbapi_connection.commit()  # SET outside any transaction the pool would roll back


#: Page size of a new SQLite database. The archive is mostly blobs (raw messages, sealed
#: entries, outbound mail): 16 KiB pages store and read a 1 MB message with a quarter of the
#: pages of SQLite's default 4 KiB, ~1 ms less CPU per MB on each side, and cost nothing
#: measurable on 10 KB messages. An existing database keeps its page size.
SQLITE_PAGE_SIZE = 16 * 1024


def _sqlite_pragmas(busy_timeout_ms: int, dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # no implicit BEGIN from the driver
    cursor = dbapi_connection.cursor()
    # Takes effect only on a database with nothing written yet (and before WAL is entered).
    cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Statement journals (a multi-row statement in a transaction) in memory, not two files
    # created and unlinked per commit: they are undone at the statement's end, never durable.
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.close()


_READ_ONLY = "gateway_read_only"
_PRIORITY = "gateway_priority"
_PG_READ_ONLY = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
#: PostgreSQL advisory lock key taken while migrating ("gw-mig" in ASCII).
_MIGRATION_LOCK = 0x67772D6D6967


def _sqlite_begin(connection: Any) -> None:
    options = connection.get_execution_options()
    if options.get(_READ_ONLY, False):
        connection.exec_driver_sql("BEGIN")
    elif options.get(_PRIORITY, False):
        _begin_promptly(connection.connection.dbapi_connection)
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _begin_promptly(dbapi_connection: Any) -> None:
    """BEGIN IMMEDIATE, trying again every half millisecond while the lock is held, for as
    long as the connection's ``busy_timeout``.

    SQLite's busy handler sleeps 1, 2, 5, 10 … 100 ms between tries, so a writer that finds
    the lock held for 3 ms waits 8; behind the gate only the transaction under way is ahead of
    a priority writer, and it is short."""
    (busy_ms,) = dbapi_connection.execute("PRAGMA busy_timeout").fetchone()
    deadline = time.monotonic() + busy_ms / 1000
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.Error as exc:
                # Raised here, inside SQLAlchemy's begin, a driver error is not wrapped: it
                # becomes the same TransientError (451) as any other failed intake commit.
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise TransientError(f"database unavailable ({exc})") from exc
            time.sleep(0.0005)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout={int(busy_ms)}")


_MASKED = "***"
#: A password given as a query parameter (libpq's ``?password=``, ``?sslpassword=``).
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:ssl)?password=)[^&]*")


def shown_url(url: str) -> str:
    """``url`` as an error or a log line may show it: any password masked, parsable or not. The
    text is masked, not a parse of it: a password holding ``@`` parses as part of the host
    (``clerk:s3c@ret@db`` → password ``s3c``), so everything from the first ``:`` of the
    user part to the last ``@`` before the path's query is masked."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower().startswith("sqlite"):
        return url  # a file path, which may hold ":" and "@"; never a password
    if sep:
        at = rest.split("?", 1)[0].rfind("@")
        if at >= 0:
            user, colon, _ = rest[:at].partition(":")
            if colon and "/" not in user:
                rest = f"{user}:{_MASKED}{rest[at:]}"
        url = f"{scheme}{sep}{rest}"
    try:  # a password with "?" in it: no "@" before its "?"; as parsed, it is masked too
        password = make_url(url).password
    except (SQLAlchemyError, ValueError):
        password = None
    if password and password != _MASKED:
        url = url.replace(str(password), _MASKED)
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + _MASKED, url)


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"
