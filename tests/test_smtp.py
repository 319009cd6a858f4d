"""The SMTP/LMTP intake listener over real sockets: stdlib smtplib talks to a running listener,
the intake table is read back. Durable before 250; 451 (never 500, never 250) on any failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import smtplib
import socket
import sqlite3
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select

from archive import tables as t
from archive.db import Database
from formats.limits import Limits
from gateway import intake, smtp_checks, smtp_protocol
from gateway import smtp as listener
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.pipeline import Context, process
from keys.issuing import issue_agency, make_root
from tests.conftest import WORLD_AT

SENDER = "vanthu@snv.hanoi.gov.vn"
SMALL = Limits(max_message_bytes=20_000)

MESSAGE = (
    b"From: vanthu@snv.hanoi.gov.vn\r\n"
    b"To: hub@exchange.hanoi.gov.vn\r\n"
    b"Subject: =?utf-8?b?QsOhbyBjw6Fv?=\r\n"
    b"Message-ID: <1@snv.hanoi.gov.vn>\r\n"
    b"\r\n"
    b".a line that starts with a dot (transparency, RFC 5321 \xc2\xa74.5.2)\r\n"
    b"8-bit octets: \xe1\xbb\x87 \xff\x00\r\n"
    b"\r\n"
    b"last line\r\n"
)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(f"sqlite:///{tmp_path}/archive.db")
    yield database
    database.dispose()


@pytest.fixture
def serve(db: Database) -> Iterator[Any]:
    """Start listeners on 127.0.0.1:0 (``serve(**options)``); all are stopped afterwards."""
    running: list[listener.Listener] = []

    def _start(database: Database | None = None, **options: Any) -> listener.Listener:
        options.setdefault("limits", SMALL)
        options.setdefault("hub_addresses", [HUB_ADDRESS])
        options.setdefault("clock", lambda: WORLD_AT)
        server = listener.start(database or db, host="127.0.0.1", port=0, **options)
        running.append(server)
        return server

    yield _start
    for server in running:
        server.stop()


def client(server: listener.Listener) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.port, local_hostname="mail.snv.hanoi.gov.vn", timeout=30)
    c.ehlo()
    return c


def rows(db: Database) -> list[t.Intake]:
    with db.session(read_only=True) as s:
        return list(s.scalars(select(t.Intake).order_by(t.Intake.id)))


def count(db: Database) -> int:
    with db.session(read_only=True) as s:
        return int(s.scalar(select(func.count()).select_from(t.Intake)) or 0)


def send_raw_data(c: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
    """DATA with the bytes exactly as given (smtplib.data() would repair bare LFs)."""
    c.putcmd("DATA")
    code, _ = c.getreply()
    assert code == 354
    c.send(data + b".\r\n")
    return c.getreply()


def envelope(c: smtplib.SMTP, rcpts: tuple[str, ...] = (HUB_ADDRESS,)) -> None:
    assert c.mail(SENDER)[0] == 250
    for rcpt in rcpts:
        assert c.rcpt(rcpt)[0] == 250


# --- durable intake ---------------------------------------------------------------------------


def test_a_message_is_stored_byte_for_byte_before_250(serve: Any, database_url: str) -> None:
    db = Database.open(database_url)
    try:
        server = serve(db)
        with client(server) as c:
            envelope(c)
            code, text = c.data(MESSAGE)
        assert code == 250
        number = int(re.fullmatch(rb"2\.0\.0 queued as (\d+)", text).group(1))  # type: ignore[union-attr]

        [row] = rows(db)
        assert row.id == number
        assert row.raw == MESSAGE  # dot-unstuffed, 8-bit intact, no Received: added
        assert row.state == "new"
        assert row.transport["protocol"] == "smtp"
        assert row.transport["peer"] == "127.0.0.1"
        assert row.transport["helo"] == "mail.snv.hanoi.gov.vn"
        assert row.transport["mail_from"] == SENDER
        assert row.transport["rcpt_to"] == [HUB_ADDRESS]
        assert row.transport["tls"] is None
        assert row.received_at.replace(tzinfo=None) == WORLD_AT.replace(tzinfo=None)
    finally:
        db.dispose()


def test_a_pipelined_next_transaction_is_left_for_the_session(serve: Any, db: Database) -> None:
    """RFC 2920: the data, its end line and the next transaction's commands in one write; each
    command gets its reply, in order, and both messages are stored as sent (the data is read
    in blocks, gateway.smtp_data: nothing after the end line may be taken for data)."""
    server = serve()
    one, two = b"Subject: one\r\n\r\n..dot\r\n", b"Subject: two\r\n\r\nbody.\r\n"
    transaction = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{HUB_ADDRESS}>\r\nDATA\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        replies = sock.makefile("rb")

        def codes(n: int) -> list[bytes]:
            out = []
            while len(out) < n:
                line = replies.readline()
                if line[3:4] != b"-":
                    out.append(line[:3])
            return out

        assert codes(1) == [b"220"]
        sock.sendall(b"EHLO mail.snv.hanoi.gov.vn\r\n" + transaction)
        assert codes(4) == [b"250", b"250", b"250", b"354"]
        sock.sendall(one + b".\r\n" + transaction)
        assert codes(4) == [b"250", b"250", b"250", b"354"]
        sock.sendall(two + b".\r\nQUIT\r\n")
        assert codes(2) == [b"250", b"221"]
    assert [row.raw for row in rows(db)] == [b"Subject: one\r\n\r\n.dot\r\n", two]


def test_ehlo_advertises_size_and_enhanced_codes_and_no_auth(serve: Any) -> None:
    server = serve()
    with client(server) as c:
        assert c.has_extn("size")
        assert c.esmtp_features["size"] == str(SMALL.max_message_bytes)
        assert c.has_extn("enhancedstatuscodes")
        assert c.has_extn("8bitmime")
        assert not c.has_extn("auth")
        assert not c.has_extn("starttls")  # no tls_context given
        assert c.docmd("AUTH", "PLAIN AGZvbwBiYXI=")[0] == 502


def test_a_demo_submission_goes_through_unchanged_and_still_verifies(
    serve: Any, db: Database, world: DemoWorld, world_ctx: Context
) -> None:
    submission = world.submission("H26.SNV")
    # The builder folds the long Vietnamese Subject with CRLF: nothing but CRLF line ends.
    assert re.sub(rb"\r\n|\n|\r", b"\r\n", submission) == submission
    server = serve(limits=Limits())
    with client(server) as c:
        assert c.sendmail(SENDER, [HUB_ADDRESS], submission) == {}

    [first] = rows(db)
    assert first.raw == submission
    verdict = process(first.raw, world_ctx, at=WORLD_AT + timedelta(minutes=1))
    assert verdict.disposition == "accepted", verdict.errors


def test_the_event_loop_is_free_while_a_commit_is_slow(
    serve: Any, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    real_accept = intake.accept

    def slow_accept(*args: Any) -> int:
        started.set()
        release.wait(10)
        return real_accept(*args)

    monkeypatch.setattr(intake, "accept", slow_accept)
    server = serve()
    replies: list[tuple[int, bytes]] = []
    with client(server) as slow:
        envelope(slow)
        sender = threading.Thread(target=lambda: replies.append(slow.data(MESSAGE)))
        sender.start()
        assert started.wait(10)
        # Another session is served while the first one's commit is still under way.
        t0 = time.monotonic()
        with client(server) as other:
            assert other.noop()[0] == 250
        assert time.monotonic() - t0 < 2
        assert replies == []  # no 250 before the commit returned
        release.set()
        sender.join(10)
    assert replies[0][0] == 250
    assert count(db) == 1


def test_stop_lets_a_commit_under_way_finish_and_answer_250(
    serve: Any, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    real_accept = intake.accept

    def slow_accept(*args: Any) -> int:
        started.set()
        release.wait(10)
        return real_accept(*args)

    monkeypatch.setattr(intake, "accept", slow_accept)
    server = serve()
    replies: list[tuple[int, bytes]] = []
    with client(server) as c:
        envelope(c)
        sender = threading.Thread(target=lambda: replies.append(c.data(MESSAGE)))
        sender.start()
        assert started.wait(10)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        assert _refused_soon(server.port)  # no new sessions while stopping
        release.set()
        sender.join(10)
        stopper.join(10)
        assert c.noop()[0] == 421  # answered, then told the service is shutting down
    assert replies[0][0] == 250
    assert count(db) == 1


def test_stop_tells_the_sessions_it_closes_421(serve: Any, db: Database) -> None:
    """RFC 5321 §3.8: a server that must shut down answers 421 and closes. A session in the
    middle of its data, and one between two messages, were cut off with no reply at all."""
    server = serve()
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as busy,
        client(server) as idle,
    ):
        replies = busy.makefile("rb")
        assert replies.readline().startswith(b"220")
        busy.sendall(b"HELO a.example\r\nMAIL FROM:<a@b.example>\r\n")
        busy.sendall(b"RCPT TO:<hub@exchange.hanoi.gov.vn>\r\nDATA\r\n")
        assert [replies.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        busy.sendall(b"Subject: x\r\n\r\nthe first half of the body\r\n")
        assert idle.noop()[0] == 250
        server.stop()
        assert replies.read() == listener.SHUTTING_DOWN  # then the server closed the connection
        assert idle.getreply() == (421, b"4.3.2 Service shutting down, try again later")
    assert count(db) == 0


def _refused_soon(port: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionError:  # refused, or reset: queued as the listening socket closed
            return True
        time.sleep(0.02)
    return False


# --- 451: never 500, never 250 ----------------------------------------------------------------


def test_a_locked_database_answers_451_and_stores_nothing(
    serve: Any, db: Database, tmp_path: Path
) -> None:
    # busy_timeout is 5 s in archive.db; a test waits 0.2 s (a connect listener registered
    # after the storage module's one runs last; the pool is emptied so that it applies).
    event.listen(db.engine, "connect", _short_busy_timeout)
    db.engine.dispose()
    holder = sqlite3.connect(tmp_path / "archive.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock throughout
        server = serve()
        with client(server) as c:
            envelope(c)
            code, text = c.data(MESSAGE)
        assert (code, text.split()[0]) == (451, b"4.3.0")
        assert b"lock" not in text.lower()
    finally:
        holder.rollback()
        holder.close()
    assert count(db) == 0


def _short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA busy_timeout=200")


def test_an_unexpected_error_in_accept_answers_451_without_internals(
    serve: Any, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: Any) -> int:
        raise RuntimeError("secret /var/lib/gateway/archive.db exploded")

    monkeypatch.setattr(intake, "accept", boom)
    server = serve()
    with client(server) as c:
        envelope(c)
        code, text = c.data(MESSAGE)
        assert code == 451
        assert text.startswith(b"4.3.0 ")
        assert b"secret" not in text and b"RuntimeError" not in text
        # the session goes on: the peer may try again at once
        assert c.noop()[0] == 250
    assert count(db) == 0


def test_a_damaged_database_answers_451_with_one_log_line(
    serve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Damage is the database's, not the peer's: 451, and a warning naming it, not a
    traceback per message. The file is really damaged, under a listener already running."""
    path = tmp_path / "damaged.db"
    database = Database.open(f"sqlite:///{path}")
    try:
        server = serve(database)
        database.engine.dispose()  # the next commit opens the file anew
        with path.open("r+b") as f:
            f.write(b"this is no SQLite header any more")
        with client(server) as c:
            envelope(c)
            code, text = c.data(MESSAGE)
    finally:
        database.dispose()
    assert code == 451 and b"damaged" not in text
    [record] = [r for r in caplog.records if "not stored" in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert str(path) in record.getMessage() and "not a SQLite database" in record.getMessage()


def test_an_error_in_any_other_hook_is_451_not_aiosmtpds_500(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: Any) -> str:
        raise ValueError("internal detail 42")

    monkeypatch.setattr(listener.IntakeHandler, "handle_RCPT", broken)
    server = serve()
    with client(server) as c:
        assert c.mail(SENDER)[0] == 250
        code, text = c.rcpt(HUB_ADDRESS)
    assert code == 451
    assert b"internal" not in text and b"ValueError" not in text


# --- limits (DESIGN §5 rule 4) ----------------------------------------------------------------


def test_a_message_over_the_size_limit_is_552(serve: Any, db: Database) -> None:
    server = serve()
    big = MESSAGE + b"x" * 70 + b"\r\n"
    big = big * (SMALL.max_message_bytes // len(big) + 1)
    with client(server) as c:
        envelope(c)
        code, text = c.data(big)  # no SIZE= declared: refused after the data
        assert (code, text.split()[0]) == (552, b"5.3.4")
        # declared up front with SIZE=: refused at MAIL FROM
        code, text = c.mail(SENDER, [f"SIZE={len(big)}"])
        assert (code, text.split()[0]) == (552, b"5.3.4")
    assert count(db) == 0
    assert server.handler.replies == {"552": 1}  # gateway_smtp_replies_total: DATA's replies


def test_a_large_message_within_the_limit_is_stored(serve: Any, db: Database) -> None:
    body = (b"A" * 76 + b"\r\n") * 40_000  # ~3 MiB: its checks run off the event loop
    server = serve(limits=Limits())
    with client(server) as c:
        envelope(c)
        assert c.data(MESSAGE + body)[0] == 250
    [row] = rows(db)
    assert row.raw == MESSAGE + body


def test_lines_that_end_in_a_dot_cost_the_listener_what_any_other_line_costs(
    serve: Any, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DATA reader asked its stream for each ".<CRLF>": a body of "a.<CRLF>" lines was one
    piece and one pass of Python per line, on the listener's one event loop (16 MiB: 3.7 s of
    CPU, 20 times a plain body; every other session waited). Counted here: the pieces the
    listener's thread takes from asyncio's streams while it reads 1 MiB of such lines."""
    pieces = [0]

    def counted(method: Any) -> Any:
        async def taking(self: asyncio.StreamReader, *args: Any) -> Any:
            if threading.current_thread().name == "gateway-smtp":
                pieces[0] += 1
            return await method(self, *args)

        return taking

    for name in ("read", "readuntil", "readexactly", "readline"):
        monkeypatch.setattr(
            asyncio.StreamReader, name, counted(getattr(asyncio.StreamReader, name))
        )
    body = b"a.\r\n" * (1024 * 1024 // 4)
    server = serve(limits=Limits())
    with client(server) as c:
        envelope(c)
        assert c.data(MESSAGE + body)[0] == 250
    [row] = rows(db)
    assert row.raw == MESSAGE + body
    assert pieces[0] < 5_000  # a piece per block the socket gives, not 262,144 (one a line)


def test_recipients_beyond_the_cap_get_452(serve: Any, db: Database) -> None:
    server = serve(max_recipients=3)
    with client(server) as c:
        envelope(c, (HUB_ADDRESS,) * 3)
        code, text = c.rcpt(HUB_ADDRESS)
        assert (code, text.split()[0]) == (452, b"4.5.3")
        assert c.data(MESSAGE)[0] == 250  # the three accepted ones still go through
    [row] = rows(db)
    assert row.transport["rcpt_to"] == [HUB_ADDRESS] * 3


def test_an_unknown_recipient_is_550_and_echoed_only_sanitised(serve: Any) -> None:
    server = serve()
    with client(server) as c:
        assert c.mail(SENDER)[0] == 250
        code, text = c.rcpt("someone@else.example")
        assert (code, text) == (550, b"5.1.1 <someone@else.example>: no such recipient here")
        code, text = c.rcpt('"<script>alert(1)</script> x"@else.example')
        assert code == 550
        assert b"<script>" not in text
        assert c.rcpt(HUB_ADDRESS.upper())[0] == 250  # addresses compare case-insensitively


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"Subject: x\nFrom: a@b\r\n\r\nbody\r\n", b"LF"),
        (b"Subject: x\r\n\r\nbody\rmore\r\n", b"CR"),
    ],
)
def test_bare_lf_or_cr_is_refused_and_not_stored(
    serve: Any, db: Database, data: bytes, what: bytes
) -> None:
    server = serve()
    with client(server) as c:
        envelope(c)
        code, text = send_raw_data(c, data)
    assert (code, text.split()[0]) == (550, b"5.6.2")
    assert b"Bare " + what in text and b"RFC 5321" in text
    assert count(db) == 0


@pytest.mark.parametrize(("length", "code"), [(998, 250), (999, 500), (5000, 500)])
def test_lines_over_998_octets_are_refused(
    serve: Any, db: Database, length: int, code: int
) -> None:
    server = serve()
    with client(server) as c:
        envelope(c)
        got, text = c.data(b"Subject: x\r\n\r\n" + b"a" * length + b"\r\n")
    assert got == code
    if code == 500:
        assert text.startswith(b"5.5.2 Line too long")
    assert count(db) == (1 if code == 250 else 0)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("MAIL FROM:<broken", (553, b"5.1.3")),
        ("MAIL TO:<a@b.example>", (501, b"5.5.4")),
        ("MAIL FROM:<a@b.example> BODY=9BIT", (501, b"5.5.4")),
    ],
)
def test_mail_from_syntax_errors(serve: Any, command: str, expected: tuple[int, bytes]) -> None:
    server = serve()
    with client(server) as c:
        code, text = c.docmd(command)
    assert (code, text.split()[0]) == expected


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("RCPT TO:<broken", (553, b"5.1.3")),
        ("RCPT TO:<a@>", (553, b"5.1.3")),
        ("RCPT TO:<a@b@c>", (553, b"5.1.3")),
        ("RCPT <hub@exchange.hanoi.gov.vn>", (501, b"5.5.4")),
    ],
)
def test_rcpt_to_syntax_errors(serve: Any, command: str, expected: tuple[int, bytes]) -> None:
    server = serve()
    with client(server) as c:
        assert c.mail(SENDER)[0] == 250
        code, text = c.docmd(command)
    assert (code, text.split()[0]) == expected


def test_the_null_sender_is_accepted(serve: Any, db: Database) -> None:
    """MAIL FROM:<> (a bounce, RFC 5321 §4.5.5) goes all the way: RCPT and DATA too."""
    server = serve()
    with client(server) as c:
        assert c.docmd("MAIL FROM:<>")[0] == 250
        assert c.rcpt(HUB_ADDRESS)[0] == 250
        assert send_raw_data(c, b"Subject: bounce\r\n\r\nundeliverable\r\n")[0] == 250
    assert count(db) == 1


def test_data_asks_for_what_comes_first(serve: Any) -> None:
    """DATA before MAIL was told it needed RCPT: MAIL comes first."""
    server = serve()
    with client(server) as c:
        assert c.docmd("DATA") == (503, b"5.5.1 Need MAIL command")
        assert c.mail(SENDER)[0] == 250
        assert c.docmd("DATA") == (503, b"5.5.1 Need RCPT command")


@pytest.mark.parametrize("path", ["a@b.example", "<a@b.example", "a@b.example>", " a@b.example"])
def test_the_path_goes_in_angle_brackets(serve: Any, path: str) -> None:
    """RFC 5321 §4.1.2: Path = "<" Mailbox ">". aiosmtpd takes a bare address, or one whose
    bracket is not closed, for the address itself."""
    server = serve()
    with client(server) as c:
        code, text = c.docmd(f"MAIL FROM:{path}")
        assert (code, text.split()[0]) == (553, b"5.1.3")
        assert c.docmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        code, text = c.docmd(f"RCPT TO:{path.replace('a@b.example', HUB_ADDRESS)}")
        assert (code, text.split()[0]) == (553, b"5.1.3")
        assert c.docmd(f"RCPT TO:<{HUB_ADDRESS}>")[0] == 250


@pytest.mark.parametrize(
    "path", ['<"a b"@b.example>', "<@relay.example:a@b.example>", '<"a>b"@b.example>']
)
def test_paths_in_angle_brackets_are_still_taken(serve: Any, path: str) -> None:
    server = serve()
    with client(server) as c:
        assert c.docmd(f"MAIL FROM:{path}")[0] == 250


PATHS = [
    "", "<>", "<a@b.example>", "a@b.example", " <a@b.example> SIZE=10", '<"a b"@b.example>',
    "<@relay.example:a@b.example>", '<"a>b"@b.example>', "<a@b.example", "<<>>", "<@>", "<a@>",
    "<" + "x" * 65 + "@b.example>", "<" + "x" * 64 + "@b.example>", "<a@[127.0.0.1]>", "<(c)a@b>",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(PATHS), st.text(alphabet='<>@"\\ .:[]()ax,;', max_size=24)))
def test_the_path_is_read_as_aiosmtpd_reads_it(path: str) -> None:
    """The listener's own reading of a MAIL or RCPT path (without the class aiosmtpd 1.4
    defines on every call) gives aiosmtpd's answer for every path, the local part limit too;
    a path the email parser fails on, where aiosmtpd raises (a 451), is a bad address."""
    ours = listener.IntakeSMTP.__new__(listener.IntakeSMTP)
    theirs = SMTP.__new__(SMTP)
    for limit in (0, 64):
        ours.local_part_limit = theirs.local_part_limit = limit
        expected = _outcome(theirs._getaddr, path)
        if isinstance(expected, type):  # it raised
            expected = (None, None)
        assert _outcome(ours._getaddr, path) == expected


def _outcome(read: Any, path: str) -> object:
    """What ``read(path)`` returns, or the type of what it raises (the email parser raises
    IndexError on some unbracketed paths; the listener refuses those before reading them)."""
    try:
        return read(path)
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize(
    "postmaster",
    [
        "postmaster",
        "PostMaster",
        "postmaster@exchange.hanoi.gov.vn",
        "POSTMASTER@EXCHANGE.HANOI.GOV.VN",
    ],
)
def test_postmaster_is_accepted_and_its_mail_taken_in(
    serve: Any, db: Database, world_ctx: Context, postmaster: str
) -> None:
    """RFC 5321 §4.5.1: a server MUST accept "postmaster" (any case), bare or at its domain.
    Its mail is committed as any message is (never lost); the workers file it (plain mail, a
    bounce or a report, is quarantined for an administrator, with no receipt)."""
    server = serve()
    report = b"From: <>\r\nSubject: Undelivered Mail\r\n\r\nA report\r\n"
    with client(server) as c:
        assert c.mail("")[0] == 250  # the null reverse-path of a bounce
        code, text = c.rcpt(postmaster)
        assert (code, text.split()[0]) == (250, b"2.1.5")
        code, text = c.rcpt("postmaster@else.example")  # another domain's: not ours
        assert (code, text.split()[0]) == (550, b"5.1.1")
        assert c.data(report)[0] == 250
    [row] = rows(db)
    assert row.raw == report
    assert row.transport["rcpt_to"] == [postmaster]
    verdict = process(row.raw, world_ctx, at=WORLD_AT + timedelta(minutes=1))
    assert verdict.disposition == "quarantined"  # kept for an administrator, no receipt


def test_help_replies_carry_enhanced_status_codes(serve: Any) -> None:
    """RFC 2034 §3: every reply but the greeting and the HELO/EHLO replies carries an enhanced
    code; HELP is answered 214 (RFC 5321 §4.1.1.8; aiosmtpd: 250, and 501 for an unknown
    topic). The HELO reply is "250 <domain>" (RFC 5321 §4.1.1.1): no code goes before it."""
    server = serve()
    with client(server) as c:
        code, text = c.docmd("HELP")
        assert (code, text.split()[0]) == (214, b"2.0.0")
        assert b"MAIL" in text and b"EHLO" in text
        assert c.docmd("HELP", "EHLO") == (214, b"2.0.0 Syntax: EHLO hostname")
        code, text = c.docmd("HELP", "MAIL")
        assert (code, text.split()[0]) == (214, b"2.0.0")
        code, text = c.docmd("HELP", "X-NOTHING")
        assert (code, text.split()[0]) == (501, b"5.5.4")
        assert b"X-NOTHING" not in text
        assert c.helo("mail.snv.hanoi.gov.vn") == (250, b"exchange.hanoi.gov.vn")


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("vanthu@snv.hanoi.gov.vn", True),
        ('"q x"@b.example', True),
        ("a@[127.0.0.1]", True),
        ("broken", False),
        ("a..b@c.example", False),
        ("a@-c.example", False),
        ("x" * 65 + "@c.example", False),
    ],
)
def test_is_mailbox(address: str, ok: bool) -> None:
    assert smtp_checks.is_mailbox(address) is ok


def test_replies_never_echo_what_the_peer_sent(serve: Any) -> None:
    server = serve()
    with client(server) as c:
        code, text = c.docmd("X-EVIL<script>")
        assert (code, text) == (500, b"5.5.1 Command not recognized")
        code, text = c.docmd("VRFY", "<x@y.example> <script>")
        assert b"script" not in text


def test_an_idle_session_is_told_421_and_closed_after_the_timeout(serve: Any) -> None:
    """RFC 5321 §4.2.3: 421 before the channel is closed. aiosmtpd closed it without a word:
    the client could not tell a timeout from a crash."""
    server = serve(timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        assert s.recv(1024).startswith(b"220 ")
        said, deadline = b"", time.monotonic() + 10
        while (more := s.recv(1024)) and time.monotonic() < deadline:
            said += more
        assert time.monotonic() < deadline  # closed by the server, not by our deadline
    assert said.startswith(b"421 4.4.2 ") and b"Timeout" in said


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("MAIL FROM:<a@[b>", (553, b"5.1.3")),
        ('MAIL FROM:< (,>!#.)"', (553, b"5.1.3")),
        ("MAIL FROM:<?\x7f==@[aa>", (553, b"5.1.3")),
        ("RCPT TO:<a@[b>", (553, b"5.1.3")),
        ("VRFY <", (502, b"5.5.4")),
        ('VRFY "', (502, b"5.5.4")),
    ],
)
def test_an_address_the_email_parser_fails_on_is_bad_syntax(
    serve: Any, caplog: pytest.LogCaptureFixture, command: str, reply: tuple[int, bytes]
) -> None:
    """The stdlib's parser raises IndexError, AttributeError or UnboundLocalError on some
    paths: they were answered 451 (try again later, for ever) with a traceback in the log."""
    server = serve()
    with client(server) as c:
        if command.startswith("RCPT"):
            assert c.mail(SENDER)[0] == 250
        code, text = c.docmd(command)
        assert (code, text.split()[0]) == reply
        assert c.noop()[0] == 250
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_lmtp_sessions_command_line_limit_is_fixed_too(serve: Any) -> None:
    """LHLO, as EHLO, set the MAIL line limit from its base again (aiosmtpd's LMTP greets
    through SMTP's EHLO, not the gateway's)."""
    server = serve(lmtp=True)
    with smtplib.LMTP("127.0.0.1", server.port, timeout=30) as c:
        for _ in range(9):
            assert c.docmd("LHLO", "a.example")[0] == 250
        code, text = c.docmd(f"MAIL FROM:<{SENDER}> SIZE=" + "9" * 600)
    assert (code, text.split()[0]) == (500, b"5.5.2")


def test_a_sessions_command_line_limit_is_its_own_and_fixed(serve: Any) -> None:
    """aiosmtpd kept the limits on its class: every EHLO, of any session, lengthened the MAIL
    line every session could send (until a SIZE= held more digits than int() reads: 451 with
    a traceback), and each new connection set them back."""
    server = serve()
    sessions = [client(server) for _ in range(3)]
    try:
        for c in sessions[1:]:
            for _ in range(8):
                assert c.ehlo()[0] == 250
        for _ in range(8):
            assert sessions[0].ehlo()[0] == 250  # its own, again and again: the same limit
        code, text = sessions[0].docmd(f"MAIL FROM:<{SENDER}> SIZE=" + "9" * 600)
        assert (code, text.split()[0]) == (500, b"5.5.2")
        assert sessions[0].docmd(f"MAIL FROM:<{SENDER}> SIZE=" + "9" * 400)[0] == 552
    finally:
        for c in sessions:
            c.close()


def test_too_many_commands_close_the_session(serve: Any) -> None:
    server = serve()
    with client(server) as c:
        for _ in range(listener.COMMAND_LIMITS["NOOP"]):
            assert c.noop()[0] == 250
        code, text = c.noop()
    assert (code, text) == (421, b"4.7.0 Too many commands in one session; closing")


def test_a_session_carries_more_than_a_thousand_messages(serve: Any, db: Database) -> None:
    """A relay keeps its connection for as long as it has mail (Postfix sets no count): the
    budgets of MAIL, RCPT and DATA are their own, not the 1,000 of every other command."""
    server = serve()
    with client(server) as c:
        for _ in range(listener.COMMAND_LIMITS["*"]):  # refused before any commit: quick
            envelope(c)
            assert send_raw_data(c, b"a\nb\r\n")[0] == 550
        envelope(c)
        assert c.data(MESSAGE)[0] == 250
    assert count(db) == 1


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (MESSAGE, None),
        (b"a\nb\r\n", "550 5.6.2"),
        (b"a\r\rb\r\n", "550 5.6.2"),
        (b"x" * 998 + b"\r\n", None),
        (b"x" * 999 + b"\r\n", "500 5.5.2"),
        (b"", None),
    ],
)
def test_check_data(data: bytes, reply: str | None) -> None:
    got = smtp_checks.check_data(data, Limits())
    assert (got[:9] if got else None) == reply


@settings(max_examples=500, deadline=None)
@given(
    limit=st.integers(1, 20),
    # Lines a little under, at and just over the limit, at every offset against check_data's
    # blocks (small limits: small blocks), and lines of any length.
    shape=st.lists(st.one_of(st.integers(-3, 1), st.integers(-20, 20)), max_size=30),
)
def test_line_limit_is_checked_exactly_for_any_line_lengths(limit: int, shape: list[int]) -> None:
    lengths = [max(0, limit + d) for d in shape]
    data = b"".join(b"x" * n + b"\r\n" for n in lengths)
    got = smtp_checks.check_data(data, Limits(max_line_bytes=limit))
    assert (got is not None) == any(n > limit for n in lengths)
    assert got is None or got.startswith("500 5.5.2")


def test_a_long_line_is_found_without_copying_the_message() -> None:
    """8 MiB of short lines and one over the limit: the check measures the lines where a long
    one can be, in place. Splitting the data into lines made a bytes object per line, ~400 MiB
    and most of a second of the event loop's GIL for 32 MiB."""
    data = b"short line\r\n" * (8 * 2**20 // 12) + b"x" * 999 + b"\r\n"
    tracemalloc.start()
    try:
        got = smtp_checks.check_data(data, Limits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == smtp_checks.LINE_TOO_LONG
    assert peak < 2**20, peak


def test_a_session_pipelining_thousands_of_commands_does_not_hold_the_others(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One peer sends 40,000 RCPTs at once: its session takes them from its stream without
    waiting, and answers them while the peer reads. Counted by the listener itself: another
    session's NOOP is answered within a few of those RCPTs of reaching it, not after the
    thousands already read."""
    handled = [0]
    at_noop: list[int] = []
    rcpt, noop = smtp_protocol._Replies.smtp_RCPT, SMTP.smtp_NOOP

    async def counting_rcpt(self: Any, arg: str | None) -> None:
        handled[0] += 1
        await rcpt(self, arg)

    async def noting_noop(self: Any, arg: str) -> None:
        at_noop.append(handled[0])
        await noop(self, arg)

    monkeypatch.setattr(smtp_protocol._Replies, "smtp_RCPT", counting_rcpt)
    monkeypatch.setattr(SMTP, "smtp_NOOP", noting_noop)
    server = serve(limits=Limits())
    honest = client(server)
    flood = socket.create_connection(("127.0.0.1", server.port))
    done = threading.Event()

    def read_replies() -> None:
        while flood.recv(1 << 16) and not done.is_set():
            pass

    def send_the_rest() -> None:
        try:
            flood.sendall(b"RCPT TO:<nobody@x.vn>\r\n" * 39000)
        except OSError:
            if not done.is_set():  # cut off before the test ended it
                raise

    reader = threading.Thread(target=read_replies, daemon=True)
    sender = threading.Thread(target=send_the_rest, daemon=True)
    reader.start()
    try:
        flood.sendall(b"EHLO x\r\nMAIL FROM:<a@b.vn>\r\n" + b"RCPT TO:<nobody@x.vn>\r\n" * 1000)
        sender.start()
        deadline = time.monotonic() + 30
        while handled[0] < 2000 and time.monotonic() < deadline:
            time.sleep(0.001)
        sent_at = handled[0]
        assert honest.noop()[0] == 250
        assert sent_at >= 2000 and len(at_noop) == 1
        assert at_noop[0] - sent_at < 1000, (sent_at, at_noop)
    finally:
        done.set()
        # Shut the socket down before closing it: its threads see the end of the stream (or a
        # broken pipe) instead of a descriptor closed under them.
        with contextlib.suppress(OSError):
            flood.shutdown(socket.SHUT_RDWR)
        reader.join(10)
        if sender.ident is not None:
            sender.join(10)
        flood.close()
        honest.close()


def test_a_session_that_reads_none_of_its_replies_is_dropped_once_it_ends(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer sends commands and reads nothing, its receive window shut: when its session ends
    (here its idle timeout), the replies still unsent would keep the socket open for good,
    though its slot is back. The connection is dropped after CLOSE_GRACE."""
    monkeypatch.setattr(smtp_protocol, "CLOSE_GRACE", 0.5)
    server = serve(limits=Limits(), timeout=1.0)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    peer.connect(("127.0.0.1", server.port))
    try:
        commands = b"RCPT TO:<" + b"a" * 64 + b"@" + b"b" * 60 + b".vn>\r\n"
        peer.sendall(b"EHLO x\r\nMAIL FROM:<a@b.vn>\r\n" + commands * 20000)

        def state() -> int:  # RFC 793 state as Linux numbers it: 1 established, 7 closed
            return peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]

        deadline = time.monotonic() + 30
        while state() == 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state() == 7  # reset by the listener, not left established
    finally:
        peer.close()


# --- STARTTLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (PEM files)."""
    home = tmp_path_factory.mktemp("tls")
    root = make_root("Test TLS root", at=WORLD_AT - timedelta(days=1), key_kind="ec-p256")
    leaf = issue_agency(
        root,
        email=HUB_ADDRESS,
        organ_id=None,
        common_name="127.0.0.1",
        at=WORLD_AT - timedelta(days=1),
        key_kind="ec-p256",
        eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )
    (home / "root.pem").write_bytes(root.cert_pem())
    (home / "cert.pem").write_bytes(leaf.cert_pem())
    (home / "key.pem").write_bytes(leaf.key_pem())
    return home / "root.pem", home / "cert.pem", home / "key.pem"


def test_required_starttls_refuses_mail_before_and_accepts_after(
    serve: Any, db: Database, tls_files: tuple[Path, Path, Path]
) -> None:
    root, cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(root))
    client_ctx.check_hostname = False  # the throw-away certificate names no DNS host

    server = serve(tls_context=server_ctx, require_tls=True)
    with client(server) as c:
        assert c.has_extn("starttls")
        code, text = c.mail(SENDER)
        assert (code, text.split()[0]) == (530, b"5.7.0")
        assert c.starttls(context=client_ctx)[0] == 220
        c.ehlo()
        envelope(c)
        assert c.data(MESSAGE)[0] == 250

    [row] = rows(db)
    assert row.raw == MESSAGE
    assert re.fullmatch(r"TLSv1\.[23] \S+", row.transport["tls"])


def test_a_second_starttls_inside_tls_is_refused(
    serve: Any, db: Database, tls_files: tuple[Path, Path, Path]
) -> None:
    """RFC 3207 §4.2: STARTTLS once TLS is on is refused (554 5.5.1, as Postfix answers); a
    second TLS layer is not stacked on the first, and the session goes on."""
    root, cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(root))
    client_ctx.check_hostname = False

    server = serve(tls_context=server_ctx)
    with client(server) as c:
        assert c.starttls(context=client_ctx)[0] == 220
        c.ehlo()
        code, text = c.docmd("STARTTLS")
        assert (code, text) == (554, b"5.5.1 TLS already active")
        envelope(c)
        assert c.data(MESSAGE)[0] == 250
    assert count(db) == 1


# --- LMTP -------------------------------------------------------------------------------------


def test_lmtp_answers_once_per_recipient_after_one_commit(serve: Any, db: Database) -> None:
    other = "hub2@exchange.hanoi.gov.vn"
    server = serve(lmtp=True, hub_addresses=[HUB_ADDRESS, other])
    with smtplib.LMTP("127.0.0.1", server.port, local_hostname="mx.hanoi.gov.vn") as c:
        assert c.ehlo_or_helo_if_needed() is None  # LHLO
        envelope(c, (HUB_ADDRESS, other))
        assert c.rcpt("nobody@exchange.hanoi.gov.vn")[0] == 550  # gets no DATA reply
        first = c.data(MESSAGE)  # smtplib reads one reply; RFC 2033 sends one per recipient
        second = c.getreply()
        assert c.noop()[0] == 250  # nothing left over in the stream
    assert first[0] == second[0] == 250
    assert first[1] == second[1]
    [row] = rows(db)
    assert first[1] == f"2.0.0 queued as {row.id}".encode()
    assert row.transport["protocol"] == "lmtp"
    assert row.transport["helo"] == "mx.hanoi.gov.vn"
    assert row.transport["rcpt_to"] == [HUB_ADDRESS, other]


def test_lmtp_refusals_are_also_given_per_recipient(serve: Any, db: Database) -> None:
    other = "hub2@exchange.hanoi.gov.vn"
    server = serve(lmtp=True, hub_addresses=[HUB_ADDRESS, other])
    with smtplib.LMTP("127.0.0.1", server.port) as c:
        c.ehlo_or_helo_if_needed()
        envelope(c, (HUB_ADDRESS, other))
        first = c.data(b"y" * 1200 + b"\r\n")  # aiosmtpd's own line-too-long path
        second = c.getreply()
        assert c.noop()[0] == 250
    assert first[0] == second[0] == 500
    assert count(db) == 0


def test_lmtp_over_size_is_refused_once_per_recipient(serve: Any, db: Database) -> None:
    """RFC 2033 §4.2: after DATA, one reply per accepted recipient, refusals included; a client
    that got only one would read the reply to its next command as the second recipient's."""
    other = "hub2@exchange.hanoi.gov.vn"
    server = serve(lmtp=True, hub_addresses=[HUB_ADDRESS, other])
    big = (b"y" * 900 + b"\r\n") * (SMALL.max_message_bytes // 900 + 1)
    with smtplib.LMTP("127.0.0.1", server.port, timeout=10) as c:  # (a missing reply: no hang)
        c.ehlo_or_helo_if_needed()
        envelope(c, (HUB_ADDRESS, other))
        first = c.data(big)
        second = c.getreply()
        assert c.noop() == (250, b"2.0.0 OK")  # nothing left over, nothing missing
    assert first == second
    assert (first[0], first[1].split()[0]) == (552, b"5.3.4")
    assert count(db) == 0


def test_lhlo_advertises_pipelining(serve: Any) -> None:
    """RFC 2033 §5: LMTP servers MUST support PIPELINING (RFC 2920), and so say so."""
    server = serve(lmtp=True)
    with smtplib.LMTP("127.0.0.1", server.port) as c:
        c.ehlo_or_helo_if_needed()
        assert c.has_extn("pipelining")
        assert c.has_extn("enhancedstatuscodes")


def test_lmtp_with_required_tls_is_refused_at_start(db: Database) -> None:
    with pytest.raises(Exception, match="LMTP"):
        listener.start(
            db,
            host="127.0.0.1",
            port=0,
            hub_addresses=[HUB_ADDRESS],
            limits=SMALL,
            tls_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
            require_tls=True,
            lmtp=True,
        )
