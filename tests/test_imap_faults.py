"""The IMAP poller and messages it does not take in, against a real Dovecot (tests/dovecot.py).

- Oversize: filed in the archive as ``refused`` (its size, header block, mailbox, UIDVALIDITY
  and UID), the admin alerted once a day, then moved to the oversize mailbox; once, even across
  a crash before the move.
- A message the server cannot return: here its Maildir file is made unreadable to Dovecot's
  mail process (mode 0), so Dovecot answers its FETCH with ``BYE`` and hangs up. It is skipped
  and the others are taken in; after ``MAX_FAILED_PASSES`` passes it is filed as refused, moved
  to the unreadable mailbox (or left, if the server will not move it) and the admin alerted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from sqlalchemy import select

from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database
from archive.service import Archive
from formats.errors import ConfigError, InputError
from formats.limits import Limits
from formats.vntime import local_day
from gateway import intake
from gateway.demo import DemoWorld
from gateway.imap import GIVE_UP_AFTER, MAX_FAILED_PASSES, ImapPoller, PollResult
from tests import dovecot
from tests.conftest import WORLD_AT
from tests.test_imap import _bodies, _eventually, _mailbox, _poller

OVERSIZE = "Gateway.Oversize"
UNREADABLE = "Gateway.Unreadable"
DAY = local_day(WORLD_AT)  # the pollers' clock

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
    client = server.client(user)
    yield client
    client.logout()


class Clock:
    """The pollers' clock: WORLD_AT, moved on by the test, or by ``step`` at each reading."""

    def __init__(self, step: timedelta = timedelta(0)) -> None:
        self.now, self.step = WORLD_AT, step

    def __call__(self) -> datetime:
        now, self.now = self.now, self.now + self.step
        return now


class Crash(BaseException):
    """Stands for the process dying (no ``except Exception`` catches it)."""


def _entries(db: Database) -> list[tuple[int, str, str | None, dict[str, Any]]]:
    """(seq, kind, status, fields) of every archive entry, in log order."""
    with db.session(read_only=True) as s:
        rows = s.scalars(select(t.LogEntry).order_by(t.LogEntry.seq))
        return [(r.seq, r.kind, r.status, json.loads(r.record)) for r in rows]


def _alerts(db: Database) -> dict[str, str]:
    with db.session(read_only=True) as s:
        rows = s.scalars(select(t.Outbox).where(t.Outbox.kind == "alert").order_by(t.Outbox.id))
        return {r.key: r.detail["text"] for r in rows}


def _count(imap: Any, folder: str) -> int:
    """Messages in ``folder``, not fetched (the server hangs up on an unreadable one)."""
    imap.select_folder(folder, readonly=True)
    return len(imap.search("ALL"))


def _message(n: int) -> bytes:
    return b"Message-ID: <%d@snv.example>\r\nSubject: m%d\r\n\r\nbody %d\r\n" % (n, n, n)


def _make_unreadable(server: dovecot.DovecotServer, user: str, raw: bytes, *, size: bool) -> Path:
    """Make the INBOX Maildir file holding ``raw`` unreadable to Dovecot's mail process; without
    ``size``, its name also loses ``S=``, so Dovecot must read the file for RFC822.SIZE too."""
    maildir = server.root / "mail" / user / "Maildir"
    (path,) = [
        p
        for p in [*maildir.glob("new/*"), *maildir.glob("cur/*")]
        if p.read_bytes().replace(b"\n", b"\r\n") == raw
    ]
    if not size:
        path = path.rename(path.with_name(re.sub(r",[SW]=\d+", "", path.name)))
    path.chmod(0)
    return path


def _never_answering(server: dovecot.DovecotServer, user: str, raw: bytes) -> None:
    """Put a FIFO in place of the INBOX Maildir file holding ``raw``: Dovecot's mail process
    blocks opening it, and the FETCH of its body is never answered (a read that hangs on the
    server, as on a stuck network file system)."""
    maildir = server.root / "mail" / user / "Maildir"
    (path,) = [p for p in maildir.glob("new/*") if p.read_bytes().replace(b"\n", b"\r\n") == raw]
    owner = path.stat()
    path.unlink()
    os.mkfifo(path, 0o600)
    os.chown(path, owner.st_uid, owner.st_gid)


def _readable_again(server: dovecot.DovecotServer, user: str) -> None:
    for path in (server.root / "mail" / user / "Maildir").rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o777 == 0:
            path.chmod(0o600)


# --- oversize -------------------------------------------------------------------------------


def test_an_oversize_message_is_filed_as_refused_and_the_admin_alerted_once_a_day(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any, world: DemoWorld
) -> None:
    small = _message(0)
    bigs = [world.submission("H26.SNV", number=n) for n in (1, 2)]
    assert len(small) < 5000 < min(map(len, bigs))
    imap.append("INBOX", bigs[0])
    imap.append("INBOX", small)
    imap.append("INBOX", bigs[1])
    uidvalidity = imap.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"]

    poller = _poller(db, server, user, limits=Limits(max_message_bytes=5000))
    assert poller.poll_once() == PollResult(taken=1, oversize=2, moved=1)
    assert _bodies(db) == [small]  # nothing of the big ones in the intake: no stand-in
    assert [body for body, _ in _mailbox(imap, OVERSIZE).values()] == bigs  # moved, unread
    assert all(b"\\Seen" not in flags for _, flags in _mailbox(imap, OVERSIZE).values())

    entries = _entries(db)
    assert [(kind, status) for _, kind, status, _ in entries] == [("message", "refused")] * 2
    for (_, _, _, fields), big, uid in zip(entries, bigs, (1, 3), strict=True):
        head = big[: big.index(b"\r\n\r\n") + 4]
        assert fields["size"] == len(big)
        assert fields["source_key"] == f"imap:{user}@127.0.0.1/INBOX/{uidvalidity}/{uid}"
        assert fields["transport"]["protocol"] == "imap"
        assert fields["transport"]["mailbox"] == "INBOX"
        assert fields["transport"]["uid"] == str(uid)
        assert fields["transport"]["uidvalidity"] == str(uidvalidity)
        assert [r["code"] for r in fields["reasons"]] == ["limit-exceeded"]
        assert f"{len(big)} bytes, over the limit of 5000 bytes" in fields["reasons"][0]["message"]
        assert fields["header"]["latin1"].encode("latin-1") == head  # the exact bytes
        assert fields["header"]["complete"] is True
        assert fields["message_id"] == re.search(rb"Message-ID: (\S+)", head)[1].decode()  # type: ignore[index]
        assert fields["from"] == "vanthu@snv.hanoi.gov.vn"
        assert fields["blobs"] == {}
    # The archive still verifies, and a refused entry is never put back in the inbox.
    report = Archive(db, BlobStore(os.urandom(32)), "hub@test").verify()
    assert report.ok, report.problems
    with db.session() as s, pytest.raises(InputError, match="a refused message entry"):
        intake.release(s, entries[0][0], entries[0][3], b"", at=WORLD_AT, actor="t")

    # One alert for the day, naming the first.
    alerts = _alerts(db)
    assert list(alerts) == [f"alert:imap-oversize:{DAY}"]
    text = alerts[f"alert:imap-oversize:{DAY}"]
    assert f"UID 1 (UIDVALIDITY {uidvalidity})" in text
    assert f"archive entry {entries[0][0]}" in text
    assert "Gateway/Oversize" in text

    assert poller.poll_once() == PollResult()  # nothing twice


def test_a_header_block_over_max_header_bytes_is_kept_cut_short(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    big = b"Message-ID: <1@snv.example>\r\n" + b"X-Pad: " + b"a" * 900 + b"\r\n\r\n" + b"b" * 4000
    imap.append("INBOX", big)
    limits = Limits(max_message_bytes=2000, max_header_bytes=100)
    assert _poller(db, server, user, limits=limits).poll_once() == PollResult(oversize=1)
    ((_, _, _, fields),) = _entries(db)
    assert fields["header"]["latin1"].encode("latin-1") == big[:100]
    assert fields["header"]["complete"] is False
    assert "message_id" not in fields  # a cut header block is not read


def test_a_crash_between_filing_an_oversize_message_and_moving_it_files_it_once(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any, world: DemoWorld
) -> None:
    class CrashesBeforeMoving(ImapPoller):
        def _move(self, client: Any, uid: int, mailbox: str) -> bool:
            raise Crash

    big = world.submission("H26.SNV")
    imap.append("INBOX", big)
    limits = Limits(max_message_bytes=5000)
    with pytest.raises(Crash):
        _poller(db, server, user, CrashesBeforeMoving, limits=limits).poll_once()
    assert len(_entries(db)) == 1  # filed …
    assert len(_mailbox(imap, "INBOX")) == 1  # … not moved

    assert _poller(db, server, user, limits=limits).poll_once() == PollResult(oversize=1)
    assert len(_entries(db)) == 1  # not filed again
    assert list(_alerts(db)) == [f"alert:imap-oversize:{DAY}"]
    assert _mailbox(imap, "INBOX") == {}
    assert [body for body, _ in _mailbox(imap, OVERSIZE).values()] == [big]


# --- a message the server cannot return -----------------------------------------------------


@pytest.mark.parametrize("size", [True, False], ids=["body-fetch-fails", "size-fetch-fails"])
def test_a_message_the_server_cannot_return_is_skipped_and_the_others_are_taken_in(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any, size: bool
) -> None:
    """Dovecot hangs up (``BYE``) on the FETCH of a message it cannot read: with ``S=`` in
    the file name on the body FETCH; without it already on the chunk's size FETCH."""
    messages = [_message(n) for n in range(4)]
    imap.multiappend("INBOX", messages)
    _make_unreadable(server, user, messages[1], size=size)
    poller = _poller(db, server, user)
    assert poller.poll_once() == PollResult(taken=3, moved=3, skipped=1)
    assert _bodies(db) == [messages[0], messages[2], messages[3]]
    assert _count(imap, "INBOX") == 1  # still there, for the next pass
    assert _entries(db) == [] and _alerts(db) == {}  # not yet given up on

    _readable_again(server, user)  # the server's trouble passes: taken in on the next pass
    assert poller.poll_once() == PollResult(taken=1, moved=1)
    assert sorted(_bodies(db)) == sorted(messages)
    assert _mailbox(imap, "INBOX") == {}


def test_a_message_whose_fetch_is_never_answered_is_skipped_and_the_others_are_taken_in(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    messages = [_message(n) for n in range(3)]
    imap.multiappend("INBOX", messages)
    _never_answering(server, user, messages[1])
    try:
        poller = _poller(db, server, user, timeout=1.0)  # seconds for any one network read
        assert poller.poll_once() == PollResult(taken=2, moved=2, skipped=1)
        assert _bodies(db) == [messages[0], messages[2]]
        assert _count(imap, "INBOX") == 1
    finally:  # let the server's blocked processes go (opening the other end unblocks them)
        for path in (server.root / "mail" / user).rglob("*"):
            if stat.S_ISFIFO(path.lstat().st_mode):
                with contextlib.suppress(OSError):
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_body_the_server_answers_nil_is_a_failed_pass_not_an_expunged_message(
    db: Database,
    server: dovecot.DovecotServer,
    user: str,
    imap: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server answers the FETCH of one message with ``BODY[] NIL``. That was taken for a
    message expunged by someone else: left in the mailbox, never counted, never given up on,
    never said. It is a failed pass, as a refused FETCH is."""
    messages = [_message(n) for n in range(3)]
    imap.multiappend("INBOX", messages)
    imap.select_folder("INBOX", readonly=True)
    nil_uid = sorted(imap.search("ALL"))[1]
    real = IMAPClient.fetch

    def fetch(self: IMAPClient, uids: Any, parts: Any, *args: Any, **kw: Any) -> Any:
        answer = real(self, uids, parts, *args, **kw)
        for key in answer.get(nil_uid, {}):
            if key.startswith(b"BODY[]"):
                answer[nil_uid][key] = None
        return answer

    monkeypatch.setattr(IMAPClient, "fetch", fetch)
    poller = _poller(db, server, user)
    assert poller.poll_once() == PollResult(taken=2, moved=2, skipped=1)
    assert _bodies(db) == [messages[0], messages[2]]
    assert _count(imap, "INBOX") == 1  # still there, tried again next pass


@pytest.mark.parametrize("size", [True, False], ids=["body-fetch-fails", "size-fetch-fails"])
def test_after_max_failed_passes_it_is_filed_as_refused_moved_aside_and_alerted(
    db: Database,
    server: dovecot.DovecotServer,
    user: str,
    imap: Any,
    size: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    messages = [_message(n) for n in range(3)]
    imap.multiappend("INBOX", messages)
    _make_unreadable(server, user, messages[1], size=size)
    clock = Clock()
    poller = _poller(db, server, user, clock=clock)
    assert poller.poll_once() == PollResult(taken=2, moved=2, skipped=1)
    # Enough passes, but all within seconds (under IDLE, steady mail does that): not given up.
    for _ in range(MAX_FAILED_PASSES):
        assert poller.poll_once() == PollResult(skipped=1)
    assert _entries(db) == []
    clock.now += GIVE_UP_AFTER
    with caplog.at_level(logging.ERROR, logger="gateway.imap"):
        assert poller.poll_once() == PollResult(unreadable=1)
    assert _mailbox(imap, "INBOX") == {}
    assert f"{MAX_FAILED_PASSES + 2} passes in a row; filed as refused (entry 0)" in caplog.text

    ((seq, kind, status, fields),) = _entries(db)
    assert (kind, status) == ("message", "refused")
    uid = int(fields["transport"]["uid"])
    assert fields["source_key"].endswith(f"/INBOX/{fields['transport']['uidvalidity']}/{uid}")
    ((reason),) = fields["reasons"]
    assert reason["code"] == "imap-unreadable"
    assert "Internal error occurred" in reason["message"]  # Dovecot's answer
    assert f"in {MAX_FAILED_PASSES + 2} passes over 10 min" in reason["message"]
    assert fields["size"] == (len(messages[1]) if size else None)
    alerts = _alerts(db)
    assert list(alerts) == [f"alert:imap-unreadable:{DAY}"]
    assert f"UID {uid} " in alerts[f"alert:imap-unreadable:{DAY}"]
    assert f"archive entry {seq}" in alerts[f"alert:imap-unreadable:{DAY}"]

    assert poller.poll_once() == PollResult()  # set aside: nothing more to do
    _readable_again(server, user)
    assert [body for body, _ in _mailbox(imap, UNREADABLE).values()] == [messages[1]]


def test_one_the_server_will_not_move_either_is_left_where_it_is_and_filed_once(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    class RefusesTheUnreadableMailbox(ImapPoller):
        def _move(self, client: Any, uid: int, mailbox: str) -> bool:
            if mailbox == "Gateway/Unreadable":
                raise IMAPClientError("move failed: NO [CANNOT] no")
            return super()._move(client, uid, mailbox)

    messages = [_message(n) for n in range(2)]
    imap.multiappend("INBOX", messages[:1])
    _make_unreadable(server, user, messages[0], size=True)
    clock = Clock()
    poller = _poller(db, server, user, RefusesTheUnreadableMailbox, clock=clock)
    for _ in range(MAX_FAILED_PASSES - 1):
        assert poller.poll_once() == PollResult(skipped=1)
    clock.now += GIVE_UP_AFTER
    assert poller.poll_once() == PollResult(unreadable=1)
    imap.append("INBOX", messages[1])
    assert poller.poll_once() == PollResult(taken=1, moved=1, unreadable=1)  # the move again
    assert _count(imap, "INBOX") == 1  # left
    assert _bodies(db) == messages[1:]
    assert len(_entries(db)) == 1  # filed once
    assert list(_alerts(db)) == [f"alert:imap-unreadable:{DAY}"]


def test_a_crash_between_filing_an_unreadable_message_and_moving_it_files_it_once(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    class CrashesBeforeMoving(ImapPoller):
        def _move(self, client: Any, uid: int, mailbox: str) -> bool:
            raise Crash

    imap.append("INBOX", _message(0))
    _make_unreadable(server, user, _message(0), size=True)
    clock = Clock()
    crashing = _poller(db, server, user, CrashesBeforeMoving, clock=clock)
    for _ in range(MAX_FAILED_PASSES - 1):
        crashing.poll_once()
    clock.now += GIVE_UP_AFTER
    with pytest.raises(Crash):
        crashing.poll_once()
    assert len(_entries(db)) == 1

    poller = _poller(db, server, user, clock=clock)  # a new process: it counts again
    for _ in range(MAX_FAILED_PASSES - 1):
        assert poller.poll_once() == PollResult(skipped=1)
    clock.now += GIVE_UP_AFTER
    assert poller.poll_once() == PollResult(unreadable=1)
    assert len(_entries(db)) == 1  # not filed twice
    assert list(_alerts(db)) == [f"alert:imap-unreadable:{DAY}"]
    assert _mailbox(imap, "INBOX") == {}


def test_run_takes_in_the_messages_behind_one_the_server_cannot_return(
    db: Database, server: dovecot.DovecotServer, user: str, imap: Any
) -> None:
    messages = [_message(n) for n in range(4)]
    imap.multiappend("INBOX", messages)
    _make_unreadable(server, user, messages[1], size=False)
    # Each reading of the clock a minute on: the passes span GIVE_UP_AFTER within a few.
    poller = _poller(db, server, user, poll_seconds=0.1, clock=Clock(timedelta(minutes=1)))
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,))
    thread.start()
    try:
        assert _eventually(lambda: len(_entries(db)) == 1)  # given up on, after its passes
        assert _bodies(db) == [messages[0], messages[2], messages[3]]
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert _mailbox(imap, "INBOX") == {}


def test_the_unreadable_mailbox_defaults_beside_the_oversize_mailbox(db: Database) -> None:
    def poller(**kw: Any) -> ImapPoller:
        return ImapPoller(db, host="h", port=1, security="none", username="u", password="p", **kw)

    assert poller().unreadable_mailbox == "Gateway/Unreadable"
    assert poller(oversize_mailbox="Oversize").unreadable_mailbox == "Unreadable"
    with pytest.raises(ConfigError, match="four different mailboxes"):
        poller(unreadable_mailbox="Gateway/Oversize")
