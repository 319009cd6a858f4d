"""The IMAP intake mode: take mail from a mailbox into the durable inbox, then move it away.

An imapclient edge over :func:`gateway.intake.accept` for a hub whose mail is delivered into a
mailbox rather than handed over by SMTP/LMTP: a limit, a durable commit, an acknowledgement —
here, moving the message out. ``gateway serve`` builds it from values the CLI read::

    poller = ImapPoller(db, host="imap.example.gov.vn", port=993, security="tls",
                        username="hub", password=secret, mailbox="INBOX",
                        done_mailbox="Gateway/Processed", oversize_mailbox="Gateway/Oversize",
                        poll_seconds=30.0, ssl_context=None, limits=Limits(), clock=clock)
    poller.poll_once()       # -> PollResult: one connection, one pass; network errors raise
    poller.run(stop_event)   # a threading.Event; returns once it is set, never raises

``security`` is ``tls`` (implicit, port 993), ``starttls`` (never falls back to plain text) or
``none``; ``ssl_context=None`` means the system's CAs with the host name checked. One pass:

1. LOGIN, SELECT, read UIDVALIDITY; one that differs from the stored ``MailboxState`` is logged
   and recorded with ``last_uid`` 0 (see *UIDVALIDITY*).
2. Every message there: committed messages leave, so what is there is new or was committed
   just before a crash. The lowest and highest UIDs (FETCH of the first and last message's
   UID by sequence number, as SELECT counted them), then UID SEARCH over
   windows of :data:`SEARCH_WINDOW` UIDs between them; in UID order, :data:`FETCH_CHUNK` UIDs
   at a time (one UID FETCH of their RFC822.SIZE, then steps 3–7 for each):
3. RFC822.SIZE over ``max_message_bytes`` (DESIGN §5 rule 4, the IMAP literal limit): not
   fetched; moved to ``oversize_mailbox`` and logged.
4. Source key (``imap:user@host/mailbox/uidvalidity/uid``) already in the intake: committed
   before a crash; not fetched again, only moved.
5. UID FETCH ``BODY.PEEK[]<0.limit+1>``: PEEK leaves ``\\Seen`` unset (RFC 3501 §6.4.5); the
   range bounds memory even if RFC822.SIZE was wrong.
6. ``intake.accept(…, source_key=…)``; only once it returned (rule 7: durably committed) —
7. move to ``done_mailbox`` (created if missing): UID MOVE (RFC 6851); else UID COPY, STORE
   ``\\Deleted``, UID EXPUNGE (RFC 4315); else COPY, STORE, and one EXPUNGE after a pass that
   took in all it saw. ``MailboxState.last_uid`` records the highest UID moved (for people).

A :class:`~formats.errors.TransientError` from the database ends the pass with
``PollResult.error``; the message stays and is fetched again next time.

Exactly-once (rule 8) holds in the intake: a kill -9 between commit and move leaves the message
in the mailbox and step 4 finds it. (A crash between COPY and EXPUNGE in the fallback can leave
a second copy in the done mailbox, which is only a record.)

UIDVALIDITY: UIDs mean something only within one UIDVALIDITY (RFC 3501 §2.3.1.1), so the key
carries it. When it changes (mailbox recreated, restored, or moved to another server) every
message still there gets a new key and is taken in again. Usually these are new; but one
committed and not yet moved when the change came is taken in a second time at intake level.
The worker finds the replay keys (rule 3) of a verified message and files that copy as a
duplicate; a message that fails verification has no replay key and is filed again (rejected or
quarantined twice: two entries, each true to what arrived).

Mailbox names use ``/`` for hierarchy, replaced by the server's separator (Dovecot's Maildir
default is ``.``). One poller per mailbox, used by one thread.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from sqlalchemy import select

from archive import tables as t
from archive.db import Database
from archive.records import Transport
from formats.errors import ConfigError, TransientError
from formats.limits import DEFAULT_LIMITS, Limits
from gateway import intake

log = logging.getLogger(__name__)

SECURITY = ("tls", "starttls", "none")
#: Reconnection delays after a failure: 1, 2, 4 … seconds, at most this many.
BACKOFF_MAX = 300.0
#: RFC 2177: a client should end IDLE and issue it again at least every 29 minutes.
IDLE_MAX = 25 * 60.0
#: Network trouble (refused, reset, timed out, TLS, a NO/BAD answer): reconnect later.
NETWORK_ERRORS = (IMAPClientError, OSError)
#: UIDs per ``UID FETCH … (RFC822.SIZE)``. imapclient writes a UID set out in full
#: (``1,2,3,…``), and a server refuses a longer command line than it takes (Dovecot's
#: ``imap_max_line_length``, 64 KiB: ~11,000 UIDs) with BAD, on every pass: a backlog that
#: size would never be taken in. 500 UIDs of up to 10 digits are 5.5 KB.
FETCH_CHUNK = 500
#: UIDs per ``UID SEARCH UID lo:hi``. The answer lists every UID found on one line, and
#: imaplib (under imapclient) refuses a line over 1,000,000 bytes: one ``SEARCH ALL`` fails, on
#: every pass, once the mailbox holds ~140,000 messages. 10,000 UIDs of up to 10 digits: 110 KB.
SEARCH_WINDOW = 10_000


@dataclass(frozen=True)
class PollResult:
    taken: int = 0  # new intake rows
    already_known: int = 0  # committed before (a crash before the move): moved, not stored again
    oversize: int = 0  # moved to the oversize mailbox without being fetched
    moved: int = 0  # moved to the done mailbox (taken + already_known)
    uidvalidity_reset: bool = False
    error: str | None = None  # a transient database failure ended the pass early


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no detail)"
    return f"{type(exc).__name__}: {text[:300]}"


@dataclass(eq=False)
class ImapPoller:
    """Takes the mail in one IMAP mailbox into the intake (see the module docstring)."""

    db: Database
    _: KW_ONLY
    host: str
    port: int
    security: str  # tls | starttls | none
    username: str
    password: str = field(repr=False)
    mailbox: str = "INBOX"
    done_mailbox: str = "Gateway/Processed"
    oversize_mailbox: str = "Gateway/Oversize"
    poll_seconds: float = 30.0
    ssl_context: ssl.SSLContext | None = None  # None: the system's CAs, host name checked
    limits: Limits = DEFAULT_LIMITS
    clock: Callable[[], datetime] = _utcnow
    timeout: float = 60.0  # seconds for any one network read or write
    fetch_chunk: int = FETCH_CHUNK  # UIDs per UID FETCH of sizes
    search_window: int = SEARCH_WINDOW  # UIDs per UID SEARCH
    _caps: set[bytes] = field(default_factory=set, init=False, repr=False)
    _separator: str | None = field(default=None, init=False, repr=False)
    _ready: set[str] = field(default_factory=set, init=False, repr=False)  # mailboxes that exist
    where: str = field(init=False)  # user@host/mailbox: the MailboxState key, source key prefix

    def __post_init__(self) -> None:
        if self.security not in SECURITY:
            raise ConfigError(
                f"IMAP security {self.security!r} is not one of {', '.join(SECURITY)}"
            )
        if len({self.mailbox, self.done_mailbox, self.oversize_mailbox}) != 3:
            raise ConfigError(
                f"the IMAP mailbox ({self.mailbox}), done mailbox ({self.done_mailbox}) and "
                f"oversize mailbox ({self.oversize_mailbox}) must be three different mailboxes"
            )
        if self.poll_seconds <= 0:
            raise ConfigError(f"IMAP poll_seconds must be positive, got {self.poll_seconds}")
        if self.fetch_chunk < 1 or self.search_window < 1:
            raise ConfigError(
                f"IMAP fetch_chunk and search_window must be at least 1, got "
                f"{self.fetch_chunk} and {self.search_window}"
            )
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self.where = f"{self.username}@{self.host}/{self.mailbox}"

    def run(self, stop: threading.Event) -> None:
        """Poll, wait (IDLE, else sleep) up to ``poll_seconds``, again, until ``stop`` is set.

        Connection trouble is logged as one line and retried after 1, 2, 4 … s (at most
        :data:`BACKOFF_MAX`); nothing but ``stop`` ends the loop.
        """
        failures = 0
        while not stop.is_set():
            client = None
            try:
                client = self._connect()
                while not stop.is_set():
                    self._poll(client)
                    failures = 0
                    self._wait(client, stop)
            except NETWORK_ERRORS as exc:
                failures += 1
                log.error("IMAP %s (port %d): %s", self.where, self.port, _one_line(exc))
            except Exception as exc:  # a bug or an answer we do not understand: same retry
                failures += 1
                log.error(
                    "IMAP %s: unexpected %s", self.where, _one_line(exc), exc_info=failures == 1
                )
            finally:
                if client is not None:
                    self._close(client)
            if failures and not stop.is_set():
                delay = min(BACKOFF_MAX, 2.0 ** (failures - 1))
                log.info("IMAP %s: connecting again in %.0f s", self.where, delay)
                stop.wait(delay)

    def _wait(self, client: Any, stop: threading.Event) -> None:
        if b"IDLE" not in self._caps:
            stop.wait(self.poll_seconds)
            return
        deadline = time.monotonic() + min(self.poll_seconds, IDLE_MAX)
        client.idle()
        try:
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                step, started = min(left, 1.0), time.monotonic()  # 1 s: notice `stop` soon
                if client.idle_check(timeout=step):
                    break  # new mail, a keep-alive or BYE: poll (again) now
                if time.monotonic() - started < step / 2:
                    break  # readable yet nothing to read: the server closed the connection
        finally:
            client.idle_done()  # raises on a closed connection: reconnect

    def poll_once(self) -> PollResult:
        """Connect, take in what the mailbox holds, log out. Network errors propagate."""
        client = self._connect()
        try:
            return self._poll(client)
        finally:
            self._close(client)

    def _poll(self, client: Any) -> PollResult:
        selected = client.select_folder(self._name(self.mailbox))
        uidvalidity = int(selected[b"UIDVALIDITY"])
        counts = {"taken": 0, "already_known": 0, "oversize": 0, "moved": 0}
        error, reset, highest, expunge = None, False, 0, False
        try:
            reset, last_uid = self._check_state(uidvalidity)
            for chunk in self._uids(client, selected):
                sizes = client.fetch(chunk, ["RFC822.SIZE"])
                for uid in chunk:
                    size = sizes.get(uid, {}).get(b"RFC822.SIZE")
                    outcome = None if size is None else self._take(client, uid, size, uidvalidity)
                    if outcome is None:  # expunged by someone else meanwhile
                        continue
                    counts[outcome] += 1
                    oversize = outcome == "oversize"
                    target = self.oversize_mailbox if oversize else self.done_mailbox
                    expunge |= self._move(client, uid, target)
                    if not oversize:
                        counts["moved"] += 1
                        highest = uid
            if expunge:  # no UIDPLUS: every \Deleted message here was taken in by this pass
                client.expunge()
            if highest > last_uid:
                self._save_state(uidvalidity, highest)
        except TransientError as exc:
            error = str(exc)
            log.warning("IMAP %s: %s; the rest waits for the next poll", self.where, error)
        return PollResult(**counts, uidvalidity_reset=reset, error=error)

    def _uids(self, client: Any, selected: dict[bytes, Any]) -> Iterator[list[int]]:
        """The UIDs of the selected mailbox's messages at the start of the pass, ascending, at
        most :attr:`fetch_chunk` at a time (step 2); none if it holds no message."""
        exists = int(selected.get(b"EXISTS", 0))
        if exists < 1:
            return
        client.use_uid = False  # by sequence number: the first message, and the last
        try:
            ends = [data[b"UID"] for data in client.fetch([1, exists], ["UID"]).values()]
        finally:
            client.use_uid = True
        if not ends:  # emptied by someone else meanwhile
            return
        lowest, highest = min(ends), max(ends)
        for start in range(lowest, highest + 1, self.search_window):
            end = min(highest, start + self.search_window - 1)
            uids = sorted(client.search(["UID", f"{start}:{end}"]))
            for at in range(0, len(uids), self.fetch_chunk):
                yield uids[at : at + self.fetch_chunk]

    def _take(self, client: Any, uid: int, size: int, uidvalidity: int) -> str | None:
        """Steps 3–6 for one message: its counter's name, or ``None`` if it vanished."""
        limit = self.limits.max_message_bytes
        key = f"imap:{self.where}/{uidvalidity}/{uid}"
        raw = None
        if size <= limit:
            known = self._known(key)
            if known is not None:
                log.info("IMAP %s UID %d: already intake #%d; moving it", self.where, uid, known)
                return "already_known"
            raw = self._fetch(client, uid)
            if raw is None:
                return None
        if raw is None or len(raw) > limit:
            log.warning(
                "IMAP %s UID %d: %d bytes, over the %d-byte limit (max_message_bytes); "
                "not taken in, moved to %s",
                self.where, uid, max(size, len(raw or b"")), limit, self.oversize_mailbox,
            )  # fmt: skip
            return "oversize"
        transport = self._transport(client, uid, uidvalidity)
        number = intake.accept(self.db, raw, transport, source_key=key)
        log.info("IMAP %s UID %d: taken in as intake #%d", self.where, uid, number)
        return "taken"

    def _fetch(self, client: Any, uid: int) -> bytes | None:
        part = f"BODY.PEEK[]<0.{self.limits.max_message_bytes + 1}>"
        data = client.fetch([uid], [part]).get(uid, {})
        body = next((v for k, v in data.items() if k.startswith(b"BODY[]")), None)
        return bytes(body) if body is not None else None

    def _transport(self, client: Any, uid: int, uidvalidity: int) -> Transport:
        sock = client.socket()
        secure = isinstance(sock, ssl.SSLSocket) and (cipher := sock.cipher())
        tls = f"{sock.version()} {cipher[0]}" if secure and cipher else None
        extra = {"mailbox": self.mailbox, "uid": str(uid), "uidvalidity": str(uidvalidity)}
        return Transport(self.clock(), "imap", peer=self.host, tls=tls, extra=extra)

    def _move(self, client: Any, uid: int, mailbox: str) -> bool:
        """Move one message; ``True`` when an EXPUNGE is still owed (no UIDPLUS)."""
        name = self._name(mailbox)
        if name not in self._ready:
            if not client.folder_exists(name):
                try:
                    client.create_folder(name)
                except IMAPClientError:
                    if not client.folder_exists(name):  # not made by someone else meanwhile
                        raise
            self._ready.add(name)
        if b"MOVE" in self._caps:
            client.move([uid], name)
            return False
        client.copy([uid], name)
        client.add_flags([uid], [b"\\Deleted"], silent=True)
        if b"UIDPLUS" in self._caps:
            client.uid_expunge([uid])
            return False
        return True

    def _connect(self) -> Any:
        implicit = self.security == "tls"
        context = self.ssl_context if implicit else None
        client = IMAPClient(self.host, self.port, ssl=implicit, ssl_context=context, timeout=self.timeout)  # fmt: skip
        try:
            if self.security == "starttls":
                client.starttls(self.ssl_context)  # CapabilityError without STARTTLS: no fallback
            client.login(self.username, self.password)
            self._caps = self._capabilities(client)
            root = client.list_folders("", "")  # RFC 3501 §6.3.8: the hierarchy separator
            sep = root[0][1] if root else None
            self._separator = sep.decode() if isinstance(sep, bytes) else sep
            self._ready = set()
        except BaseException:
            self._close(client)
            raise
        return client

    def _capabilities(self, client: Any) -> set[bytes]:
        return set(client.capabilities())

    def _name(self, mailbox: str) -> str:
        return mailbox.replace("/", self._separator) if self._separator else mailbox

    @staticmethod
    def _close(client: Any) -> None:
        try:
            client.logout()
        except Exception:
            with contextlib.suppress(Exception):
                client.shutdown()

    def _check_state(self, uidvalidity: int) -> tuple[bool, int]:
        """``(reset, last_uid)``: a new or changed UIDVALIDITY is recorded, from UID 0."""
        with self.db.session(read_only=True) as s:
            row = s.get(t.MailboxState, self.where)
            stored = None if row is None else (row.uidvalidity, row.last_uid)
        if stored is not None and stored[0] == uidvalidity:
            return False, stored[1]
        if stored is not None:
            log.warning(
                "IMAP %s: UIDVALIDITY changed from %d to %d (the mailbox was recreated or "
                "restored); everything in it is taken in again",
                self.where, stored[0], uidvalidity,
            )  # fmt: skip
        self._save_state(uidvalidity, 0)
        return stored is not None, 0

    def _save_state(self, uidvalidity: int, last_uid: int) -> None:
        with self.db.session() as s:
            row = s.get(t.MailboxState, self.where)
            if row is None:
                row = t.MailboxState(mailbox=self.where)
                s.add(row)
            row.uidvalidity, row.last_uid, row.updated_at = uidvalidity, last_uid, self.clock()

    def _known(self, source_key: str) -> int | None:
        with self.db.session(read_only=True) as s:
            return s.scalar(select(t.Intake.id).where(t.Intake.source_key == source_key))
