"""Group commit of the intake: messages that complete while a commit is under way share the next
transaction; each gets its 250 only once that transaction committed, and a 451 (never a 250, and
nothing stored) when it failed. Over real sockets (smtplib against a running listener) on both
engines, and the batcher itself on an event loop."""

from __future__ import annotations

import asyncio
import errno
import re
import smtplib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from archive import tables as t
from archive.db import Database
from archive.records import Transport
from formats.errors import TransientError
from gateway import intake
from gateway import smtp as listener
from gateway.demo import HUB_ADDRESS
from tests.conftest import WORLD_AT
from tests.test_smtp import SENDER, SMALL, client

# --- helpers ----------------------------------------------------------------------------------


def message(tag: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {HUB_ADDRESS}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@snv.hanoi.gov.vn>\r\n\r\n"
    ).encode() + f"body of {tag}\r\n.leading dot\r\n8-bit \xe1\xbb\x87\r\n".encode("latin-1")


def number_of(reply: tuple[int, bytes]) -> int:
    match = re.fullmatch(rb"2\.0\.0 queued as (\d+)", reply[1])
    assert reply[0] == 250 and match is not None, reply
    return int(match.group(1))


def stored(db: Database) -> dict[int, bytes]:
    with db.session(read_only=True) as s:
        return {row.id: row.raw for row in s.scalars(select(t.Intake).order_by(t.Intake.id))}


class Commits:
    """Counts the database's commits; ``fail_next()`` makes the next one fail. On SQLite the
    driver itself refuses that COMMIT (an authorizer on every connection handed out: the
    intake commits on the driver's own connection, past SQLAlchemy's events); on PostgreSQL
    SQLAlchemy's commit event raises, as a failed fsync would. ``error``: the error's name."""

    def __init__(self, db: Database) -> None:
        self.count = 0
        self.armed = False
        self.engine = db.engine
        self.sqlite = db.dialect == "sqlite"
        self.error = "DatabaseError" if self.sqlite else "OSError"
        if self.sqlite:
            self.engine.dispose()  # every connection from now on is handed out watched
            event.listen(self.engine, "checkout", self._watch)
        else:
            event.listen(self.engine, "commit", self._on_commit)

    def _watch(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        dbapi_connection.set_authorizer(self._authorize)

    def _authorize(self, action: int, what: str | None, *_: Any) -> int:
        if action == sqlite3.SQLITE_TRANSACTION and what == "COMMIT":
            self.count += 1
            if self.armed:
                self.armed = False
                return sqlite3.SQLITE_DENY  # "not authorized": the transaction is not committed
        return sqlite3.SQLITE_OK

    def _on_commit(self, _connection: Any) -> None:
        self.count += 1
        if self.armed:
            self.armed = False
            raise OSError(errno.EIO, "Input/output error")

    def fail_next(self) -> None:
        self.armed = True

    def close(self) -> None:
        if self.sqlite:
            event.remove(self.engine, "checkout", self._watch)
            self.engine.dispose()  # the watched connections go
        else:
            event.remove(self.engine, "commit", self._on_commit)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database.open(database_url)
    yield db
    db.dispose()


@pytest.fixture
def serve(database: Database) -> Iterator[Callable[..., listener.Listener]]:
    running: list[listener.Listener] = []

    def _start(**options: Any) -> listener.Listener:
        options.setdefault("limits", SMALL)
        options.setdefault("hub_addresses", [HUB_ADDRESS])
        options.setdefault("clock", lambda: WORLD_AT)
        server = listener.start(database, host="127.0.0.1", port=0, **options)
        running.append(server)
        return server

    yield _start
    for server in running:
        server.stop()


class Gate:
    """Holds every lone commit (``intake.accept``, a group of one) until opened.

    ``after`` runs once the held commit has returned (before its 250 is sent).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        self.after: Callable[[], None] = lambda: None
        real = intake.accept

        def held(*args: Any, **kwargs: Any) -> int:
            self.entered.set()
            assert self.open.wait(20)
            number = real(*args, **kwargs)
            self.after()
            return number

        monkeypatch.setattr(intake, "accept", held)

    def close(self) -> None:
        self.entered.clear()
        self.open.clear()


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def send_in_threads(
    clients: list[smtplib.SMTP], tags: list[str]
) -> tuple[list[threading.Thread], dict[str, tuple[int, bytes]]]:
    replies: dict[str, tuple[int, bytes]] = {}

    def send(c: smtplib.SMTP, tag: str) -> None:
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt(HUB_ADDRESS)[0] == 250
        replies[tag] = c.data(message(tag))

    threads = [
        threading.Thread(target=send, args=(c, tag)) for c, tag in zip(clients, tags, strict=True)
    ]
    for thread in threads:
        thread.start()
    return threads, replies


def held_round(
    server: listener.Listener, gate: Gate, lead: smtplib.SMTP, others: list[smtplib.SMTP], n: int
) -> dict[str, tuple[int, bytes]]:
    """One message held in a lone commit while ``others`` queue theirs; then all are let go."""
    gate.close()
    lead_threads, replies = send_in_threads([lead], [f"lead{n}"])
    assert gate.entered.wait(20)
    tags = [f"g{n}-{i}" for i in range(len(others))]
    threads, group = send_in_threads(others, tags)
    wait_for(lambda: server.handler.committer.waiting == len(others))
    assert replies == {} and group == {}  # nothing answered while nothing is committed
    gate.open.set()
    for thread in lead_threads + threads:
        thread.join(20)
    return replies | group


# --- over real sockets ------------------------------------------------------------------------


def test_concurrent_clients_each_250_has_its_row_and_commits_are_grouped(
    serve: Callable[..., listener.Listener], database: Database
) -> None:
    commits = Commits(database)
    server = serve()
    clients, per_client = 8, 15
    replies: dict[str, tuple[int, bytes]] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            with client(server) as c:
                for i in range(per_client):
                    tag = f"c{k}-{i}"
                    assert c.mail(SENDER)[0] == 250
                    assert c.rcpt(HUB_ADDRESS)[0] == 250
                    replies[tag] = c.data(message(tag))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    transactions = commits.count
    commits.close()
    assert errors == []

    total = clients * per_client
    numbers = {tag: number_of(reply) for tag, reply in replies.items()}
    assert len(numbers) == total
    assert len(set(numbers.values())) == total  # distinct
    rows = stored(database)
    assert len(rows) == total  # nothing stored without its 250
    for tag, number in numbers.items():
        assert rows[number] == message(tag)  # byte for byte
    # Grouping: fewer transactions than messages (SQLite: one commit at a time, so whatever
    # completes during a commit joins the next one; PostgreSQL runs 8 at once).
    assert transactions <= total
    if database.dialect == "sqlite":
        assert transactions < total


def test_a_failed_group_transaction_gets_451_for_each_message_and_stores_none(
    serve: Callable[..., listener.Listener], database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(database)
    gate = Gate(monkeypatch)
    server = serve(commit_threads=1)
    with client(server) as lead, client(server) as a, client(server) as b, client(server) as c:
        others = [a, b, c]

        # Round 1: the lead's lone commit succeeds; the group queued behind it fails at commit.
        gate.after = commits.fail_next
        before = commits.count
        replies = held_round(server, gate, lead, others, 1)
        lead_number = number_of(replies.pop("lead1"))
        assert sorted(replies) == ["g1-0", "g1-1", "g1-2"]
        for code, text in replies.values():
            assert (code, text.split()[0]) == (451, b"4.3.0")
        assert commits.count - before == 2  # the lead's commit, then the group's (failed)
        assert stored(database) == {lead_number: message("lead1")}  # nothing of the group

        # Round 2: the next group (the same sessions, trying again) is committed.
        gate.after = lambda: None
        before = commits.count
        replies = held_round(server, gate, lead, others, 2)
        assert commits.count - before == 2  # four messages, two transactions
        numbers = {tag: number_of(reply) for tag, reply in replies.items()}
        assert len(set(numbers.values())) == 4
        rows = stored(database)
        assert len(rows) == 5
        for tag, number in numbers.items():
            assert rows[number] == message(tag)
        # the sessions go on after a 451
        assert a.noop()[0] == 250
    commits.close()


def test_stop_lets_the_queued_group_finish_with_250(
    serve: Callable[..., listener.Listener], database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    server = serve(commit_threads=1)
    with client(server) as lead, client(server) as a, client(server) as b:
        lead_threads, replies = send_in_threads([lead], ["lead"])
        assert gate.entered.wait(20)
        threads, group = send_in_threads([a, b], ["a", "b"])
        wait_for(lambda: server.handler.committer.waiting == 2)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        time.sleep(0.2)
        assert replies == {} and group == {}
        gate.open.set()
        for thread in [*lead_threads, *threads, stopper]:
            thread.join(20)
        for session in (lead, a, b):  # each answered 250, then told the service is stopping
            assert session.noop()[0] == 421
    numbers = {tag: number_of(reply) for tag, reply in (replies | group).items()}
    rows = stored(database)
    assert {rows[n] for n in numbers.values()} == {message(tag) for tag in numbers}
    assert len(rows) == 3


def test_lmtp_messages_are_grouped_too_and_answered_per_recipient(
    serve: Callable[..., listener.Listener], database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    other = "hub2@exchange.hanoi.gov.vn"
    server = serve(lmtp=True, hub_addresses=[HUB_ADDRESS, other], commit_threads=1)
    sessions = [smtplib.LMTP("127.0.0.1", server.port) for _ in range(3)]
    try:
        for s in sessions:
            s.ehlo_or_helo_if_needed()
        replies: dict[int, list[tuple[int, bytes]]] = {}

        def send(k: int) -> None:
            s = sessions[k]
            assert s.mail(SENDER)[0] == 250
            assert s.rcpt(HUB_ADDRESS)[0] == 250
            assert s.rcpt(other)[0] == 250
            replies[k] = [s.data(message(f"l{k}")), s.getreply()]

        lead = threading.Thread(target=send, args=(0,))
        lead.start()
        assert gate.entered.wait(20)
        rest = [threading.Thread(target=send, args=(k,)) for k in (1, 2)]
        for thread in rest:
            thread.start()
        wait_for(lambda: server.handler.committer.waiting == 2)
        gate.open.set()
        for thread in [lead, *rest]:
            thread.join(20)
    finally:
        for s in sessions:
            s.close()
    rows = stored(database)
    for k, (first, second) in replies.items():
        assert first == second
        assert rows[number_of(first)] == message(f"l{k}")
    assert len(rows) == 3


# --- accept_many ------------------------------------------------------------------------------


def transport(i: int = 0) -> Transport:
    return Transport(WORLD_AT, "imap", "imap.example", extra={"n": str(i)})


def test_accept_many_commits_all_in_one_transaction_in_order(database: Database) -> None:
    commits = Commits(database)
    items = [(message(f"m{i}"), transport(i), None) for i in range(5)]
    numbers = intake.accept_many(database, items)
    assert commits.count == 1
    commits.close()
    assert numbers == sorted(numbers) and len(set(numbers)) == 5
    rows = stored(database)
    assert [rows[n] for n in numbers] == [raw for raw, _, _ in items]
    assert intake.accept_many(database, []) == []


def test_accept_many_keeps_the_source_key_dedupe_per_item(database: Database) -> None:
    first = intake.accept(database, b"one\r\n", transport(), source_key="imap:k1")
    numbers = intake.accept_many(
        database,
        [
            (b"one again\r\n", transport(), "imap:k1"),  # taken in before: its number
            (b"two\r\n", transport(), "imap:k2"),
            (b"two again\r\n", transport(), "imap:k2"),  # twice in one group: one row
            (b"no key\r\n", transport(), None),
            (b"no key\r\n", transport(), None),  # without a key, each is a message of its own
        ],
    )
    assert numbers[0] == first
    assert numbers[1] == numbers[2] != first
    assert len(set(numbers[3:])) == 2
    rows = stored(database)
    assert len(rows) == 4
    assert rows[numbers[1]] == b"two\r\n"


def test_accept_many_is_all_or_nothing(database: Database) -> None:
    commits = Commits(database)
    commits.fail_next()
    with pytest.raises(TransientError, match=commits.error):
        intake.accept_many(database, [(message(f"x{i}"), transport(i), None) for i in range(3)])
    commits.close()
    assert stored(database) == {}


# --- the batcher on an event loop ---------------------------------------------------------------


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database.open(f"sqlite:///{tmp_path}/archive.db")
    yield db
    db.dispose()


def run_held(
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    sizes: list[int],
    *,
    cancel: tuple[int, ...] = (),
    **options: Any,
) -> tuple[list[int], dict[int, int | BaseException]]:
    """Submit ``sizes`` messages while the first one's commit is held; the group sizes seen,
    and each message's outcome."""
    gate = Gate(monkeypatch)
    groups: list[int] = []
    real_store = intake.GroupCommitter._store

    def counted(self: intake.GroupCommitter, items: list[intake.Item]) -> list[int]:
        groups.append(len(items))
        return real_store(self, items)

    monkeypatch.setattr(intake.GroupCommitter, "_store", counted)

    async def scenario() -> dict[int, int | BaseException]:
        with ThreadPoolExecutor(1) as executor:
            committer = intake.GroupCommitter(db, executor, **options)
            futures = [committer.submit(b"x" * size, transport(i)) for i, size in enumerate(sizes)]
            assert committer.running == 1 and committer.waiting == len(sizes) - 1
            for i in cancel:
                futures[i].cancel()
            await asyncio.to_thread(gate.entered.wait, 20)
            gate.open.set()
            results = await asyncio.gather(*futures, return_exceptions=True)
            assert committer.running == 0 and committer.waiting == 0
        return dict(enumerate(results))

    return groups, asyncio.run(scenario())


def test_groups_are_bounded_by_count_and_cancelled_waiters_are_dropped(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups, results = run_held(sqlite_db, monkeypatch, [10] * 9, cancel=(1,), max_messages=3)
    assert groups == [1, 3, 3, 1]  # the first alone (held); then the 7 left of 8 waiting
    assert isinstance(results.pop(1), asyncio.CancelledError)
    numbers = list(results.values())
    assert all(isinstance(n, int) for n in numbers) and len(set(numbers)) == 8
    assert len(stored(sqlite_db)) == 8  # the cancelled one was never committed


def test_groups_are_bounded_by_bytes_but_a_big_message_still_goes(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups, results = run_held(sqlite_db, monkeypatch, [1, 40, 40, 40, 150, 10], max_bytes=100)
    # the lead alone (held); 40+40 (a third 40 would pass 100); 40 (150 would); 150; 10
    assert groups == [1, 2, 1, 1, 1]
    assert all(isinstance(n, int) for n in results.values())
    assert len(stored(sqlite_db)) == 6


def test_a_group_that_cannot_start_fails_its_messages_and_the_committer_goes_on(
    sqlite_db: Database,
) -> None:
    async def scenario() -> None:
        executor = ThreadPoolExecutor(1)
        executor.shutdown()
        committer = intake.GroupCommitter(sqlite_db, executor)
        with pytest.raises(RuntimeError, match="shutdown"):
            await committer.submit(b"x\r\n", transport())
        assert committer.running == 0 and committer.waiting == 0
        committer.executor = None  # the loop's default executor
        assert await committer.submit(b"y\r\n", transport()) > 0

    asyncio.run(scenario())
    assert list(stored(sqlite_db).values()) == [b"y\r\n"]
