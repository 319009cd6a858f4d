"""Sessions of the SMTP/LMTP listener over real sockets: timeouts that never cost a committed
message its reply, a peer that half-closes, the caps on concurrent sessions, a TLS handshake that
stalls or fails, and the deadline that bounds a session that commits nothing.

No test measures time: timeouts are scaled down, and "a timeout has passed" is observed as an
idle connection of the same listener being closed by it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func
from sqlalchemy import select as sql_select

from archive import tables as t
from archive.db import Database
from formats.errors import ConfigError
from formats.limits import Limits
from gateway import intake
from gateway import smtp as listener
from gateway.demo import HUB_ADDRESS
from tests.conftest import WORLD_AT

SENDER = "vanthu@snv.hanoi.gov.vn"
MESSAGE = (
    f"From: {SENDER}\r\nTo: {HUB_ADDRESS}\r\nMessage-ID: <s@snv>\r\nSubject: x\r\n\r\nbody\r\n"
).encode()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(f"sqlite:///{tmp_path}/archive.db")
    yield database
    database.dispose()


@pytest.fixture
def serve(db: Database) -> Iterator[Any]:
    """Start listeners on 127.0.0.1:0 (``serve(**options)``); all are stopped afterwards."""
    running: list[listener.Listener] = []

    def _start(**options: Any) -> listener.Listener:
        options.setdefault("limits", Limits(max_message_bytes=100_000))
        options.setdefault("hub_addresses", [HUB_ADDRESS])
        options.setdefault("clock", lambda: WORLD_AT)
        server = listener.start(db, host="127.0.0.1", port=0, **options)
        running.append(server)
        return server

    yield _start
    for server in running:
        server.stop()


@pytest.fixture
def held_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """``(started, release)``: every commit waits for ``release`` once it has begun."""
    started, release = threading.Event(), threading.Event()
    real_accept = intake.accept

    def held_accept(*args: Any) -> int:
        started.set()
        release.wait(30)
        return real_accept(*args)

    monkeypatch.setattr(intake, "accept", held_accept)
    yield started, release
    release.set()


def count(db: Database) -> int:
    with db.session(read_only=True) as s:
        return int(s.scalar(sql_select(func.count()).select_from(t.Intake)) or 0)


def raws(db: Database) -> list[bytes]:
    with db.session(read_only=True) as s:
        return list(s.scalars(sql_select(t.Intake.raw).order_by(t.Intake.id)))


def connect(server: listener.Listener) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    assert sock.recv(1024).startswith(b"220 ")
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (its greeting already read); does not wait."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and sock.recv(1024) == b""


def wait_closed_by_server(sock: socket.socket) -> None:
    while sock.recv(1024):
        pass


def transaction(c: smtplib.SMTP) -> None:
    """MAIL, RCPT and DATA (354 read): the data is the caller's."""
    assert c.mail(SENDER)[0] == 250
    assert c.rcpt(HUB_ADDRESS)[0] == 250
    c.putcmd("DATA")
    assert c.getreply()[0] == 354


def read_all(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


# --- timeouts ---------------------------------------------------------------------------------


def test_a_transfer_that_keeps_arriving_outlasts_the_session_timeout(
    serve: Any, db: Database
) -> None:
    """RFC 5321 §4.5.3.2.5: the data timeout runs from the last block received. aiosmtpd arms
    its timer only when a command arrives: one timer from DATA would cut the transfer off."""
    server = serve(timeout=0.5)
    sent = b""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mail.snv.hanoi.gov.vn")
        transaction(c)
        probe = connect(server)  # idle from now on: closed once a timeout has passed
        while not closed_by_server(probe) and len(sent) < 50_000:
            line = b"line %d\r\n" % len(sent)
            c.send(line)
            sent += line
            threading.Event().wait(0.05)  # a tenth of the timeout between blocks
        probe.close()
        c.send(b".\r\n")
        code, _ = c.getreply()
    assert code == 250
    assert raws(db) == [sent]


def test_a_commit_slower_than_the_session_timeout_still_gets_its_250(
    serve: Any, db: Database, held_commit: tuple[threading.Event, threading.Event]
) -> None:
    """The commit has its own budget (commit_timeout), not what is left of the session's."""
    started, release = held_commit
    server = serve(timeout=0.5)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mail.snv.hanoi.gov.vn")
        transaction(c)
        c.send(MESSAGE + b".\r\n")
        assert started.wait(10)
        probe = connect(server)
        wait_closed_by_server(probe)  # a whole session timeout has passed during the commit
        probe.close()
        release.set()
        code, text = c.getreply()
        assert (code, text.split()[0]) == (250, b"2.0.0")
        assert c.noop()[0] == 250  # and the session goes on
    assert count(db) == 1


def test_a_commit_over_its_budget_closes_the_session(
    serve: Any, db: Database, held_commit: tuple[threading.Event, threading.Event]
) -> None:
    """Past commit_timeout the session is closed without a reply (never a 250 or 451 that could
    be wrong); the peer sends the message again."""
    started, release = held_commit
    server = serve(commit_timeout=0.2)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"EHLO a.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{HUB_ADDRESS}>\r\n".encode()
        )
        sock.sendall(b"DATA\r\n")
        while b"354 " not in sock.recv(4096):
            pass
        sock.sendall(MESSAGE + b".\r\n")
        assert started.wait(10)
        assert read_all(sock) == b""  # closed, no reply
        release.set()


# --- a peer that half-closes ------------------------------------------------------------------


def test_a_peer_that_half_closes_after_the_data_still_gets_its_reply(
    serve: Any, db: Database, held_commit: tuple[threading.Event, threading.Event]
) -> None:
    """Data, end line and QUIT, then shutdown(SHUT_WR) while reading the replies: legal TCP,
    and what batch senders do. aiosmtpd cancels the session on the EOF: committed, no 250."""
    started, release = held_commit
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        sock.sendall(b"EHLO a.example\r\n")
        while replies.readline()[3:4] == b"-":
            pass
        sock.sendall(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{HUB_ADDRESS}>\r\nDATA\r\n".encode())
        assert [replies.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert started.wait(10)
        connect(server).close()  # a barrier: the listener has seen the EOF by its greeting
        release.set()
        rest = replies.read()
    assert rest.startswith(b"250 2.0.0 queued as 1\r\n")
    assert count(db) == 1


def test_a_peer_that_sends_its_whole_session_at_once_and_half_closes_gets_its_250(
    serve: Any, db: Database
) -> None:
    """A health check or batch script (``printf … | nc -N``) writes EHLO, the envelope, DATA,
    the message and QUIT without waiting for a reply, then half-closes. aiosmtpd cancels the
    session at its first wait after the EOF: the few replies are given without one, so the
    message is committed and answered (a session that let the others run after every reply
    stored none of these)."""
    server = serve()
    for n in range(5):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            session = f"EHLO a.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{HUB_ADDRESS}>\r\n"
            sock.sendall(session.encode() + b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n")
            sock.shutdown(socket.SHUT_WR)
            rest = read_all(sock)
        codes = [line[:3] for line in rest.split(b"\r\n") if line and line[3:4] != b"-"]
        # (QUIT's 221 may not come: the EOF ends the session while the commit runs.)
        assert codes[:6] == [b"220", b"250", b"250", b"250", b"354", b"250"], rest
        assert count(db) == n + 1


def test_a_peer_that_half_closes_mid_data_ends_its_session_and_nothing_is_stored(
    serve: Any, db: Database
) -> None:
    server = serve()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mail.snv.hanoi.gov.vn")
        transaction(c)
        c.send(MESSAGE)  # no end line
        c.sock.shutdown(socket.SHUT_WR)
        assert read_all(c.sock) == b""
    assert count(db) == 0


def test_lmtp_half_close_gets_every_recipients_reply(
    serve: Any, db: Database, held_commit: tuple[threading.Event, threading.Event]
) -> None:
    started, release = held_commit
    other = "hub2@exchange.hanoi.gov.vn"
    server = serve(lmtp=True, hub_addresses=[HUB_ADDRESS, other])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        sock.sendall(b"LHLO a.example\r\n")
        while replies.readline()[3:4] == b"-":
            pass
        sock.sendall(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{HUB_ADDRESS}>\r\nRCPT TO:<{other}>\r\n"
            "DATA\r\n".encode()
        )
        assert [replies.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(MESSAGE + b".\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert started.wait(10)
        connect(server).close()  # a barrier, as above
        release.set()
        rest = replies.read()
    assert rest == b"250 2.0.0 queued as 1\r\n" * 2
    assert count(db) == 1


# --- a session cancelled during its commit ----------------------------------------------------


def test_a_session_cancelled_during_its_commit_still_sends_the_reply(
    serve: Any, db: Database, held_commit: tuple[threading.Event, threading.Event]
) -> None:
    """Whatever cancels a session while its message is being committed and the connection is
    still open (the listener stopping, say), the commit goes on and its reply is sent."""
    started, release = held_commit
    server = serve()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mail.snv.hanoi.gov.vn")
        transaction(c)
        c.send(MESSAGE + b".\r\n")
        assert started.wait(10)
        loop: asyncio.AbstractEventLoop = server._loop  # type: ignore[assignment]

        async def cancel_sessions() -> None:
            for session in list(server._sessions):
                session._handler_coroutine.cancel()  # type: ignore[attr-defined]

        asyncio.run_coroutine_threadsafe(cancel_sessions(), loop).result(10)
        release.set()
        code, text = c.getreply()
        assert (code, text.split()[0]) == (250, b"2.0.0")
        assert read_all(c.sock) == b""  # then the session ends
    assert count(db) == 1


# --- sessions at once -------------------------------------------------------------------------


def greeting(server: listener.Listener, source: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
    """A connection from ``source`` and the first line the listener sent (b"" if none)."""
    sock = socket.create_connection(
        ("127.0.0.1", server.port), timeout=30, source_address=(source, 0)
    )
    return sock, sock.makefile("rb").readline()


def admitted_again(server: listener.Listener) -> bool:
    """Whether a new session is admitted once the listener has seen a close (it may lag)."""
    for _ in range(200):
        sock, line = greeting(server)
        sock.close()
        if line.startswith(b"220 "):
            return True
        threading.Event().wait(0.01)
    return False


def test_sessions_over_the_cap_from_one_address_are_refused_with_421(serve: Any) -> None:
    server = serve(max_sessions=10, max_sessions_per_ip=2)
    first, second = (greeting(server) for _ in range(2))
    assert first[1].startswith(b"220 ") and second[1].startswith(b"220 ")
    sock, line = greeting(server)
    assert line == (
        b"421 4.7.0 exchange.hanoi.gov.vn Too many sessions from your address (at most 2 at"
        b" once); try again later\r\n"
    )
    assert read_all(sock) == b""  # and closed
    sock.close()
    other, line = greeting(server, source="127.0.0.2")  # another address is not held up
    assert line.startswith(b"220 ")
    other.close()
    first[0].close()
    assert admitted_again(server)  # a closed session no longer counts
    second[0].close()


def test_sessions_over_the_cap_in_all_are_refused_with_421(serve: Any) -> None:
    server = serve(max_sessions=2, max_sessions_per_ip=10)
    held = [greeting(server, source=f"127.0.0.{n}") for n in (1, 2)]
    assert all(line.startswith(b"220 ") for _, line in held)
    sock, line = greeting(server, source="127.0.0.3")
    assert line.startswith(b"421 4.7.0 ")
    assert b"Too many sessions open (at most 2)" in line
    sock.close()
    for s, _ in held:
        s.sendall(b"QUIT\r\n")
        assert read_all(s).startswith(b"221 ")
        s.close()
    assert admitted_again(server)


def test_a_refused_connection_does_not_count(serve: Any) -> None:
    server = serve(max_sessions=1, max_sessions_per_ip=1)
    held, line = greeting(server)
    assert line.startswith(b"220 ")
    for _ in range(5):
        sock, line = greeting(server)
        assert line.startswith(b"421 ")
        sock.close()
    held.close()
    assert admitted_again(server)


def test_the_caps_are_checked_at_start(db: Database) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        listener.start(
            db, host="127.0.0.1", port=0, hub_addresses=[HUB_ADDRESS], limits=Limits(),
            max_sessions_per_ip=0,
        )  # fmt: skip


def test_a_session_after_starttls_counts_once(
    serve: Any, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """STARTTLS makes the session anew on the TLS layer: still one session, left once."""
    server = serve(tls_context=tls[0], max_sessions=10, max_sessions_per_ip=1)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mail.snv.hanoi.gov.vn")
        assert c.starttls(context=tls[1])[0] == 220
        assert c.ehlo("mail.snv.hanoi.gov.vn")[0] == 250
        sock, line = greeting(server)
        assert line.startswith(b"421 ")
        sock.close()
    assert admitted_again(server)  # left when it ended …
    held, line = greeting(server)
    assert line.startswith(b"220 ")
    sock, line = greeting(server)
    assert line.startswith(b"421 ")  # … and only once
    sock.close()
    held.close()


# --- STARTTLS: a handshake that stalls or fails -----------------------------------------------


def starttls_then_nothing(server: listener.Listener) -> socket.socket:
    """A connection that sends STARTTLS, reads its 220, and then starts no handshake."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"EHLO a.example\r\nSTARTTLS\r\n")
    got = b""
    while b"\r\n220 " not in got:  # the greeting, the EHLO lines, then STARTTLS's 220
        got += sock.recv(4096)
    return sock


def closed_by_it(sock: socket.socket) -> bool:
    """Wait for ``sock`` to be closed by the listener (True), or the socket timeout (False)."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_stalled_tls_handshake_gives_its_session_slot_back(
    serve: Any, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """The session timer closes a connection that sent STARTTLS and then nothing. Python 3.11
    then reports the unfinished handshake as a success and never calls connection_lost: the
    slot was never given back, and with max_sessions_per_ip such peers locked an address out."""
    server = serve(tls_context=tls[0], timeout=0.3, max_sessions=10, max_sessions_per_ip=1)
    for _ in range(2):
        stalled = starttls_then_nothing(server)
        assert closed_by_it(stalled)
        stalled.close()
        assert admitted_again(server)  # the one slot of this address came back
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:  # and TLS still works
        c.ehlo("mail.snv.hanoi.gov.vn")
        assert c.starttls(context=tls[1])[0] == 220
        assert c.ehlo("mail.snv.hanoi.gov.vn")[0] == 250


def test_the_tls_handshake_has_a_timeout_of_its_own(
    serve: Any, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """A peer that stalls its handshake holds its slot for tls_handshake_timeout, not for the
    session timeout (nor asyncio's 60 s)."""
    server = serve(tls_context=tls[0], timeout=30, tls_handshake_timeout=0.3, max_sessions_per_ip=2)
    idle = connect(server)  # closed only once the session timeout has passed
    stalled = starttls_then_nothing(server)
    assert closed_by_it(stalled)
    assert not closed_by_server(idle)
    stalled.close()
    idle.close()
    assert admitted_again(server)


def test_failed_handshakes_are_logged_without_tracebacks_and_not_one_line_each(
    serve: Any, tls: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    """Any peer could make the listener log an ERROR with two chained tracebacks per broken
    handshake (300 in 0.6 s: 325 KB of log). A peer's failure is one INFO line, for the first of
    a run and the 10th, 100th … of it; a handshake that succeeds ends the run."""
    caplog.set_level(logging.INFO, logger="gateway.smtp")
    server = serve(tls_context=tls[0], max_sessions_per_ip=1)

    def broken_handshake() -> None:
        sock = starttls_then_nothing(server)
        sock.sendall(b"\x16\x03\x01\x00\x05hello")  # not a ClientHello
        assert closed_by_it(sock)
        sock.close()
        assert admitted_again(server)  # (and the listener is done with it)

    for _ in range(12):
        broken_handshake()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mail.snv.hanoi.gov.vn")
        assert c.starttls(context=tls[1])[0] == 220
        assert c.noop()[0] == 250
    broken_handshake()
    mine = [r for r in caplog.records if r.name == "gateway.smtp"]
    assert all(r.levelno < logging.WARNING and r.exc_info is None for r in mine), [
        (r.levelname, r.getMessage()) for r in mine
    ]
    failures = [r.getMessage() for r in mine if "TLS handshake failed" in r.getMessage()]
    assert len(failures) == 3, failures  # the 1st and the 10th of 12, the 1st of the next run
    assert failures[0].startswith("127.0.0.1: TLS handshake failed (SSLError: ")
    assert "(10 in a row;" in failures[1]
    assert "(1 in a row;" in failures[2]


# --- the deadline: only a committed message is progress ---------------------------------------


def dribble(sock: socket.socket, unit: bytes, clock: socket.socket) -> bytes:
    """Send ``unit`` every 50 ms (each keeps the session's idle timer from firing) until the
    listener closes the connection; returns all it sent. ``clock``, an idle connection to a
    listener with a longer timeout, fails the test if its timeout passes first."""
    got = b""
    while True:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
            continue
        assert not closed_by_server(clock), f"still open, well past the deadline: {got[-200:]!r}"
        with contextlib.suppress(OSError):  # closed meanwhile: what it sent is read above
            sock.sendall(unit)


@pytest.mark.parametrize(
    ("opening", "unit"),
    [
        (b"", b"NOOP\r\n"),  # answered 250, yet no progress
        (f"MAIL FROM:<{SENDER}>\r\n".encode(), f"MAIL FROM:<{SENDER}>\r\n".encode()),  # 503
        (  # a message's data, a byte at a time
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{HUB_ADDRESS}>\r\nDATA\r\n".encode(),
            b"x",
        ),
        (  # refused messages (bare LF: 550): a message, but not one committed
            b"",
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{HUB_ADDRESS}>\r\nDATA\r\na\nb\r\n.\r\n".encode(),
        ),
    ],
    ids=["noop", "refused-command", "slow-data", "refused-messages"],
)
def test_a_session_that_commits_no_message_is_closed_at_its_deadline(
    serve: Any, db: Database, opening: bytes, unit: bytes
) -> None:
    """The idle timer is re-armed by every command and block of data, so a peer that sends
    something now and then held its session slot for ever: a few such peers held them all
    (Slowloris). The deadline runs from the session's start; only a committed message moves it."""
    reference = serve(timeout=3)
    server = serve(timeout=3, deadline=0.5)
    clock = connect(reference)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"EHLO a.example\r\n" + opening)
        got = dribble(sock, unit, clock)
    clock.close()
    assert got.endswith(
        b"\r\n421 4.4.2 exchange.hanoi.gov.vn No message completed in time; closing\r\n"
    )
    assert count(db) == 0
    assert admitted_again(server)


def test_a_relay_that_keeps_committing_messages_keeps_its_session(serve: Any, db: Database) -> None:
    """Each committed message gives the next one a deadline anew."""
    reference = serve(timeout=1.5)
    server = serve(timeout=30, deadline=0.5)
    clock = connect(reference)  # closed once 1.5 s, three deadlines, have passed
    sent = 0
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as c:
        c.ehlo("mail.snv.hanoi.gov.vn")
        while not closed_by_server(clock) and sent < 10_000:
            transaction(c)
            c.send(MESSAGE + b".\r\n")
            assert c.getreply()[0] == 250
            sent += 1
        assert c.noop()[0] == 250
    clock.close()
    assert count(db) == sent
