"""The relay client's deadline, against a real relay on loopback that drips: it answers each
read well within the timeout, but with one continuation line (``250-x``) at a time, forever.
Every try ends at its deadline as ``retry`` (never ``sent``), whatever step the drip holds up:
the greeting, a command, the final reply to the data, after STARTTLS or over implicit TLS."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from formats.errors import ConfigError
from gateway.relay import DEADLINE_TIMEOUTS, Attempt, Relay, RelaySession, _Watchdog
from keys.issuing import make_root
from tests.test_relay import FROM, MESSAGE, TO, _server_context

#: The client's read timeout and deadline; the relay drips a line every DRIP seconds, well
#: within the timeout.
TIMEOUT, DEADLINE, DRIP = 0.5, 1.0, 0.1
#: A call still running after this long is taken as hung (without a deadline it never ends).
HUNG = DEADLINE + TIMEOUT + 30.0


class Dripper:
    """A relay that answers as a relay does, except to ``drip_at`` (a command verb, ``GREETING``
    or ``.`` for the end of the data): there it sends ``<code>-x`` every DRIP seconds until the
    client goes or the test ends. ``starttls``: offers STARTTLS with this server context;
    ``implicit``: TLS from the first byte."""

    def __init__(
        self,
        drip_at: str,
        *,
        starttls: ssl.SSLContext | None = None,
        implicit: ssl.SSLContext | None = None,
    ) -> None:
        self.drip_at = drip_at.encode()
        self.starttls, self.implicit = starttls, implicit
        self.stop = threading.Event()
        self.dripped = threading.Event()
        self.commands: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            talk = _Talk(conn)
            # OSError: the client shut the connection down, as it should.
            with contextlib.suppress(OSError):
                if self.implicit is not None:
                    talk.secure(self.implicit)
                self._talk(talk)
            talk.close()

    def _talk(self, talk: _Talk) -> None:
        if self._reply(talk.conn, b"GREETING", b"220", b"220 relay.test ESMTP"):
            return
        while line := talk.lines.readline():
            verb = line.split()[0].upper() if line.split() else b""
            self.commands.append(verb)
            if verb == b"DATA":
                talk.conn.sendall(b"354 go ahead\r\n")
                while talk.lines.readline() not in (b".\r\n", b""):
                    pass
                verb, answer = b".", b"250 2.0.0 queued"
            elif verb in (b"EHLO", b"HELO"):
                answer = b"250-relay.test\r\n250 STARTTLS" if self.starttls else b"250 relay.test"
            elif verb == b"STARTTLS" and self.starttls is not None:
                talk.conn.sendall(b"220 2.0.0 go ahead\r\n")
                talk.secure(self.starttls)
                continue
            elif verb == b"QUIT":
                answer = b"221 bye"
            else:
                answer = b"250 ok"
            if self._reply(talk.conn, verb, answer[:3], answer) or verb == b"QUIT":
                return

    def _reply(self, conn: socket.socket, verb: bytes, code: bytes, answer: bytes) -> bool:
        """Answer, or drip (then True: the conversation is over)."""
        if verb != self.drip_at:
            conn.sendall(answer + b"\r\n")
            return False
        self.dripped.set()
        while not self.stop.wait(DRIP):
            conn.sendall(code + b"-x\r\n")
        return True


class _Talk:
    """One connection of the relay: its socket (TLS once secured) and the lines read from it."""

    def __init__(self, conn: socket.socket) -> None:
        self.plain = self.conn = conn
        self.lines = conn.makefile("rb")

    def secure(self, context: ssl.SSLContext) -> None:
        self.lines.close()
        self.conn = context.wrap_socket(self.conn, server_side=True)
        self.lines = self.conn.makefile("rb")

    def close(self) -> None:
        self.lines.close()
        self.conn.close()
        self.plain.close()


Start = Callable[..., Dripper]


@pytest.fixture
def dripper() -> Iterator[Start]:
    """``dripper(drip_at, **options) -> Dripper``; every one is stopped afterwards."""
    started: list[Dripper] = []

    def start(drip_at: str, **options: ssl.SSLContext) -> Dripper:
        started.append(Dripper(drip_at, **options))
        return started[-1]

    yield start
    for server in started:
        server.close()


def relay(port: int, **options: Any) -> Relay:
    options.setdefault("security", "none")
    return Relay(
        "127.0.0.1", port, helo="gateway.test", timeout=TIMEOUT, deadline=DEADLINE, **options
    )


def ended(server: Dripper, call: Callable[[], Attempt]) -> Attempt:
    """``call()`` in a thread; a call still running after HUNG seconds fails the test (the
    relay then stops dripping, so that the thread ends)."""
    out: list[Attempt] = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(HUNG)
    if worker.is_alive():
        server.stop.set()
        worker.join(5)
        pytest.fail(f"the relay client was still talking to a dripping relay after {HUNG} s")
    return out[0]


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for 127.0.0.1, client context trusting it)."""
    tmp: Path = tmp_path_factory.mktemp("deadline-tls")
    root = make_root(
        "Deadline test root", at=datetime.now(UTC) - timedelta(days=2), key_kind="ec-p256"
    )
    (tmp / "root.pem").write_bytes(root.cert_pem())
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    client = ssl.create_default_context()
    client.load_verify_locations(cafile=str(tmp / "root.pem"))
    return _server_context(tmp, root, "127.0.0.1", loopback), client


@pytest.mark.parametrize("drip_at", ["GREETING", "EHLO", "MAIL", "RCPT", "."])
def test_a_dripping_relay_is_retried_at_the_deadline(dripper: Start, drip_at: str) -> None:
    """``.``: the data was sent, but no final reply came: ``retry`` (at least once), not
    ``sent``."""
    server = dripper(drip_at)
    session = RelaySession(relay(server.port))
    attempt = ended(server, lambda: session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO]))
    session.close()
    assert server.dripped.is_set()
    assert attempt.outcome == "retry"
    assert attempt.reply == f"127.0.0.1:{server.port} did not finish within the 1 s deadline"


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_the_deadline_holds_over_tls(
    dripper: Start,
    server_tls: tuple[ssl.SSLContext, ssl.SSLContext],
    security: str,
) -> None:
    """STARTTLS replaces the socket halfway; implicit TLS wraps it before the greeting."""
    context, client = server_tls
    server = dripper("MAIL", **{"starttls" if security == "starttls" else "implicit": context})
    r = relay(server.port, security=security, ssl_context=client)
    session = RelaySession(r)
    attempt = ended(server, lambda: session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO]))
    session.close()
    assert (b"STARTTLS" in server.commands) == (security == "starttls")
    assert attempt.outcome == "retry"
    assert "deadline" in attempt.reply


def test_each_message_of_a_session_has_a_deadline_of_its_own(dripper: Start) -> None:
    """The first message is sent; the second meets a drip at RSET: ``retry`` at the deadline,
    and not tried again on a new connection (that is for a relay that hung up)."""
    server = dripper("RSET")
    session = RelaySession(relay(server.port))
    first = session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO])
    second = ended(server, lambda: session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO]))
    session.close()
    assert first.outcome == "sent"
    assert second.outcome == "retry"
    assert "deadline" in second.reply
    assert server.commands.count(b"EHLO") == 1  # one connection


def test_quit_is_bounded_too(dripper: Start) -> None:
    server = dripper("QUIT")
    session = RelaySession(relay(server.port))
    assert session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
    ended(server, lambda: session.close() or Attempt("sent", "closed"))
    assert server.dripped.is_set()


def test_the_default_deadline_is_some_read_timeouts() -> None:
    assert Relay("127.0.0.1", 25, security="none", timeout=60).deadline == 60 * DEADLINE_TIMEOUTS
    assert Relay("127.0.0.1", 25, security="none", deadline=5).deadline == 5
    with pytest.raises(ConfigError, match="deadline = -1"):
        Relay("127.0.0.1", 25, security="none", deadline=-1)


def test_the_tries_of_a_session_share_one_deadline_thread(
    dripper: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thirty messages over one connection start no thread each: the deadlines of the whole
    process are kept by one thread, started once."""
    server = dripper("VRFY")  # never sent: a relay that takes every message
    started: list[str] = []
    start = threading.Thread.start

    def counted(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counted)
    session = RelaySession(relay(server.port))
    outcomes = {session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO]).outcome for _ in range(30)}
    session.close()
    assert outcomes == {"sent"}
    assert len(started) <= 1, started


def test_the_deadline_thread_runs_what_is_due_and_forgets_what_was_cancelled() -> None:
    watchdog = _Watchdog()
    ran: list[str] = []
    done = threading.Event()
    watchdog.cancel(watchdog.arm(0.05, lambda: ran.append("cancelled")))
    watchdog.arm(0.1, lambda: (ran.append("due"), done.set()))
    assert done.wait(5)
    assert ran == ["due"]  # the cancelled one was due first, and did not run
    for _ in range(1000):  # a busy sender: every try ends well before its deadline
        watchdog.cancel(watchdog.arm(600, lambda: ran.append("never")))
    assert watchdog.waiting() <= 2 * _Watchdog.PURGE
