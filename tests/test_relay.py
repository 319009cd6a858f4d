"""The outbound relay client against a real aiosmtpd server on loopback: replies per recipient
and at DATA, STARTTLS and implicit TLS with certificates made here, AUTH, broken connections,
sessions (several messages over one connection, a connection the relay drops while idle)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as Server
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from formats.errors import ConfigError
from gateway.relay import Attempt, Relay, RelaySession, deliver
from gateway.settings import HubSettings, RelaySettings, Settings
from keys.issuing import Issued, generate_key, make_root

FROM = "hub@exchange.hanoi.gov.vn"
TO = "vanthu@snv.hanoi.gov.vn"
MESSAGE = (
    b"From: hub@exchange.hanoi.gov.vn\r\nTo: vanthu@snv.hanoi.gov.vn\r\n"
    b"Message-ID: <r1@exchange.hanoi.gov.vn>\r\nSubject: relay test\r\n\r\n"
    b".a line that starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n"
)
#: A login the test relay accepts; the server is told to ignore aiosmtpd's own deprecation.
USER, PASSWORD = "gateway", "correct horse"
AUTH_OK = pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")
QUEUED = "250 2.0.0 Ok: queued as 4242"


# --- the peer: aiosmtpd acting as the relay ----------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    tls: str | None
    login: bytes | None
    #: The client's address and port: one per connection.
    peer: Any = None


class Peer:
    """aiosmtpd handler: records every message and answers as told (per recipient, at DATA,
    RSET); ``then_close`` closes the connection after a message (saying that reply first, if
    any) and sets ``closed``."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.mail_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply = QUEUED
        self.rset_reply = "250 2.0.0 Ok"
        self.then_close: str | None = None
        self.closed = threading.Event()
        self.quits = 0

    def connections(self) -> int:
        """How many connections carried the messages received."""
        return len({got.peer for got in self.received})

    async def handle_RSET(self, server: Server, session: Session, envelope: Envelope) -> str:
        return self.rset_reply

    async def handle_QUIT(self, server: Server, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 2.0.0 Bye"

    async def handle_MAIL(
        self, server: Server, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from, envelope.mail_options = address, list(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Server, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address, "250 2.1.5 Ok")
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        assert server.transport is not None
        tls = server.transport.get_extra_info("ssl_object")
        auth = session.auth_data
        assert isinstance(envelope.content, bytes)
        self.received.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                envelope.content,
                list(envelope.mail_options),
                tls.version() if tls else None,
                auth.login if isinstance(auth, LoginPassword) else None,
                session.peer,
            )
        )
        if self.then_close is not None:  # after the reply to DATA has gone out
            asyncio.get_running_loop().call_later(0.01, self._close, server, self.then_close)
        return self.data_reply

    def _close(self, server: Server, reply: str) -> None:
        transport = server.transport
        if isinstance(transport, asyncio.WriteTransport):
            if reply:
                transport.write(f"{reply}\r\n".encode())
            transport.close()
        asyncio.get_running_loop().call_soon(self.closed.set)  # once the socket is closed


class LoopbackController(Controller):
    """aiosmtpd's Controller on 127.0.0.1 and a port the system picks (``port=0``)."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def authenticator(
    server: Server, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False, auth_data=data)


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(**aiosmtpd_options) -> (peer, port)``; every server is stopped afterwards."""
    running: list[Controller] = []

    def _start(**options: Any) -> tuple[Peer, int]:
        peer = Peer()
        controller = LoopbackController(peer, hostname="127.0.0.1", port=0, **options)
        controller.start()
        running.append(controller)
        return peer, controller.port

    yield _start
    for controller in running:
        controller.stop()


def relay(port: int, **options: Any) -> Relay:
    options.setdefault("security", "none")
    options.setdefault("timeout", 10.0)
    return Relay("127.0.0.1", port, helo="gateway.test", **options)


def send(
    port: int, message: bytes = MESSAGE, rcpt: list[str] | None = None, **options: Any
) -> Attempt:
    return deliver(relay(port, **options), message, mail_from=FROM, rcpt_to=rcpt or [TO])


# --- TLS material, made here (TLS checks validity against the real clock) ---------------------


@dataclass(frozen=True)
class Tls:
    root: Path  # the CA file the client trusts
    server: ssl.SSLContext  # certificate for 127.0.0.1
    wrong_name: ssl.SSLContext  # same CA, certificate for relay.example only


def _server_context(tmp: Path, root: Issued, name: str, *sans: x509.GeneralName) -> ssl.SSLContext:
    now = datetime.now(UTC)
    key = generate_key("ec-p256")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    path = tmp / f"{name}.pem"
    path.write_bytes(Issued(cert, key).cert_pem() + Issued(cert, key).key_pem())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(path)
    return context


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    tmp = tmp_path_factory.mktemp("relay-tls")
    root = make_root(
        "Relay test root", at=datetime.now(UTC) - timedelta(days=2), key_kind="ec-p256"
    )
    (tmp / "root.pem").write_bytes(root.cert_pem())
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    return Tls(
        tmp / "root.pem",
        _server_context(tmp, root, "127.0.0.1", loopback),
        _server_context(tmp, root, "relay.example", x509.DNSName("relay.example")),
    )


def trusting(tls: Tls) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(tls.root))
    return context


# --- plain delivery and the reply table --------------------------------------------------------


def test_bytes_arrive_unchanged(serve: Any) -> None:
    peer, port = serve()
    attempt = send(port)
    assert (attempt.outcome, attempt.reply, attempt.refused) == ("sent", QUEUED, {})
    [got] = peer.received
    assert got.content == MESSAGE  # dot-stuffed on the wire, unstuffed by the peer
    assert (got.mail_from, got.rcpt_tos, got.tls) == (FROM, [TO], None)
    assert got.mail_options == [f"SIZE={len(MESSAGE)}"]

    eight_bit = MESSAGE.replace(b"last line", "dòng cuối".encode())
    assert send(port, eight_bit).outcome == "sent"
    assert peer.received[1].content == eight_bit
    assert "BODY=8BITMIME" in peer.received[1].mail_options


OTHER = "pa08@congan.hanoi.gov.vn"
BUSY, UNKNOWN = "451 4.2.0 busy", "550 5.1.1 no such user"
REPLIES = {
    # case: (MAIL reply, {recipient: RCPT reply}, DATA reply, outcome, reply, refused)
    "mail-451": ("451 4.3.0 try later", {}, None, "retry", "451 4.3.0 try later", {}),
    "mail-553": ("553 5.7.1 not yours", {}, None, "failed", "553 5.7.1 not yours", {}),
    "mail-251": ("251 2.1.0 odd", {}, None, "retry", "251 2.1.0 odd", {}),  # not MAIL's 250
    "rcpt-451": (None, {TO: BUSY, OTHER: BUSY}, None, "retry", BUSY, "all"),
    "rcpt-550": (None, {TO: UNKNOWN, OTHER: UNKNOWN}, None, "failed", UNKNOWN, "all"),
    "rcpt-550+451": (None, {TO: UNKNOWN, OTHER: BUSY}, None, "retry", UNKNOWN, "all"),
    "rcpt-550+250": (None, {TO: UNKNOWN}, None, "sent", QUEUED, "all"),
    "data-451": (None, {}, "451 4.3.0 disk full", "retry", "451 4.3.0 disk full", {}),
    "data-554": (None, {}, "554 5.6.0 refused", "failed", "554 5.6.0 refused", {}),
}


@pytest.mark.parametrize("case", list(REPLIES))
def test_reply_codes_decide_the_outcome(serve: Any, case: str) -> None:
    mail, rcpt, data, outcome, reply, refused = REPLIES[case]
    peer, port = serve()
    peer.mail_reply, peer.rcpt_replies = mail, dict(rcpt)
    peer.data_reply = data or peer.data_reply
    attempt = send(port, rcpt=[TO, OTHER])
    assert (attempt.outcome, attempt.reply) == (outcome, reply)
    assert attempt.refused == (rcpt if refused == "all" else refused)
    delivered = outcome == "sent" or case.startswith("data")
    assert len(peer.received) == delivered


def test_a_partial_refusal_names_who_is_worth_retrying(serve: Any) -> None:
    peer, port = serve()
    peer.rcpt_replies = {TO: "452 4.2.2 mailbox full"}
    attempt = send(port, rcpt=[TO, OTHER])
    assert attempt.outcome == "sent"
    assert attempt.temporarily_refused == (TO,)
    assert peer.received[0].rcpt_tos == [OTHER]


# --- TLS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("security", ["starttls", "require-starttls", "tls"])
def test_tls_with_a_verified_certificate(serve: Any, tls: Tls, security: str) -> None:
    option = "ssl_context" if security == "tls" else "tls_context"  # implicit TLS, or STARTTLS
    peer, port = serve(**{option: tls.server})
    assert send(port, security=security, ssl_context=trusting(tls)).outcome == "sent"
    assert peer.received[0].tls in ("TLSv1.2", "TLSv1.3")
    assert peer.received[0].content == MESSAGE


@pytest.mark.parametrize(
    ("trust", "server", "problem"),
    [
        ("system", "server", "unable to get local issuer certificate"),
        ("ours", "wrong_name", "IP address mismatch"),
    ],
)
def test_an_unverified_server_gets_nothing(
    serve: Any, tls: Tls, trust: str, server: str, problem: str
) -> None:
    peer, port = serve(tls_context=getattr(tls, server))
    attempt = send(
        port, security="starttls", ssl_context=trusting(tls) if trust == "ours" else None
    )
    assert attempt.outcome == "retry"
    assert attempt.reply.startswith(f"TLS with 127.0.0.1:{port} failed")
    assert problem in attempt.reply
    assert peer.received == []


def test_require_starttls_without_starttls_is_retried_not_sent_in_clear(serve: Any) -> None:
    peer, port = serve()
    attempt = send(port, security="require-starttls")
    assert attempt.outcome == "retry"
    assert "does not offer STARTTLS" in attempt.reply
    assert peer.received == []
    # "starttls" is opportunistic: the same server gets the message in clear.
    assert send(port, security="starttls").outcome == "sent"
    assert peer.received[0].tls is None


def test_security_none_never_starts_tls(serve: Any, tls: Tls) -> None:
    peer, port = serve(tls_context=tls.server)
    assert send(port).outcome == "sent"
    assert peer.received[0].tls is None


# --- AUTH ---------------------------------------------------------------------------------------


@AUTH_OK
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_over_starttls(serve: Any, tls: Tls, tmp_path: Path, mechanism: str) -> None:
    """Through from_settings: password file relative to the home, ca_file trusted."""
    other = {"PLAIN": ["LOGIN"], "LOGIN": ["PLAIN"]}[mechanism]
    peer, port = serve(
        tls_context=tls.server, authenticator=authenticator, auth_exclude_mechanism=other
    )
    (tmp_path / "relay-password").write_text(PASSWORD + "\n")
    settings = Settings(
        home=tmp_path,
        hub=HubSettings(address=FROM),
        relay=RelaySettings(
            host="127.0.0.1",
            port=port,
            security="require-starttls",
            username=USER,
            password_file=Path("relay-password"),
            ca_file=tls.root,
            timeout=10.0,
        ),
    )
    r = Relay.from_settings(settings)
    assert PASSWORD not in repr(r)
    assert r.helo == "exchange.hanoi.gov.vn"
    attempt = deliver(r, MESSAGE, mail_from=FROM, rcpt_to=[TO])
    assert attempt.outcome == "sent", attempt.reply
    assert peer.received[0].login == USER.encode()


def test_a_refused_login_is_retried(serve: Any, tls: Tls) -> None:
    peer, port = serve(tls_context=tls.server, authenticator=authenticator)
    attempt = send(
        port, security="starttls", ssl_context=trusting(tls), username=USER, password="wrong"
    )
    assert attempt.outcome == "retry"
    assert attempt.reply == "535 5.7.8 Authentication credentials invalid (in reply to AUTH)"
    assert peer.received == []


def test_no_password_in_clear_when_starttls_is_missing(serve: Any) -> None:
    _, port = serve()
    attempt = send(port, security="starttls", username=USER, password=PASSWORD)
    assert attempt.outcome == "retry"
    assert "not sending the relay password in clear" in attempt.reply


# --- broken connections -------------------------------------------------------------------------


def test_connection_refused_is_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    attempt = send(port)
    assert (attempt.outcome, attempt.reply) == ("retry", f"connection refused by 127.0.0.1:{port}")


@pytest.mark.parametrize("reply", ["250 2.0.0 ok", "221 2.0.0 bye", "500 5.5.1 no"])
def test_a_reply_to_data_other_than_354_means_nothing_was_sent(reply: str) -> None:
    """A relay that answers DATA as if the message had come (it never saw a byte of it) must
    not get the message recorded as sent."""
    seen: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 relay.example ESMTP\r\n")
                for line in lines:
                    seen.append(line.split()[0].upper())
                    verb = seen[-1]
                    conn.sendall(
                        (
                            reply if verb == b"DATA" else "221 bye" if verb == b"QUIT" else "250 ok"
                        ).encode()
                        + b"\r\n"
                    )
                    if verb == b"QUIT":
                        return

        thread = threading.Thread(target=answer)
        thread.start()
        attempt = send(listener.getsockname()[1])
        thread.join(10)
    assert attempt.outcome == ("failed" if reply.startswith("5") else "retry")
    assert attempt.reply == reply
    after = seen[seen.index(b"DATA") + 1 :]
    assert set(after) <= {b"RSET", b"QUIT"}  # and the message was not sent after all


@pytest.mark.parametrize("behaviour", ["silent", "hang-up"])
def test_a_silent_or_vanishing_server_is_retried(behaviour: str) -> None:
    done = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            if behaviour == "silent":
                done.wait(5)
            conn.close()

        thread = threading.Thread(target=answer)
        thread.start()
        attempt = send(listener.getsockname()[1], timeout=0.3)
        done.set()
        thread.join()
    assert attempt.outcome == "retry"
    expected = "did not answer within 0.3 s" if behaviour == "silent" else "closed the connection"
    assert expected in attempt.reply


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relay_settings", "message"),
    [
        (RelaySettings(username="u", password_env="RELAY_TEST_UNSET"), "set $RELAY_TEST_UNSET"),
        (RelaySettings(username="u", password_file=Path("nil")), "cannot read the relay password"),
        (RelaySettings(ca_file=Path("missing.pem")), "ca_file"),
        (RelaySettings(security="none", username="u", password_file=Path("pw")), "in clear"),
        (RelaySettings(timeout=0.0), "timeout"),
    ],
)
def test_configuration_problems_are_one_line(
    tmp_path: Path, relay_settings: RelaySettings, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_TEST_UNSET", raising=False)
    (tmp_path / "pw").write_text("secret")
    with pytest.raises(ConfigError) as caught:
        Relay.from_settings(Settings(home=tmp_path, relay=relay_settings))
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_bare_line_feeds_are_a_callers_error() -> None:
    with pytest.raises(ValueError, match="bare CR or LF"):
        send(25, b"Subject: x\n\nbody\n")


@pytest.mark.parametrize(
    "message",
    [
        b"Subject: x\r\n\r\nbody\n",
        b"Subject: x\r\n\r\nbo\rdy\r\n",
        b"Subject: x\r\n\r\nbody\r\r\n",
        b"Subject: x\r\n\n\r\nbody\r\n",
        b"Subject: x\r\n\r\nbody\n\r",
        b"\r",
    ],
)
def test_a_bare_cr_or_lf_anywhere_is_a_callers_error_in_a_session(
    serve: Any, message: bytes
) -> None:
    peer, port = serve()
    with RelaySession(relay(port)) as session:
        assert session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
        with pytest.raises(ValueError, match="bare CR or LF"):
            session.deliver(message, mail_from=FROM, rcpt_to=[TO])
        assert session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
    assert [got.content for got in peer.received] == [MESSAGE, MESSAGE]
    with pytest.raises(ValueError, match="at least one recipient"):
        RelaySession(relay(port)).deliver(MESSAGE, mail_from=FROM, rcpt_to=[])


# --- sessions: one connection for a batch -------------------------------------------------------


def numbered(i: int) -> bytes:
    return MESSAGE.replace(b"<r1@", f"<r{i}@".encode())


def test_a_session_sends_several_messages_over_one_connection(serve: Any) -> None:
    peer, port = serve()
    peer.rcpt_replies = {OTHER: UNKNOWN}
    with RelaySession(relay(port)) as session:
        attempts = [
            session.deliver(numbered(i), mail_from=FROM, rcpt_to=[OTHER if i == 2 else TO])
            for i in range(6)
        ]
        assert peer.quits == 0
    assert [a.outcome for a in attempts] == ["sent", "sent", "failed", "sent", "sent", "sent"]
    assert attempts[2].reply == UNKNOWN  # refused; RSET, and the next one goes through
    assert [got.content for got in peer.received] == [numbered(i) for i in (0, 1, 3, 4, 5)]
    assert all(got.rcpt_tos == [TO] for got in peer.received)
    assert peer.connections() == 1
    assert peer.quits == 1  # closed with the batch


def test_dots_and_a_missing_final_crlf(serve: Any) -> None:
    peer, port = serve()
    message = b".starts with a dot\r\n.\r\n..\r\n\r\n.end\r\nno final CRLF."
    with RelaySession(relay(port)) as session:
        for body in (message, b"", b"."):
            assert session.deliver(body, mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
    assert [got.content for got in peer.received] == [message + b"\r\n", b"\r\n", b".\r\n"]


@AUTH_OK
def test_a_session_over_starttls_with_auth_logs_in_once(serve: Any, tls: Tls) -> None:
    peer, port = serve(tls_context=tls.server, authenticator=authenticator)
    r = relay(port, security="require-starttls", ssl_context=trusting(tls))
    r = Relay(r.host, r.port, r.security, USER, PASSWORD, 10.0, r.ssl_context, r.helo)
    with RelaySession(r) as session:
        for i in range(3):
            attempt = session.deliver(numbered(i), mail_from=FROM, rcpt_to=[TO])
            assert attempt.outcome == "sent", attempt.reply
    assert [got.content for got in peer.received] == [numbered(i) for i in range(3)]
    assert {(got.tls is not None, got.login) for got in peer.received} == {(True, USER.encode())}
    assert peer.connections() == 1


@pytest.mark.parametrize("how", ["hang-up", "421-and-hang-up", "421-to-RSET"])
def test_a_connection_dropped_while_idle_is_opened_again(serve: Any, how: str) -> None:
    peer, port = serve()
    with RelaySession(relay(port)) as session:
        if how != "421-to-RSET":
            peer.then_close = "421 4.4.2 idle too long" if how.startswith("421") else ""
        assert session.deliver(numbered(1), mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
        if how == "421-to-RSET":
            peer.rset_reply = "421 4.4.2 idle too long"  # a new connection has no RSET first
        else:
            assert peer.closed.wait(5)
            peer.then_close = None
        attempt = session.deliver(numbered(2), mail_from=FROM, rcpt_to=[TO])
        assert (attempt.outcome, attempt.reply) == ("sent", QUEUED)
        peer.rset_reply = "250 2.0.0 Ok"
        assert session.deliver(numbered(3), mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
    assert [got.content for got in peer.received] == [numbered(i) for i in (1, 2, 3)]
    assert peer.connections() == 2


def test_a_421_is_tried_once_more_on_a_new_connection_then_reported(serve: Any) -> None:
    peer, port = serve()
    with RelaySession(relay(port)) as session:
        assert session.deliver(numbered(1), mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
        peer.mail_reply = "421 4.3.2 shutting down"  # on the open connection and a new one
        attempt = session.deliver(numbered(2), mail_from=FROM, rcpt_to=[TO])
        assert (attempt.outcome, attempt.reply) == ("retry", "421 4.3.2 shutting down")
        peer.mail_reply = None
        assert session.deliver(numbered(3), mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
    assert [got.content for got in peer.received] == [numbered(1), numbered(3)]
    # a new connection that meets a 421 is not tried again: one-shot deliver reports it
    peer.mail_reply = "421 4.3.2 shutting down"
    assert send(port).reply == "421 4.3.2 shutting down"


def test_a_421_after_the_data_is_reported_not_sent_again(serve: Any) -> None:
    peer, port = serve()
    with RelaySession(relay(port)) as session:
        assert session.deliver(numbered(1), mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
        peer.data_reply = "421 4.3.0 closing"  # the peer has the data: at-least-once, not twice
        attempt = session.deliver(numbered(2), mail_from=FROM, rcpt_to=[TO])
        assert (attempt.outcome, attempt.reply) == ("retry", "421 4.3.0 closing")
        peer.data_reply = QUEUED
        assert session.deliver(numbered(3), mail_from=FROM, rcpt_to=[TO]).outcome == "sent"
    assert [got.content for got in peer.received] == [numbered(i) for i in (1, 2, 3)]
    assert len({got.peer for got in peer.received[1:]}) == 2  # a new connection after the 421


def test_a_session_whose_relay_is_down_reports_each_message(serve: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with RelaySession(relay(port)) as session:
        for _ in range(2):
            attempt = session.deliver(MESSAGE, mail_from=FROM, rcpt_to=[TO])
            assert attempt == Attempt("retry", f"connection refused by 127.0.0.1:{port}")
