"""The metrics endpoint cannot be made to hold the supervisor's threads and descriptors: a
client that sends nothing is dropped after the request timeout, and connections beyond the cap
are closed at once (before, 1,000 idle connections took every descriptor and stopped intake).
What it serves (:func:`gateway.metrics.render`) is valid Prometheus text, whose series mean
what Prometheus's functions assume of them."""

from __future__ import annotations

import re
import socket
import struct
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from archive import tables as t
from archive.db import Database
from gateway import metrics
from gateway.metrics import MetricsServer, render
from gateway.outbound import KINDS
from gateway.outbox_admin import STATES


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database.open(database_url)
    yield database
    database.dispose()


def _samples(text: str, name: str) -> dict[str, str]:
    """The samples of ``name`` in an exposition: labels (``""`` for none) → value as written."""
    found = (re.fullmatch(rf"{name}(\{{.*\}})? (\S+)", line) for line in text.splitlines())
    return {m[1] or "": m[2] for m in found if m}


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    metrics = MetricsServer(
        "127.0.0.1", 0, lambda: "gateway_up 1\n", max_connections=2, timeout=0.5
    ).start()
    yield metrics
    metrics.stop()


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        body: bytes = answer.read()
        return body


def _closed_by_the_server(conn: socket.socket) -> bool:
    conn.settimeout(10)
    try:
        return conn.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_idle_connections_are_capped_and_dropped(server: MetricsServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as third:
            assert _closed_by_the_server(third)  # over the cap: closed without a word
        for conn in idle:  # they sent nothing within the request timeout
            assert _closed_by_the_server(conn)
    finally:
        for conn in idle:
            conn.close()
    assert _scrape(server.port) == b"gateway_up 1\n"  # the slots are free again


def test_a_client_that_goes_away_is_a_log_line_not_a_traceback(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Far more than loopback socket buffers grow to (a few MB): the write cannot complete.
    big = "gateway_up 1\n" * 4_000_000
    metrics = MetricsServer("127.0.0.1", 0, lambda: big, timeout=5).start()
    try:
        with socket.create_connection(("127.0.0.1", metrics.port)) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            conn.recv(100)  # the answer has begun; then a reset
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert _scrape(metrics.port) == big.encode()
    finally:
        metrics.stop()
    assert "metrics: a request from 127.0.0.1 failed" in caplog.text
    assert "Traceback" not in capfd.readouterr().err


def test_counter_values_are_written_in_full(db: Database) -> None:
    """A counter is written with every digit: as ``{:g}`` wrote it, 1,234,567 replies were
    1.23457e+06, and rate()/increase() saw a counter stand still for ten replies, then jump."""
    text = render(db, {"250": 1_234_567, "451": 3}, workers_alive=2)
    assert _samples(text, "gateway_smtp_replies_total") == {
        '{code="250"}': "1234567",
        '{code="451"}': "3",
    }


def test_every_known_series_is_there_before_its_first_event(db: Database) -> None:
    """Each verdict, intake state and outbox kind × state is exposed, as 0 until it happens:
    a series that appears only when its count becomes 1 has no earlier sample, so the alert
    of docs/deploy.md, ``max(delta(gateway_outbox_queue{state="failed"}[1h])) > 0``, never
    fired for the first failure (nor after `outbox retry` had emptied the state)."""
    text = render(db, {}, workers_alive=1)
    outbox = _samples(text, "gateway_outbox_queue")
    assert outbox['{kind="delivery",state="failed"}'] == "0"
    assert len(outbox) == len(KINDS) * len(STATES)
    assert _samples(text, "gateway_intake_queue") == {
        '{state="new"}': "0",
        '{state="working"}': "0",
        '{state="retry"}': "0",
        '{state="done"}': "0",
    }
    assert _samples(text, "gateway_messages_total")['{verdict="quarantined"}'] == "0"


def test_the_latency_summarys_count_and_sum_never_go_down(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A summary's ``_count`` and ``_sum`` are counters: they are taken over every message
    filed, while the quantiles come from the last ``LATENCY_WINDOW``. Taken over the window,
    ``_count`` stopped at its size and ``_sum`` fell as a slow message left it, so Prometheus
    saw a counter reset at every scrape and ``rate(_sum) / rate(_count)`` meant nothing."""
    monkeypatch.setattr(metrics, "LATENCY_WINDOW", 2)
    at = datetime(2026, 11, 1, tzinfo=UTC)

    def filed(seconds: float) -> None:
        done = at + timedelta(seconds=seconds)
        with db.session() as s:
            s.add(t.Intake(received_at=at, updated_at=done, transport={}, raw=b"",
                           sha256="0" * 64, state="done"))  # fmt: skip

    name = "gateway_archive_latency_seconds"
    filed(10.0)
    filed(1.5)
    before = render(db, {}, workers_alive=1)
    assert _samples(before, name + "_count") == {"": "2"}
    assert _samples(before, name + "_sum") == {"": "11.5"}
    filed(1.0)  # the 10 s one leaves the window
    after = render(db, {}, workers_alive=1)
    assert _samples(after, name + "_count") == {"": "3"}
    assert _samples(after, name + "_sum") == {"": "12.5"}
    assert _samples(after, name) == {  # the window: the last two
        '{quantile="0.5"}': "1.5",
        '{quantile="0.9"}': "1.5",
        '{quantile="0.99"}': "1.5",
    }


class _Rows:
    """Rows written straight into the tables the metrics read (no pipeline: any mix of states)."""

    def __init__(self, db: Database) -> None:
        self.db, self.at = db, datetime(2026, 11, 1, tzinfo=UTC)

    def intake(self, state: str, seconds: float = 1.0, number: int | None = None) -> int:
        with self.db.session() as s:
            row = t.Intake(received_at=self.at, updated_at=self.at + timedelta(seconds=seconds),
                           transport={}, raw=b"", sha256="0" * 64, state=state)  # fmt: skip
            if number is not None:
                row.id = number
            s.add(row)
            s.flush()
            return row.id

    def outbox(self, kind: str, state: str) -> int:
        with self.db.session() as s:
            row = t.Outbox(key=f"k{self.at.timestamp()}-{id(object())}-{kind}-{state}",
                           kind=kind, detail={}, state=state, created_at=self.at,
                           updated_at=self.at)  # fmt: skip
            s.add(row)
            s.flush()
            self.at += timedelta(microseconds=1)
            return row.id

    def entries(self, *statuses: str) -> None:
        with self.db.session() as s:
            head = s.get(t.LogHead, 1)
            size = head.size if head else 0
            for i, status in enumerate(statuses):
                s.add(t.LogEntry(seq=size + i, kind="message", at=self.at, record=b"{}",
                                 leaf_hash=b"\0" * 32, status=status))  # fmt: skip
            if head is None:
                s.add(t.LogHead(id=1, size=len(statuses)))
            else:
                head.size = size + len(statuses)

    def set(self, table: type[t.Intake] | type[t.Outbox], number: int, **values: object) -> None:
        with self.db.session() as s:
            row = s.get(table, number)
            assert row is not None
            for name, value in values.items():
                setattr(row, name, value)


def test_a_tally_takes_up_where_the_last_scrape_left_off_and_counts_the_same(
    db: Database,
) -> None:
    """Each scrape adds what changed to what the scrapes before it counted; what it serves is
    what a count of everything serves, whatever rows were filed, sent, failed and sent after
    all, or late to commit; and a database with fewer rows than were counted (restored from a
    backup) is counted again. Counted afresh, a scrape read the whole archive."""
    rows, now = _Rows(db), [0.0]
    tally = metrics.Tally(clock=lambda: now[0])

    def scrape(after: float) -> str:
        now[0] += after
        counted = render(db, {}, workers_alive=1, tally=tally)
        assert counted == render(db, {}, workers_alive=1)  # everything, counted afresh
        return counted

    rows.entries("accepted", "accepted", "rejected")
    # Row 3 is being written, not yet committed: 1, 2 and 4 are filed, 5 waits to be tried again.
    first, late, waiting, last = 1, 3, 5, 6
    for number, state, seconds in ((1, "done", 2.0), (2, "done", 3.0), (4, "done", 4.0),
                                   (waiting, "retry", 1.0), (last, "done", 5.0)):  # fmt: skip
        rows.intake(state, seconds, number=number)
    sent = [rows.outbox("receipt", "sent"), rows.outbox("delivery", "sent")]
    failed, ready = rows.outbox("delivery", "failed"), rows.outbox("receipt", "ready")
    scrape(0)
    rows.intake("done", 7.0, number=late)  # it commits now, below rows counted already
    scrape(1)
    scrape(metrics.SETTLED_AFTER)  # what the first scrape saw is settled: passed
    assert (tally.filed.passed, tally.filed.waiting) == (last + 1, {waiting})
    assert tally.sent.passed == ready + 1
    rows.set(t.Intake, waiting, state="done", updated_at=rows.at + timedelta(seconds=30))
    rows.set(t.Outbox, failed, state="ready")  # requeued by an admin
    rows.set(t.Outbox, ready, state="sent")
    rows.entries("quarantined")
    scrape(metrics.SETTLED_AFTER)
    assert tally.filed.waiting == set()
    rows.set(t.Outbox, failed, state="sent")  # sent after all
    text = scrape(1)
    assert _samples(text, "gateway_archive_latency_seconds_count") == {"": "6"}
    assert _samples(text, "gateway_archive_latency_seconds_sum") == {"": "51.0"}
    outbox = _samples(text, "gateway_outbox_queue")
    assert (
        outbox['{kind="delivery",state="sent"}'] == outbox['{kind="receipt",state="sent"}'] == "2"
    )
    assert _samples(text, "gateway_messages_total")['{verdict="accepted"}'] == "2"

    # What was counted is not read again: an old row changed behind the tally's back (it never
    # is) shows in a count of everything only.
    rows.set(t.Intake, first, updated_at=rows.at + timedelta(hours=1))
    with db.session() as s:
        entry = s.get(t.LogEntry, 0)
        assert entry is not None
        entry.status = "rejected"
    now[0] += 1
    again = render(db, {}, workers_alive=1, tally=tally)
    afresh = render(db, {}, workers_alive=1)
    for name in ("gateway_messages_total", "gateway_archive_latency_seconds_sum"):
        assert _samples(again, name) == _samples(text, name) != _samples(afresh, name)

    # Restored from a backup with fewer rows than were passed, and a shorter log.
    with db.session() as s:
        s.execute(t.Intake.__table__.delete().where(t.Intake.id > first))
        s.execute(t.Outbox.__table__.delete().where(t.Outbox.id > sent[0]))
        s.execute(t.LogEntry.__table__.delete().where(t.LogEntry.seq > 0))
        head = s.get(t.LogHead, 1)
        assert head is not None
        head.size = 1
    scrape(1)


def test_a_scrape_that_fails_halfway_leaves_the_tally_as_it_was(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape counts, then reads on: if the database fails in between (503), the next
    scrape must not count the same rows again. It did: the filed rows once for each failure."""
    rows, now = _Rows(db), [0.0]
    tally = metrics.Tally(clock=lambda: now[0])
    for seconds in (1.0, 2.0, 3.0):
        rows.intake("done", seconds)
    rows.intake("retry")
    render(db, {}, workers_alive=1, tally=tally)
    now[0] += metrics.SETTLED_AFTER
    real = Session.scalars

    def lost(self: Session, *args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("the connection was lost"))

    monkeypatch.setattr(Session, "scalars", lost)  # after the rows filed are counted
    with pytest.raises(OperationalError):
        render(db, {}, workers_alive=1, tally=tally)
    monkeypatch.setattr(Session, "scalars", real)
    text = render(db, {}, workers_alive=1, tally=tally)
    assert _samples(text, "gateway_archive_latency_seconds_count") == {"": "3"}
    assert text == render(db, {}, workers_alive=1)


def test_the_outbox_is_grouped_by_kind_without_reading_it_along_the_kinds_index(
    tmp_path: Path,
) -> None:
    """Once ANALYZE had run on a large outbox, SQLite grouped it by kind along the kind's index:
    the whole table, at every scrape, for the few rows in the queue (66 ms instead of 1 ms at
    200,000 rows). The statistics are those ANALYZE wrote for 200,000 rows in five kinds, most
    of them sent: the planner reads them, not the rows."""
    db = Database.open(f"sqlite:///{tmp_path}/plan.db")
    _Rows(db).outbox("receipt", "sent")
    with db.engine.begin() as c:
        c.exec_driver_sql("ANALYZE")
        c.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE tbl = 'outbox'")
        for index, stat in (
            ("ix_outbox_state", "200000 66667"),
            ("ix_outbox_kind", "200000 50000"),
            ("sqlite_autoindex_outbox_1", "200000 1"),
        ):
            c.exec_driver_sql("INSERT INTO sqlite_stat1 VALUES ('outbox', ?, ?)", (index, stat))
    db.engine.dispose()  # new connections read the statistics
    statements: list[str] = []
    sqlalchemy.event.listen(
        db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]), retval=False
    )
    render(db, {}, workers_alive=1)
    with db.engine.connect() as c:
        for sql in [q for q in statements if "FROM outbox" in q]:
            arguments = tuple(range(sql.count("?")))  # any will do: the plan is the same
            found = c.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, arguments)
            plan = " ".join(str(r[-1]) for r in found)
            assert "SCAN outbox" not in plan, (sql, plan)
    db.dispose()
