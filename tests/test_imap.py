"""The IMAP intake mode against a real Dovecot (tests/dovecot.py), messages put in by APPEND.

Each test gets its own Dovecot user (an empty INBOX) and its own SQLite archive. Dovecot's
Maildir hierarchy separator is ``.``, so the poller's ``Gateway/Processed`` is
``Gateway.Processed`` on this server.
"""

from __future__ import annotations

import imaplib
import logging
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from imapclient.exceptions import IMAPClientError
from sqlalchemy import select as sql_select

from archive import tables as t
from archive.db import Database
from formats.errors import TransientError
from formats.limits import Limits
from gateway.demo import DemoWorld
from gateway.imap import ImapPoller, PollResult
from gateway.pipeline import Context
from gateway.worker import Worker
from tests import dovecot, servers
from tests.conftest import WORLD_AT
from tests.outbox_world import archive_on

ASSETS = Path(__file__).parent / "assets"
DONE = "Gateway.Processed"
OVERSIZE = "Gateway.Oversize"
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.interop  # a real Dovecot


server = dovecot.module_fixture()


@pytest.fixture
def user(server: dovecot.DovecotServer) -> str:
    return server.add_user()[0]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(f"sqlite:///{tmp_path}/archive.db")
    yield database
    database.engine.dispose()


@pytest.fixture
def imap(server: dovecot.DovecotServer, user: str) -> Iterator[Any]:
    """A second, independent client: puts mail in and looks at the mailboxes afterwards."""
    client = server.client(user)
    yield client
    client.logout()


def _poller(
    db: Database,
    server: dovecot.DovecotServer,
    user: str,
    cls: type[ImapPoller] = ImapPoller,
    **kw: Any,
) -> ImapPoller:
    settings: dict[str, Any] = {
        "host": dovecot.HOST,
        "port": server.port,
        "security": "none",
        "username": user,
        "password": server.password(user),
        "clock": lambda: WORLD_AT,  # the demo world's certificates are checked at receipt time
    }
    return cls(db, **{**settings, **kw})


def _hostile() -> bytes:
    return (ASSETS / "two-from-headers.eml").read_bytes()


def _mailbox(imap: Any, folder: str) -> dict[int, tuple[bytes, tuple[bytes, ...]]]:
    """UID → (bytes, flags) of every message in ``folder``, read without setting \\Seen."""
    imap.select_folder(folder, readonly=True)
    uids = imap.search("ALL")
    data = imap.fetch(uids, ["BODY.PEEK[]", "FLAGS"]) if uids else {}
    return {uid: (d[b"BODY[]"], d[b"FLAGS"]) for uid, d in data.items()}


def _intake(db: Database) -> list[t.Intake]:
    with db.session(read_only=True) as s:
        return list(s.scalars(sql_select(t.Intake).order_by(t.Intake.id)))


def _state(db: Database, key: str) -> tuple[int, int] | None:
    with db.session(read_only=True) as s:
        row = s.get(t.MailboxState, key)
        return None if row is None else (row.uidvalidity, row.last_uid)


def _bodies(db: Database) -> list[bytes]:
    return [row.raw for row in _intake(db)]


# --- one pass ---------------------------------------------------------------------------------


def test_every_message_is_taken_in_once_and_moved_unread(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any, world: DemoWorld
) -> None:
    messages = [world.submission("H26.SNV", number=n) for n in (1, 2)] + [_hostile()]
    for raw in messages:
        imap.append("INBOX", raw)
    uidvalidity = imap.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"]

    poller = _poller(db, server, user)
    assert poller.poll_once() == PollResult(taken=3, moved=3)

    rows = _intake(db)
    assert [r.raw for r in rows] == messages  # the exact bytes, in UID order
    assert [r.source_key for r in rows] == [
        f"imap:{user}@127.0.0.1/INBOX/{uidvalidity}/{uid}" for uid in (1, 2, 3)
    ]
    assert rows[0].transport == {
        "protocol": "imap",
        "received_at": WORLD_AT.isoformat(),
        "peer": "127.0.0.1",
        "helo": None,
        "mail_from": None,
        "rcpt_to": [],
        "tls": None,
        "mailbox": "INBOX",
        "uid": "1",
        "uidvalidity": str(uidvalidity),
    }
    assert _mailbox(imap, "INBOX") == {}
    done = _mailbox(imap, DONE)
    assert [body for body, _ in done.values()] == messages
    assert all(b"\\Seen" not in flags for _, flags in done.values())  # BODY.PEEK only

    assert _state(db, f"{user}@127.0.0.1/INBOX") == (uidvalidity, 3)
    assert poller.poll_once() == PollResult()  # nothing twice
    imap.append("INBOX", messages[0])  # the same bytes again are a new message to IMAP …
    assert poller.poll_once() == PollResult(taken=1, moved=1)  # … the worker's replay keys decide
    assert len(_intake(db)) == 4


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_tls_is_used_and_recorded(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any, security: str
) -> None:
    imap.append("INBOX", _hostile())
    context = ssl.create_default_context(cafile=str(server.ca_file))  # host name 127.0.0.1 checked
    port = server.tls_port if security == "tls" else server.port
    poller = _poller(db, server, user, security=security, port=port, ssl_context=context)
    assert poller.poll_once() == PollResult(taken=1, moved=1)
    (row,) = _intake(db)
    assert re.fullmatch(r"TLSv1\.[23] \S+", row.transport["tls"])


def test_a_server_certificate_that_does_not_verify_is_refused(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    imap.append("INBOX", _hostile())
    # No ssl_context: the system's CAs, which do not know the throw-away CA.
    poller = _poller(db, server, user, security="tls", port=server.tls_port)
    with pytest.raises(ssl.SSLCertVerificationError):
        poller.poll_once()
    assert _bodies(db) == []
    assert len(_mailbox(imap, "INBOX")) == 1


@pytest.mark.parametrize(
    "hidden", [{b"MOVE"}, {b"MOVE", b"UIDPLUS"}], ids=["copy-uid-expunge", "copy-expunge"]
)
def test_servers_without_move_get_copy_and_expunge(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any, hidden: set[bytes]
) -> None:
    class OlderServer(ImapPoller):
        def _capabilities(self, client: Any) -> set[bytes]:
            return super()._capabilities(client) - hidden

    messages = [_hostile(), (ASSETS / "plain-text.eml").read_bytes()]
    for raw in messages:
        imap.append("INBOX", raw)
    assert _poller(db, server, user, OlderServer).poll_once() == PollResult(taken=2, moved=2)
    assert _bodies(db) == messages
    assert _mailbox(imap, "INBOX") == {}
    assert [body for body, _ in _mailbox(imap, DONE).values()] == messages


@pytest.mark.parametrize(
    "hidden", [{b"MOVE"}, {b"MOVE", b"UIDPLUS"}], ids=["copy-uid-expunge", "copy-expunge"]
)
def test_a_crash_between_copy_and_expunge_leaves_one_copy(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any, hidden: set[bytes]
) -> None:
    """Without MOVE, a message taken in is copied to the done mailbox, flagged \\Deleted and
    expunged. A pass that stopped between the copy and the expunge left it flagged in the
    inbox; the next pass copied it again: twice in the done mailbox. It is expunged now."""

    class OlderServer(ImapPoller):
        def _capabilities(self, client: Any) -> set[bytes]:
            return super()._capabilities(client) - hidden

    class StopsBeforeExpunging(OlderServer):
        def _move(self, client: Any, uid: int, mailbox: str) -> bool:
            client.create_folder(self._name(mailbox))
            client.copy([uid], self._name(mailbox))
            client.add_flags([uid], [b"\\Deleted"], silent=True)
            raise Crash  # the process dies here, before the expunge

    raw = _hostile()
    imap.append("INBOX", raw)
    with pytest.raises(Crash):
        _poller(db, server, user, StopsBeforeExpunging).poll_once()
    assert [flags for _, flags in _mailbox(imap, "INBOX").values()] == [(b"\\Deleted",)]
    assert len(_mailbox(imap, DONE)) == 1
    assert _poller(db, server, user, OlderServer).poll_once() == PollResult(
        already_known=1, moved=1
    )
    assert _bodies(db) == [raw]
    assert _mailbox(imap, "INBOX") == {}
    assert [body for body, _ in _mailbox(imap, DONE).values()] == [raw]


def test_an_oversize_message_is_moved_aside_without_being_fetched(
    db: Database,
    server: dovecot.DovecotServer,
    user: str,
    imap: Any,
    world: DemoWorld,
    caplog: pytest.LogCaptureFixture,
) -> None:
    small, big = _hostile(), world.submission("H26.SNV")
    assert len(small) < 5000 < len(big)
    imap.append("INBOX", big)
    imap.append("INBOX", small)
    poller = _poller(db, server, user, limits=Limits(max_message_bytes=5000))
    with caplog.at_level(logging.WARNING, logger="gateway.imap"):
        assert poller.poll_once() == PollResult(taken=1, oversize=1, moved=1)
    assert _bodies(db) == [small]
    assert _mailbox(imap, "INBOX") == {}
    ((body, flags),) = _mailbox(imap, OVERSIZE).values()
    assert body == big
    assert b"\\Seen" not in flags
    assert f"UID 1: {len(big)} bytes, over the 5000-byte limit" in caplog.text
    # Dovecot's own account of the poller's session: only the small message's bytes were sent.
    assert server.body_bytes(user)[0] == len(small)


def test_a_backlog_too_long_for_one_command_line_is_fetched_in_chunks(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``UID FETCH 1,2,3,… (RFC822.SIZE)`` for the whole mailbox is refused (BAD) once it
    is longer than the server takes (Dovecot's imap_max_line_length, 64 KiB: ~11,000 UIDs), on
    every pass: the mailbox would be wedged. Here a server that takes 300 bytes, 120 messages
    (a 372-byte UID set) and chunks of 25 UIDs."""
    monkeypatch.setattr(dovecot, "CONFIG", dovecot.CONFIG + "imap_max_line_length = 300\n")
    short = dovecot.start_or_skip()
    try:
        user, _ = short.add_user()
        messages = [
            b"Message-ID: <%d@snv.example>\r\nSubject: x\r\n\r\nbody\r\n" % n for n in range(120)
        ]
        imap = short.client(user)
        try:
            imap.multiappend("INBOX", messages)
            imap.select_folder("INBOX", readonly=True)
            with pytest.raises(IMAPClientError, match="Too long"):  # what one FETCH would get
                imap.fetch(imap.search("ALL"), ["RFC822.SIZE"])
            poller = _poller(db, short, user, fetch_chunk=25)
            assert poller.poll_once() == PollResult(taken=120, moved=120)
            assert _bodies(db) == messages  # in UID order, across the chunks
            assert _mailbox(imap, "INBOX") == {}
            assert _state(db, f"{user}@127.0.0.1/INBOX")[1] == 120  # type: ignore[index]
        finally:
            imap.logout()
    finally:
        short.stop()


def test_a_backlog_whose_uid_list_is_too_long_for_one_line_is_searched_in_windows(
    db: Database,
    server: dovecot.DovecotServer,
    user: str,
    imap: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``UID SEARCH ALL`` answers with every UID on one line, and imaplib refuses a line over
    its ``_MAXLINE`` (1,000,000 bytes: ~140,000 messages) on every pass: the mailbox would be
    wedged. Here a 700-byte limit, 300 messages (the answer to SEARCH ALL is ~1,100 bytes),
    windows of 40 UIDs, chunks of 15, and UIDs with gaps that do not start at 1."""
    messages = [
        b"Message-ID: <%d@snv.example>\r\nSubject: x\r\n\r\nbody\r\n" % n for n in range(300)
    ]
    imap.multiappend("INBOX", messages)
    imap.select_folder("INBOX")
    gone = [uid for uid in imap.search("ALL") if uid <= 5 or uid % 7 == 0]
    imap.add_flags(gone, [b"\\Deleted"], silent=True)
    imap.expunge()
    kept = [m for uid, m in enumerate(messages, 1) if uid not in gone]
    monkeypatch.setattr(imaplib, "_MAXLINE", 700)
    probe = server.client(user)  # what one SEARCH ALL gets (and the connection is lost)
    probe.select_folder("INBOX", readonly=True)
    with pytest.raises(IMAPClientError, match="got more than 700 bytes"):
        probe.search("ALL")
    probe.shutdown()
    poller = _poller(db, server, user, search_window=40, fetch_chunk=15)
    assert poller.poll_once() == PollResult(taken=len(kept), moved=len(kept))
    assert _bodies(db) == kept  # in UID order, across windows and chunks
    assert _state(db, f"{user}@127.0.0.1/INBOX")[1] == 300  # type: ignore[index]
    monkeypatch.undo()
    assert _mailbox(imap, "INBOX") == {}
    assert poller.poll_once() == PollResult()  # an empty mailbox: nothing to search


# --- failures and crashes ---------------------------------------------------------------------


def test_a_transient_database_failure_leaves_the_message_in_the_mailbox(
    db: Database,
    server: dovecot.DovecotServer,
    user: str,
    imap: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    messages = [_hostile(), (ASSETS / "plain-text.eml").read_bytes()]
    for raw in messages:
        imap.append("INBOX", raw)
    poller = _poller(db, server, user)

    def full_disk(*args: Any, **kwargs: Any) -> int:
        raise TransientError("the message could not be stored (OperationalError)")

    monkeypatch.setattr("gateway.intake.accept", full_disk)
    result = poller.poll_once()
    assert result == PollResult(error="the message could not be stored (OperationalError)")
    inbox = _mailbox(imap, "INBOX")
    assert [body for body, _ in inbox.values()] == messages  # still there, still unread
    assert all(b"\\Seen" not in flags for _, flags in inbox.values())

    monkeypatch.undo()
    assert poller.poll_once() == PollResult(taken=2, moved=2)
    assert _bodies(db) == messages


CRASH_BEFORE_MOVE = """
import os, sys, time
from archive.db import Database
from gateway.imap import ImapPoller

class CrashesBeforeMoving(ImapPoller):
    def _move(self, client, uid, mailbox):
        print("committed", uid, flush=True)  # intake.accept has returned
        time.sleep(600)  # killed -9 here

poller = CrashesBeforeMoving(
    Database.open(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), security="none",
    username=sys.argv[3], password=os.environ["IMAP_PASSWORD"],
)
poller.poll_once()
"""


def test_a_kill_between_commit_and_move_takes_the_message_in_once(
    tmp_path: Path, db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    messages = [_hostile(), (ASSETS / "plain-text.eml").read_bytes()]
    for raw in messages:
        imap.append("INBOX", raw)
    url = f"sqlite:///{tmp_path}/archive.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_BEFORE_MOVE, *(url, str(server.port), user)],
        cwd=REPO,
        env={**os.environ, "IMAP_PASSWORD": server.password(user)},
        stdout=subprocess.PIPE,
        preexec_fn=servers.die_with_parent(),
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready, "the poller did not reach the move"
        assert child.stdout.readline() == b"committed 1\n"
    finally:
        child.kill()  # SIGKILL: no clean-up of any kind
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert _bodies(db) == messages[:1]  # committed …
    assert len(_mailbox(imap, "INBOX")) == 2  # … and not moved

    assert _poller(db, server, user).poll_once() == PollResult(taken=1, already_known=1, moved=2)
    assert _bodies(db) == messages  # each exactly once
    assert _mailbox(imap, "INBOX") == {}
    assert [body for body, _ in _mailbox(imap, DONE).values()] == messages


class Crash(BaseException):
    """Stands for the process dying (no ``except Exception`` catches it)."""


class CrashesBeforeMoving(ImapPoller):
    def _move(self, client: Any, uid: int, mailbox: str) -> bool:
        raise Crash


def test_a_changed_uidvalidity_starts_again_and_the_worker_files_a_duplicate_once(
    db: Database,
    server: dovecot.DovecotServer,
    user: str,
    imap: Any,
    world: DemoWorld,
    world_ctx: Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, c = (world.submission("H26.SNV", number=n) for n in (1, 2, 3))
    imap.create_folder("Intake")
    imap.append("Intake", a)
    assert _poller(db, server, user, mailbox="Intake").poll_once() == PollResult(taken=1, moved=1)
    imap.append("Intake", b)
    with pytest.raises(Crash):  # b is committed, not moved
        _poller(db, server, user, CrashesBeforeMoving, mailbox="Intake").poll_once()
    before = imap.select_folder("Intake", readonly=True)[b"UIDVALIDITY"]
    imap.unselect_folder()

    # The mailbox is made again (say, restored from a backup that still held b), and c arrives.
    imap.delete_folder("Intake")
    imap.create_folder("Intake")
    imap.append("Intake", b)
    imap.append("Intake", c)
    after = imap.select_folder("Intake", readonly=True)[b"UIDVALIDITY"]
    assert after != before

    with caplog.at_level(logging.WARNING, logger="gateway.imap"):
        result = _poller(db, server, user, mailbox="Intake").poll_once()
    assert result == PollResult(taken=2, moved=2, uidvalidity_reset=True)
    assert f"UIDVALIDITY changed from {before} to {after}" in caplog.text
    assert _bodies(db) == [a, b, b, c]  # b twice at intake level: new UIDVALIDITY, new key
    assert _state(db, f"{user}@127.0.0.1/Intake") == (after, 2)

    # … and once in the archive: the worker's replay keys file the second b as a duplicate.
    archive = archive_on(db, world)
    worker = Worker(archive, lambda: world_ctx, clock=lambda: WORLD_AT)
    outcomes = worker.run_once()
    assert [o.disposition for o in outcomes] == ["accepted", "accepted", "duplicate", "accepted"]
    assert outcomes[2].archive_seq == outcomes[1].archive_seq


def test_a_message_is_received_when_the_mailbox_took_it_in_not_when_it_was_fetched(
    db: Database,
    server: dovecot.DovecotServer,
    user: str,
    imap: Any,
    world: DemoWorld,
    world_ctx: Context,
) -> None:
    """Home Affairs' submission reached the hub's mailbox at WORLD_AT (its INTERNALDATE). The
    poller was down until after Home Affairs' certificate expired: the message is still
    received at WORLD_AT, when the certificate was valid, and accepted; a deadline would be
    counted from then too."""
    imap.append("INBOX", world.submission("H26.SNV"), msg_time=WORLD_AT)
    later = world.agencies["H26.SNV"].cert.not_valid_after_utc + timedelta(hours=1)
    assert _poller(db, server, user, clock=lambda: later).poll_once().taken == 1
    [row] = _intake(db)
    assert row.received_at == WORLD_AT
    assert row.transport["received_at"] == WORLD_AT.isoformat()
    archive = archive_on(db, world)
    [outcome] = Worker(archive, lambda: world_ctx, clock=lambda: later).run_once()
    assert outcome.disposition == "accepted"


def test_a_time_of_receipt_is_never_before_the_pass_that_could_first_have_seen_it(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    """INTERNALDATE is whatever put the message there says: an APPEND may date it last week. A
    message a pass did not see arrived after that pass began, so it is received no earlier
    than then; a new process takes the last pass recorded in the database for that."""
    now = [WORLD_AT]
    poller = _poller(db, server, user, clock=lambda: now[0])
    imap.append("INBOX", b"Subject: a\r\n\r\na\r\n", msg_time=WORLD_AT - timedelta(hours=1))
    assert poller.poll_once().taken == 1  # the first pass ever: nothing to bound it
    first_pass = now[0]
    now[0] += timedelta(minutes=10)
    imap.append("INBOX", b"Subject: b\r\n\r\nb\r\n", msg_time=WORLD_AT - timedelta(days=7))
    assert poller.poll_once().taken == 1
    second_pass = now[0]
    now[0] += timedelta(minutes=10)
    imap.append("INBOX", b"Subject: c\r\n\r\nc\r\n", msg_time=WORLD_AT - timedelta(days=7))
    restarted = _poller(db, server, user, clock=lambda: now[0])  # a new process
    assert restarted.poll_once().taken == 1
    assert [r.received_at for r in _intake(db)] == [
        WORLD_AT - timedelta(hours=1),
        first_pass,  # backdated a week: no earlier than the pass before the one that took it
        second_pass,  # the last pass recorded (it moved b)
    ]


def test_a_time_of_receipt_ahead_of_the_gateway_clock_is_taken_as_now(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    """A mail store whose clock runs ahead does not date a message in the gateway's future."""
    imap.append("INBOX", b"Subject: x\r\n\r\nx\r\n", msg_time=WORLD_AT + timedelta(hours=2))
    assert _poller(db, server, user).poll_once().taken == 1
    assert [r.received_at for r in _intake(db)] == [WORLD_AT]


# --- the loop ---------------------------------------------------------------------------------


def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_run_wakes_up_on_idle_and_stops_when_asked(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    first, second = _hostile(), (ASSETS / "plain-text.eml").read_bytes()
    imap.append("INBOX", first)
    poller = _poller(db, server, user, poll_seconds=600)  # only IDLE can bring the second in
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,))
    thread.start()
    try:
        assert _eventually(lambda: len(_intake(db)) == 1)
        time.sleep(0.3)  # let it settle into IDLE
        imap.append("INBOX", second)
        # Within _eventually's bound, far less than the 600 s poll: IDLE brought it in.
        assert _eventually(lambda: len(_intake(db)) == 2)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert _bodies(db) == [first, second]


def test_run_takes_in_mail_that_came_during_a_pass_without_waiting_for_idle(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    """The second message reaches the mailbox while the first is being moved: the server
    announces it in its answer to that MOVE, where imaplib drops it, so IDLE will not hear of
    it. A pass that moved something is followed by another at once."""
    first, second = _hostile(), (ASSETS / "plain-text.eml").read_bytes()

    class SecondComesDuringTheMove(ImapPoller):
        def _move(self, client: Any, uid: int, mailbox: str) -> bool:
            if not _intake(db)[1:]:
                imap.append("INBOX", second)
            return super()._move(client, uid, mailbox)

    imap.append("INBOX", first)
    poller = _poller(db, server, user, SecondComesDuringTheMove, poll_seconds=600)
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,))
    thread.start()
    try:
        # Within _eventually's bound, far less than the 600 s poll or the server's IDLE
        # keep-alive (Dovecot: 2 min).
        assert _eventually(lambda: len(_intake(db)) == 2)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert _bodies(db) == [first, second]


def test_run_logs_one_line_per_failed_connection_and_backs_off(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind((dovecot.HOST, 0))
        port = s.getsockname()[1]
    poller = ImapPoller(
        db, host=dovecot.HOST, port=port, security="none", username="u", password="p"
    )
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,))
    with caplog.at_level(logging.INFO, logger="gateway.imap"):
        thread.start()
        try:
            assert _eventually(
                lambda: sum(r.levelno == logging.ERROR for r in caplog.records) >= 2, timeout=5
            )
        finally:
            stop.set()
            thread.join(timeout=5)
    assert not thread.is_alive()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in errors)
    assert "ConnectionRefusedError" in errors[0].getMessage()
    delays = [r.getMessage() for r in caplog.records if "connecting again" in r.getMessage()]
    assert delays[:2] == [f"IMAP u@127.0.0.1/INBOX: connecting again in {n} s" for n in (1, 2)]


def test_a_server_dying_during_idle_is_noticed_at_once(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    private = dovecot.start(users_count=1)  # killed below; the module's server stays up
    try:
        user, _ = private.add_user()
        poller = _poller(db, private, user, poll_seconds=600)
        stop = threading.Event()
        thread = threading.Thread(target=poller.run, args=(stop,))
        with caplog.at_level(logging.INFO, logger="gateway.imap"):
            thread.start()
            try:
                assert _eventually(lambda: _state(db, f"{user}@127.0.0.1/INBOX") is not None)
                time.sleep(0.5)  # the first pass is done (its state written): in IDLE by now
                private.kill()
                assert _eventually(lambda: any(r.levelno == logging.ERROR for r in caplog.records))
            finally:
                stop.set()
                thread.join(timeout=5)
        assert not thread.is_alive()
    finally:
        private.stop()


def test_the_poller_outlives_a_long_mail_server_outage(db: Database) -> None:
    """Connection failures back off 1, 2, 4 … s up to BACKOFF_MAX: 1,100 failures in a row are
    days of a mail server down. Its arithmetic once overflowed at the 1,025th (``2.0 ** 1024``)
    and the poller's thread ended: no mail fetched again until a restart."""
    port = servers.free_port()  # nothing listens there: every connection is refused
    poller = ImapPoller(
        db, host="127.0.0.1", port=port, security="none", username="u", password="p"
    )
    stop = threading.Event()
    waits: list[float] = []

    def wait(timeout: float | None = None) -> bool:
        waits.append(timeout or 0.0)
        if len(waits) >= 1100:
            stop.set()
        return stop.is_set()

    stop.wait = wait  # type: ignore[method-assign]  # no real back-off
    poller.run(stop)
    assert len(waits) == 1100 and waits[:3] == [1.0, 2.0, 4.0] and waits[-1] == 300.0
