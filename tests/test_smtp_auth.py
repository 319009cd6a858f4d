"""SMTP AUTH for direct submitters: only over STARTTLS, only for their own address."""

from __future__ import annotations

import base64
import json
import logging
import queue
import smtplib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from archive import tables as t
from archive.db import Database
from formats.limits import Limits
from gateway import smtp as listener
from gateway import submitters
from gateway.cli import cli
from gateway.demo import HUB_ADDRESS
from gateway.submitters import (
    FREE_FAILURES,
    Authenticator,
    Throttle,
    check_password,
    hash_password,
    read_file,
)

SNV = "vanthu@snv.hanoi.gov.vn"
PASSWORD = "correct horse battery staple"
MESSAGE = (
    f"From: {SNV}\r\nTo: {HUB_ADDRESS}\r\nMessage-ID: <auth@snv>\r\nSubject: x\r\n\r\nbody\r\n"
).encode()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(f"sqlite:///{tmp_path}/a.db")
    yield database
    database.dispose()


@pytest.fixture
def start(db: Database, tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[object]:
    started: list[listener.Listener] = []

    def _start(**options: object) -> listener.Listener:
        server = listener.start(
            db, host="127.0.0.1", port=0, hub_addresses=[HUB_ADDRESS], limits=Limits(),
            tls_context=tls[0], **options,  # type: ignore[arg-type]
        )  # fmt: skip
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


def _client(server: listener.Listener, tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.port, timeout=30)
    c.ehlo("snv.hanoi.gov.vn")
    return c


def test_auth_is_offered_only_after_starttls_and_lets_an_agency_submit_as_itself(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], db: Database
) -> None:
    server = start(authenticator=Authenticator({SNV: hash_password(PASSWORD)}))  # type: ignore[operator]
    with _client(server, tls) as c:
        assert not c.has_extn("auth")  # never a password in clear
        c.starttls(context=tls[1])
        c.ehlo("snv.hanoi.gov.vn")
        assert "PLAIN" in c.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            c.login(SNV, "wrong password")
        assert refused.value.smtp_code == 535
        assert c.login(SNV, PASSWORD)[0] == 235
        code, text = c.mail("vanthu@stp.hanoi.gov.vn")  # another agency's address
        assert (code, text.split()[0]) == (553, b"5.7.1")
        assert c.mail(SNV)[0] == 250
        assert c.rcpt(HUB_ADDRESS)[0] == 250
        assert c.data(MESSAGE)[0] == 250
    with db.session(read_only=True) as s:
        [row] = s.scalars(select(t.Intake)).all()
        assert row.transport["auth"] == SNV


def test_required_auth_refuses_mail_before_login(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], db: Database
) -> None:
    server = start(authenticator=Authenticator({SNV: hash_password(PASSWORD)}), require_auth=True)  # type: ignore[operator]
    with _client(server, tls) as c:
        c.starttls(context=tls[1])
        c.ehlo("snv.hanoi.gov.vn")
        code, _ = c.mail(SNV)
        assert code == 530
    with db.session(read_only=True) as s:
        assert s.scalars(select(t.Intake)).all() == []


def test_without_submitters_no_auth_is_offered(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server = start()  # type: ignore[operator]
    with _client(server, tls) as c:
        c.starttls(context=tls[1])
        c.ehlo("snv.hanoi.gov.vn")
        assert not c.has_extn("auth")


def test_submitters_cli_keeps_salted_scrypt_hashes_in_a_private_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "gateway.toml").write_text("")  # a home (the CLI refuses a bare directory)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    runner = CliRunner()
    done = runner.invoke(
        cli,
        [
            "--home",
            str(home),
            "submitters",
            "set",
            SNV.upper(),
            "--password-file",
            str(tmp_path / "pw"),
        ],
    )
    assert done.exit_code == 0, done.output
    path = home / "keys/submitters"
    assert path.stat().st_mode & 0o077 == 0
    entries = read_file(path)
    assert list(entries) == [SNV]
    assert PASSWORD not in path.read_text()
    assert check_password(entries[SNV], PASSWORD) and not check_password(entries[SNV], "x")
    listed = runner.invoke(cli, ["--home", str(home), "submitters", "list", "--json"])
    assert json.loads(listed.output)["submitters"] == [SNV]
    (tmp_path / "short").write_text("short\n")
    weak = runner.invoke(
        cli,
        ["--home", str(home), "submitters", "set", SNV, "--password-file", str(tmp_path / "short")],
    )
    assert weak.exit_code == 2 and "12 characters" in weak.output
    gone = runner.invoke(cli, ["--home", str(home), "submitters", "remove", SNV])
    assert gone.exit_code == 0 and read_file(path) == {}
    again = runner.invoke(cli, ["--home", str(home), "submitters", "remove", SNV])
    assert again.exit_code == 2


# --- the password check is off the event loop -------------------------------------------------


@pytest.fixture
def held_check(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """``(started, release)``: every scrypt check waits for ``release`` once it has begun."""
    started, release = threading.Event(), threading.Event()
    real = submitters.check_password

    def held(stored: str, password: str) -> bool:
        started.set()
        release.wait(30)
        return real(stored, password)

    monkeypatch.setattr(submitters, "check_password", held)
    yield started, release
    release.set()


def _plain(login: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def _in_thread(work: Any) -> tuple[threading.Event, list[Any]]:
    done, out = threading.Event(), []
    threading.Thread(target=lambda: (out.append(work()), done.set()), daemon=True).start()
    return done, out


def test_other_sessions_are_served_while_a_password_is_checked(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], held_check: Any
) -> None:
    """scrypt (~40 ms a check) on the event loop would hold up every session: a few wrong
    passwords would stall the listener, 250s of committed messages included."""
    started, release = held_check
    server = start(authenticator=Authenticator({SNV: hash_password(PASSWORD)}))  # type: ignore[operator]
    with _client(server, tls) as c, _client(server, tls) as other:
        c.starttls(context=tls[1])
        c.ehlo("snv.hanoi.gov.vn")
        login, result = _in_thread(lambda: c.docmd("AUTH", _plain(SNV, PASSWORD)))
        assert started.wait(10)
        served, _ = _in_thread(other.noop)
        assert served.wait(10)  # answered while the check is still under way
        assert not login.is_set()
        release.set()
        assert login.wait(10)
        assert result[0][0] == 235


def test_an_unknown_login_is_answered_after_a_password_check_as_a_wrong_password_is(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], held_check: Any
) -> None:
    """Answered at once, an unknown login would tell by the time of the 535 which addresses
    may submit (a wrong password costs a ~40 ms scrypt check)."""
    started, release = held_check
    server = start(authenticator=Authenticator({SNV: hash_password(PASSWORD)}))  # type: ignore[operator]
    with _client(server, tls) as c:
        c.starttls(context=tls[1])
        c.ehlo("snv.hanoi.gov.vn")
        for login in ("nobody@snv.hanoi.gov.vn", SNV):
            started.clear()
            release.clear()
            answered, result = _in_thread(
                lambda login=login: c.docmd("AUTH", _plain(login, "wrong password"))
            )
            assert started.wait(10), login  # a check runs for it
            release.set()
            assert answered.wait(10)
            assert result[0][0] == 535
        # The check an unknown login gets never lets it in, whatever its password.
        assert c.docmd("AUTH", _plain("nobody@snv.hanoi.gov.vn", PASSWORD))[0] == 535


def test_password_checks_beyond_the_bound_get_454_at_once(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], held_check: Any
) -> None:
    """One check running and one waiting at most here: a third is refused, not queued."""
    started, release = held_check
    auth = Authenticator({SNV: hash_password(PASSWORD)}, threads=1, max_waiting=1)
    server = start(authenticator=auth)  # type: ignore[operator]
    clients = [_client(server, tls) for _ in range(3)]
    try:
        for c in clients:
            c.starttls(context=tls[1])
            c.ehlo("snv.hanoi.gov.vn")
        first = _in_thread(lambda: clients[0].docmd("AUTH", _plain(SNV, "wrong password")))
        assert started.wait(10)
        answers: queue.Queue[tuple[int, bytes]] = queue.Queue()
        for c in clients[1:]:
            threading.Thread(
                target=lambda c=c: answers.put(c.docmd("AUTH", _plain(SNV, PASSWORD))), daemon=True
            ).start()
        code, text = answers.get(timeout=10)  # one waits for a thread, the other is refused
        assert (code, text.split()[0]) == (454, b"4.7.0")
        release.set()
        assert answers.get(timeout=10)[0] == 235  # the waiting one, checked after the first
        assert first[0].wait(10)
        assert first[1][0][0] == 535
    finally:
        for c in clients:
            c.close()


# --- guessing is throttled per address and per login ------------------------------------------


class Clock:
    """Seconds that pass only when a test says so (Throttle's clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tls_client(
    server: listener.Listener, tls: tuple[ssl.SSLContext, ssl.SSLContext], source: str
) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.port, timeout=30, source_address=(source, 0))
    c.ehlo("snv.hanoi.gov.vn")
    c.starttls(context=tls[1])
    c.ehlo("snv.hanoi.gov.vn")
    return c


def _auth(
    server: listener.Listener,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
    login: str,
    password: str,
    source: str = "127.0.0.1",
) -> tuple[int, bytes]:
    """One AUTH PLAIN in a session of its own (reconnecting resets aiosmtpd's 3 a session)."""
    with _tls_client(server, tls, source) as c:
        code, text = c.docmd("AUTH", _plain(login, password))
    return code, text


def test_failed_logins_from_one_address_lock_it_out_across_sessions(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    """Reconnecting reset the 3 AUTHs a session allows: ~57 guesses a second from one address,
    and a 535 left no log line. Failures are counted per address; past the free ones, the
    address is locked out (454 4.7.0, the right password too), for longer at each failure."""
    caplog.set_level(logging.INFO, logger="gateway.smtp")
    clock = Clock()
    other = "vanthu@stp.hanoi.gov.vn"
    auth = Authenticator(
        {SNV: hash_password(PASSWORD), other: hash_password(PASSWORD)},
        throttle=Throttle(free=2, lockout=60, clock=clock),
    )
    server = start(authenticator=auth)  # type: ignore[operator]
    guesses = [_auth(server, tls, SNV, f"guess {n}")[0] for n in range(3)]
    assert guesses == [535, 535, 535]  # the third locks the address out for 60 s
    code, text = _auth(server, tls, other, PASSWORD)  # any login, from that address
    assert (code, text.split()[0]) == (454, b"4.7.0")
    assert _auth(server, tls, other, PASSWORD, source="127.0.0.2")[0] == 235  # not others
    clock.now += 61
    assert _auth(server, tls, other, "guess 3")[0] == 535  # the fourth: 120 s
    clock.now += 61
    assert _auth(server, tls, other, PASSWORD)[0] == 454
    clock.now += 60
    assert _auth(server, tls, other, PASSWORD)[0] == 235
    failed = [r for r in caplog.records if r.getMessage().startswith("SMTP AUTH failed")]
    assert [r.getMessage() for r in failed] == [
        f"SMTP AUTH failed from 127.0.0.1 for {SNV} (1 from this address)",
        f"SMTP AUTH failed from 127.0.0.1 for {SNV} (2 from this address)",
        f"SMTP AUTH failed from 127.0.0.1 for {SNV} (3 from this address; locked out for 60 s)",
        f"SMTP AUTH failed from 127.0.0.1 for {other} (4 from this address; locked out for 120 s)",
    ]
    assert all(r.levelno == logging.WARNING for r in failed)


def test_failed_logins_for_one_login_lock_it_out_but_not_from_where_it_logged_in(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """Guesses spread over many addresses are counted against the login too; the agency's own
    address, from which it has logged in, is not locked out by a guesser elsewhere."""
    auth = Authenticator({SNV: hash_password(PASSWORD)}, throttle=Throttle(free=2))
    server = start(authenticator=auth)  # type: ignore[operator]
    assert _auth(server, tls, SNV, PASSWORD, source="127.0.0.9")[0] == 235  # the agency
    for n in (2, 3, 4):
        assert _auth(server, tls, SNV, "guess", source=f"127.0.0.{n}")[0] == 535
    code, text = _auth(server, tls, SNV, PASSWORD, source="127.0.0.5")  # a new address
    assert (code, text.split()[0]) == (454, b"4.7.0")
    assert _auth(server, tls, SNV, PASSWORD, source="127.0.0.9")[0] == 235


def test_a_login_with_a_hostile_name_is_logged_as_address_characters_only(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.smtp")
    server = start(authenticator=Authenticator({SNV: hash_password(PASSWORD)}))  # type: ignore[operator]
    assert _auth(server, tls, "x\nSMTP AUTH failed from 10.9.9.9 for y", "guess")[0] == 535
    [line] = [r.getMessage() for r in caplog.records if "SMTP AUTH failed" in r.getMessage()]
    assert (
        line
        == "SMTP AUTH failed from 127.0.0.1 for x?smtp?auth?failed?from?10.9.9.9?for?y (1 from this address)"
    )


def test_guesses_checked_at_once_do_not_slip_past_the_lockout(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], held_check: Any
) -> None:
    """Counted only once checked, the guesses of parallel sessions all passed the lockout
    while their checks ran (34 at once may run or wait). Each is counted as it begins."""
    started, release = held_check
    auth = Authenticator({SNV: hash_password(PASSWORD)}, throttle=Throttle(free=2))
    server = start(authenticator=auth)  # type: ignore[operator]
    clients = [_tls_client(server, tls, "127.0.0.1") for _ in range(5)]
    try:
        answers: queue.Queue[int] = queue.Queue()
        for c in clients:
            threading.Thread(
                target=lambda c=c: answers.put(c.docmd("AUTH", _plain(SNV, "guess"))[0]),
                daemon=True,
            ).start()
        assert started.wait(10)
        refused = [answers.get(timeout=10), answers.get(timeout=10)]
        assert refused == [454, 454]  # at once: the third guess under way locked the address
        release.set()
        assert sorted(answers.get(timeout=10) for _ in range(3)) == [535, 535, 535]
    finally:
        for c in clients:
            c.close()


def test_a_good_login_between_guesses_does_not_clear_the_address() -> None:
    """An insider with a login of their own logs in between guesses at other logins: the
    address's failures still add up to a lockout (they were wiped by each success)."""
    clock = [0.0]
    throttle = Throttle(clock=lambda: clock[0])
    address = "192.0.2.7"
    for n in range(FREE_FAILURES + 1):
        throttle.attempt(address, "insider")
        throttle.succeeded(address, "insider", attempted=True)
        throttle.attempt(address, f"victim-{n}")  # a wrong password: not taken back
        clock[0] += 1
    assert throttle.locked(address, "insider") > 0
    assert throttle.locked(address, "victim-99") > 0


def test_a_good_login_after_a_lockout_ran_out_does_not_lock_the_address_again() -> None:
    """Three typos locked the address for 60 s; once that ran out, the right password logs in,
    and the next session's does too: a success takes back its own attempt, the longer
    lockout that attempt had set included."""
    clock = Clock()
    throttle = Throttle(free=2, lockout=60, clock=clock)
    address = "192.0.2.8"
    for _ in range(3):
        throttle.attempt(address, SNV)
    assert throttle.locked(address, SNV) == 60
    clock.now += 61
    throttle.attempt(address, SNV)  # the right password: counted first, then taken back
    throttle.succeeded(address, SNV, attempted=True)
    assert throttle.locked(address, SNV) == 0
    throttle.attempt(address, "someone-else")  # the fourth failure from the address: 120 s
    assert throttle.locked(address, "someone-else") == 120


def test_an_authentication_answer_too_long_for_the_session_is_a_500_not_a_451(
    start: object, tls: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 4954 §4: an AUTH answer line too long is 500 5.5.6, the peer's mistake. It was 451
    (come back later) with an ERROR and a traceback in the log, three times a session."""
    server = start(authenticator=Authenticator({SNV: hash_password(PASSWORD)}))  # type: ignore[operator]
    with caplog.at_level(logging.INFO), _tls_client(server, tls, "127.0.0.1") as c:
        assert c.docmd("AUTH", "LOGIN")[0] == 334
        code, text = c.docmd("A" * 80_000)
        assert (code, text) == (500, b"5.5.6 Authentication Exchange line is too long")
        assert c.docmd("AUTH", "LOGIN")[0] == 334
        # Longer than the stream holds at once: read to its end, none of it taken as commands.
        code, text = c.docmd("A" * 1_000_000)
        assert (code, text) == (500, b"5.5.6 Authentication Exchange line is too long")
        assert c.docmd("NOOP") == (250, b"2.0.0 OK")
        assert c.docmd("AUTH", _plain(SNV, PASSWORD))[0] == 235  # the session goes on
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
