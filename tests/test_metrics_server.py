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

import pytest

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
