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
   at a time (one UID FETCH of their RFC822.SIZE — one UID at a time if that fails, see
   *A message the server cannot return* — then steps 3–7 for each):
3. RFC822.SIZE over ``max_message_bytes`` (DESIGN §5 rule 4, the IMAP literal limit): not
   fetched; filed as refused (see *Refused*) and moved to ``oversize_mailbox``.
4. Source key (``imap:user@host/mailbox/uidvalidity/uid``) already in the intake: committed
   before a crash; not fetched again, only moved.
5. UID FETCH ``BODY.PEEK[]<0.limit+1>``: PEEK leaves ``\\Seen`` unset (RFC 3501 §6.4.5); the
   range bounds memory even if RFC822.SIZE was wrong (more than the limit came: as step 3).
6. ``intake.accept(…, source_key=…)``; only once it returned (rule 7: durably committed) —
7. move to ``done_mailbox`` (created if missing): UID MOVE (RFC 6851); else UID COPY, STORE
   ``\\Deleted``, UID EXPUNGE (RFC 4315); else COPY, STORE, and one EXPUNGE after a pass that
   took in all it saw. ``MailboxState.last_uid`` records the highest UID moved (for people).

A :class:`~formats.errors.TransientError` from the database ends the pass with
``PollResult.error``; the message stays and is fetched again next time.

Exactly-once (rule 8) holds in the intake: a kill -9 between commit and move leaves the message
in the mailbox and step 4 finds it. (A crash between COPY and EXPUNGE in the fallback can leave
a second copy in the done mailbox, which is only a record.)

Refused: a message the poller will not take in (over the size limit, or one the server cannot
return) is filed straight in the archive as refused, with an admin alert once a day
(:mod:`gateway.imap_refused`).

A message the server cannot return (its FETCH answers NO or BAD, or the server hangs up on it —
Dovecot answers ``BYE`` when it cannot read a Maildir file — or does not answer within
``timeout``): errors are per UID. A chunk whose sizes cannot be fetched together is fetched one
UID at a time; a UID whose size or body cannot be fetched is skipped for this pass (after a
lost connection the poller logs in again and goes on), and the others are taken in. After
:data:`MAX_FAILED_PASSES` passes in a row that each failed on it, spanning at least
:data:`GIVE_UP_AFTER` from the first (under IDLE, steady mail makes passes seconds apart), it
is filed as refused (:class:`Unreadable`, with the server's last answer) and moved to
``unreadable_mailbox``; if the server refuses that too, it is left where it is and only the
move is tried again, each pass. The count is kept in memory: a restart begins it again (the
filing is still once).

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
from datetime import UTC, datetime, timedelta
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy import select

from archive import tables as t
from archive.db import Database
from archive.records import Transport
from formats.errors import ConfigError, GatewayError, LimitExceeded, TransientError
from formats.limits import DEFAULT_LIMITS, Limits
from gateway import intake, outbound
from gateway.imap_refused import (
    Alert,
    Unreadable,
    file_refused,
    oversize_alert,
    refused_fields,
    unreadable_alert,
)

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
#: Passes that each failed to fetch one message (its size or its body) before it is filed as
#: refused and moved to the unreadable mailbox: not one failure that may have been chance ...
MAX_FAILED_PASSES = 5
#: ... nor a few seconds of it: under IDLE, steady mail starts a pass every second or so, and a
#: refusal is final (only an admin moving the message back undoes it). The passes must also
#: span this long, from the first that failed (:attr:`ImapPoller.give_up_after`).
GIVE_UP_AFTER = timedelta(minutes=10)
#: The connection is gone, on one message as it seems: the server hung up (Dovecot answers BYE
#: when it cannot read the message), reset it, or did not answer within ``timeout`` (a read
#: that never ends on its side). The poller logs in again and goes on with the others.
LOST = (IMAPClientAbortError, TimeoutError, ConnectionError)
#: A FETCH (or MOVE) that failed for one message: an answer NO or BAD, or :data:`LOST`.
NOT_RETURNED = (IMAPClientError, *LOST)


@dataclass(frozen=True)
class PollResult:
    taken: int = 0  # new intake rows
    already_known: int = 0  # committed before (a crash before the move): moved, not stored again
    oversize: int = 0  # filed as refused and moved to the oversize mailbox, never fetched whole
    moved: int = 0  # moved to the done mailbox (taken + already_known)
    skipped: int = 0  # the server did not return them: left for the next pass
    unreadable: int = 0  # not returned in MAX_FAILED_PASSES passes: filed as refused, set aside
    uidvalidity_reset: bool = False
    error: str | None = None  # a transient database failure ended the pass early


@dataclass
class _Link:
    """The connection of a pass: replaced when the server hangs up on one message."""

    client: Any


@dataclass
class _Pass:
    """What one pass did so far."""

    uidvalidity: int
    counts: dict[str, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # UID → why it was not returned
    expunge: bool = False  # an EXPUNGE is owed (no UIDPLUS)
    highest: int = 0  # the highest UID moved to the done mailbox
    #: When the previous pass began: a message new to this one arrived after that (its
    #: INTERNALDATE is not taken for earlier: :meth:`ImapPoller._transport`). None: unknown.
    floor: datetime | None = None

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Failing:
    """The passes in a row that failed to fetch one message."""

    first: datetime  # when the first of them failed
    passes: int = 0
    why: str = ""  # the last failure
    given_up: bool = False  # filed as refused (MAX_FAILED_PASSES over give_up_after)


def _span(length: timedelta) -> str:
    """A duration in words: ``10 min``, ``45 s``."""
    seconds = max(0, round(length.total_seconds()))
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no detail)"
    return f"{type(exc).__name__}: {text[:300]}"


def _parent(mailbox: str, name: str) -> str:
    """``name`` beside ``mailbox`` (``Gateway/Oversize`` → ``Gateway/Unreadable``)."""
    return f"{mailbox.rsplit('/', 1)[0]}/{name}" if "/" in mailbox else name


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
    unreadable_mailbox: str = ""  # "": beside oversize_mailbox (Gateway/Unreadable)
    poll_seconds: float = 30.0
    ssl_context: ssl.SSLContext | None = None  # None: the system's CAs, host name checked
    limits: Limits = DEFAULT_LIMITS
    clock: Callable[[], datetime] = _utcnow
    timeout: float = 60.0  # seconds for any one network read or write
    fetch_chunk: int = FETCH_CHUNK  # UIDs per UID FETCH of sizes
    search_window: int = SEARCH_WINDOW  # UIDs per UID SEARCH
    give_up_after: timedelta = GIVE_UP_AFTER  # failing passes must span this long (and more)
    _caps: set[bytes] = field(default_factory=set, init=False, repr=False)
    _separator: str | None = field(default=None, init=False, repr=False)
    _ready: set[str] = field(default_factory=set, init=False, repr=False)  # mailboxes that exist
    #: (UIDVALIDITY, UID) → the passes that failed on it in a row (:meth:`_failed`).
    _failures: dict[tuple[int, int], _Failing] = field(default_factory=dict, init=False, repr=False)
    _left: set[tuple[int, int]] = field(default_factory=set, init=False, repr=False)
    #: When this process's last complete pass began (the next pass's floor).
    _previous_pass: datetime | None = field(default=None, init=False, repr=False)
    where: str = field(init=False)  # user@host/mailbox: the MailboxState key, source key prefix

    def __post_init__(self) -> None:
        if self.security not in SECURITY:
            raise ConfigError(
                f"IMAP security {self.security!r} is not one of {', '.join(SECURITY)}"
            )
        if not self.unreadable_mailbox:
            self.unreadable_mailbox = _parent(self.oversize_mailbox, "Unreadable")
        boxes = (self.mailbox, self.done_mailbox, self.oversize_mailbox, self.unreadable_mailbox)
        if len(set(boxes)) != 4:
            raise ConfigError(
                f"the IMAP mailbox ({self.mailbox}), done mailbox ({self.done_mailbox}), "
                f"oversize mailbox ({self.oversize_mailbox}) and unreadable mailbox "
                f"({self.unreadable_mailbox}) must be four different mailboxes"
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
            link = None
            try:
                link = _Link(self._connect())
                while not stop.is_set():
                    result = self._poll(link)
                    failures = 0
                    if result.moved or result.oversize:
                        # Mail that came during the pass was announced (EXISTS) in the answers
                        # to its own commands, where imaplib drops it: IDLE would not hear of
                        # it. Look again until a pass moves nothing.
                        continue
                    self._wait(link.client, stop)
            except NETWORK_ERRORS as exc:
                failures += 1
                log.error("IMAP %s (port %d): %s", self.where, self.port, _one_line(exc))
            except Exception as exc:  # a bug or an answer we do not understand: same retry
                failures += 1
                log.error(
                    "IMAP %s: unexpected %s", self.where, _one_line(exc), exc_info=failures == 1
                )
            finally:
                if link is not None:
                    self._close(link.client)
            if failures and not stop.is_set():
                delay = outbound.pause(failures, first=1.0, most=BACKOFF_MAX)
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
        link = _Link(self._connect())
        try:
            return self._poll(link)
        finally:
            self._close(link.client)

    def _poll(self, link: _Link) -> PollResult:
        started = self.clock()
        selected = link.client.select_folder(self._name(self.mailbox))
        p = _Pass(int(selected[b"UIDVALIDITY"]), floor=self._previous_pass)
        error, reset = None, False
        try:
            reset, last_uid, recorded = self._check_state(p.uidvalidity)
            if p.floor is None:  # the first pass of this process: the last one recorded
                p.floor = recorded
            for chunk in self._uids(link, selected):
                sizes = self._sizes(link, p, chunk)
                for uid in chunk:
                    if uid in sizes or uid in p.failed:  # else expunged by someone meanwhile
                        self._one(link, p, uid, sizes.get(uid))
            if p.expunge:  # no UIDPLUS: every \Deleted message here was moved by this pass
                link.client.expunge()
            if p.highest > last_uid:
                self._save_state(p.uidvalidity, p.highest)
            # What failed in this pass is counted on; the rest was taken in or has gone.
            self._failures = {
                k: v
                for k, v in self._failures.items()
                if k[0] == p.uidvalidity and k[1] in p.failed
            }
            self._left &= set(self._failures)
            self._previous_pass = started
        except TransientError as exc:
            error = str(exc)
            log.warning("IMAP %s: %s; the rest waits for the next poll", self.where, error)
        return PollResult(**p.counts, uidvalidity_reset=reset, error=error)

    def _uids(self, link: _Link, selected: dict[bytes, Any]) -> Iterator[list[int]]:
        """The UIDs of the selected mailbox's messages at the start of the pass, ascending, at
        most :attr:`fetch_chunk` at a time (step 2); none if it holds no message."""
        exists = int(selected.get(b"EXISTS", 0))
        if exists < 1:
            return
        client = link.client
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
            uids = sorted(link.client.search(["UID", f"{start}:{end}"]))  # (a new link, maybe)
            for at in range(0, len(uids), self.fetch_chunk):
                yield uids[at : at + self.fetch_chunk]

    def _sizes(self, link: _Link, p: _Pass, chunk: list[int]) -> dict[int, int]:
        """RFC822.SIZE of the UIDs of ``chunk`` the server returns; those it does not are in
        ``p.failed``. One FETCH for the chunk; one per UID if that fails (and always for a
        UID that failed in an earlier pass: it would fail the chunk again)."""
        sizes: dict[int, int] = {}
        alone = [uid for uid in chunk if (p.uidvalidity, uid) in self._failures]
        together = [uid for uid in chunk if (p.uidvalidity, uid) not in self._failures]
        if together:
            try:
                sizes = self._fetch_sizes(link.client, together)
            except NOT_RETURNED as exc:
                log.warning(
                    "IMAP %s: the sizes of UIDs %d–%d could not be fetched together (%s); "
                    "one at a time", self.where, together[0], together[-1], _one_line(exc),
                )  # fmt: skip
                if isinstance(exc, LOST):
                    self._reconnect(link, p.uidvalidity)
                alone = chunk
        for uid in alone:
            key = (p.uidvalidity, uid)
            if (failing := self._failures.get(key)) and failing.given_up:
                p.failed[uid] = failing.why  # not fetched again
                continue
            try:
                sizes.update(self._fetch_sizes(link.client, [uid]))
            except NOT_RETURNED as exc:
                self._not_returned(link, p, uid, "its size", exc)
        return sizes

    @staticmethod
    def _fetch_sizes(client: Any, uids: list[int]) -> dict[int, int]:
        found = client.fetch(uids, ["RFC822.SIZE"])
        return {
            uid: found[uid][b"RFC822.SIZE"] for uid in uids if b"RFC822.SIZE" in found.get(uid, {})
        }

    def _not_returned(
        self, link: _Link, p: _Pass, uid: int, what: str, exc: OSError | IMAPClientError
    ) -> None:
        """The server did not return ``what`` of ``uid``: noted for this pass; after a hang-up,
        logged in again (the others go on)."""
        p.failed[uid] = f"the server did not return {what}: {_one_line(exc)}"
        if isinstance(exc, LOST):
            self._reconnect(link, p.uidvalidity)

    def _one(self, link: _Link, p: _Pass, uid: int, size: int | None) -> None:
        """Steps 3–7 for one message (``size`` ``None``: the server did not return it)."""
        limit = self.limits.max_message_bytes
        key = self._key(p.uidvalidity, uid)
        if size is None or size <= limit:
            known = self._known(key)
            if known is not None:
                if self._copied_before(link.client, uid):
                    log.info(
                        "IMAP %s UID %d: already intake #%d, copied to %s and flagged \\Deleted "
                        "by an earlier pass; expunged", self.where, uid, known, self.done_mailbox,
                    )  # fmt: skip
                    p.expunge |= self._expunge(link.client, uid)
                    p.count("already_known")
                    p.count("moved")
                    p.highest = uid
                    return
                log.info("IMAP %s UID %d: already intake #%d; moving it", self.where, uid, known)
                self._to(link, p, uid, self.done_mailbox, "already_known")
                return
        if size is None:
            self._failed(link, p, uid, None)
            return
        if size > limit:
            self._oversize(link, p, uid, f"{size} bytes", size)
            return
        try:
            fetched = self._fetch(link.client, uid)
        except NOT_RETURNED as exc:
            self._not_returned(link, p, uid, "the message", exc)
            self._failed(link, p, uid, size)
            return
        if fetched is None:  # expunged by someone else meanwhile
            return
        raw, arrived = fetched
        if len(raw) > limit:  # RFC822.SIZE said less
            self._oversize(link, p, uid, f"more than {limit} bytes (RFC822.SIZE said {size})", size)
            return
        # One that an earlier pass saw (and could not fetch) was there before this pass's floor.
        floor = None if (p.uidvalidity, uid) in self._failures else p.floor
        transport = self._transport(link.client, uid, p.uidvalidity, arrived, floor)
        number = intake.accept(self.db, raw, transport, source_key=key)
        log.info("IMAP %s UID %d: taken in as intake #%d", self.where, uid, number)
        self._to(link, p, uid, self.done_mailbox, "taken")

    def _to(self, link: _Link, p: _Pass, uid: int, mailbox: str, counter: str | None) -> None:
        p.expunge |= self._move(link.client, uid, mailbox)
        if counter is not None:
            p.count(counter)
        if mailbox == self.done_mailbox:
            p.count("moved")
            p.highest = uid

    def _oversize(self, link: _Link, p: _Pass, uid: int, how: str, size: int) -> None:
        """Step 3: filed as refused with its header block, then moved to the oversize mailbox."""
        limit = self.limits.max_message_bytes
        error = LimitExceeded(
            f"the message is {how}, over the limit of {limit} bytes; it was not taken in"
        )
        header = self._header(link, p, uid)
        alert = oversize_alert(
            self.where, uid, p.uidvalidity, how, limit, self.oversize_mailbox, self.clock()
        )
        seq, _ = self._refuse(link.client, uid, p.uidvalidity, error, size, header, alert)
        log.warning(
            "IMAP %s UID %d: %s, over the %d-byte limit (max_message_bytes); not taken in: "
            "filed as refused (entry %d), moved to %s",
            self.where, uid, how, limit, seq, self.oversize_mailbox,
        )  # fmt: skip
        self._to(link, p, uid, self.oversize_mailbox, "oversize")

    def _failed(self, link: _Link, p: _Pass, uid: int, size: int | None) -> None:
        """One more pass failed on ``uid``: skipped, or after :data:`MAX_FAILED_PASSES` that
        span :attr:`give_up_after`, filed as refused and moved to the unreadable mailbox (left
        where it is if that fails)."""
        key = (p.uidvalidity, uid)
        now = self.clock()
        failing = self._failures.setdefault(key, _Failing(first=now))
        why = p.failed[uid]
        if not failing.given_up:
            failing.passes, failing.why = failing.passes + 1, why
            failing.given_up = (
                failing.passes >= MAX_FAILED_PASSES and now - failing.first >= self.give_up_after
            )
            if not failing.given_up:
                log.warning(
                    "IMAP %s UID %d: %s; skipped, tried again next pass (%d in a row since %s; "
                    "given up after %d over %s)",
                    self.where, uid, why, failing.passes, f"{failing.first:%Y-%m-%d %H:%M:%SZ}",
                    MAX_FAILED_PASSES, _span(self.give_up_after),
                )  # fmt: skip
                p.count("skipped")
                return
        span = f"{failing.passes} passes over {_span(now - failing.first)}"
        error = Unreadable(
            f"the mailbox's server did not return the message in {span} ({why}); it was not "
            "taken in"
        )
        alert = unreadable_alert(
            self.where, uid, p.uidvalidity, f"{span} ({why})", self.unreadable_mailbox, now
        )
        seq, new = self._refuse(link.client, uid, p.uidvalidity, error, size, None, alert)
        (log.error if new else log.info)(
            "IMAP %s UID %d: %s, %d passes in a row; %s as refused (entry %d), moving it to %s",
            self.where, uid, why, failing.passes, "filed" if new else "already filed", seq,
            self.unreadable_mailbox,
        )  # fmt: skip
        p.count("unreadable")
        try:
            self._to(link, p, uid, self.unreadable_mailbox, None)
        except NOT_RETURNED as exc:
            if key not in self._left:
                self._left.add(key)
                log.error(
                    "IMAP %s UID %d: could not be moved to %s either (%s); left where it is, "
                    "the move is tried again each pass",
                    self.where, uid, self.unreadable_mailbox, _one_line(exc),
                )  # fmt: skip
            if isinstance(exc, LOST):
                self._reconnect(link, p.uidvalidity)

    def _header(self, link: _Link, p: _Pass, uid: int) -> bytes | None:
        """The header block of ``uid``, at most ``max_header_bytes`` + 1 bytes; ``None`` if the
        server does not return it (the refusal is filed without it)."""
        part = f"BODY.PEEK[HEADER]<0.{self.limits.max_header_bytes + 1}>"
        try:
            data = link.client.fetch([uid], [part]).get(uid, {})
        except NOT_RETURNED as exc:
            log.warning("IMAP %s UID %d: no header block (%s)", self.where, uid, _one_line(exc))
            if isinstance(exc, LOST):
                self._reconnect(link, p.uidvalidity)
            return None
        header = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER]")), None)
        return bytes(header) if header is not None else None

    def _refuse(
        self,
        client: Any,
        uid: int,
        uidvalidity: int,
        error: GatewayError,
        size: int | None,
        header: bytes | None,
        alert: Alert,
    ) -> tuple[int, bool]:
        """:func:`~gateway.imap_refused.file_refused` for ``uid``: ``(its seq, whether it is
        new)``."""
        transport = self._transport(client, uid, uidvalidity, None)
        fields = refused_fields(
            self._key(uidvalidity, uid), transport, error, size, header, self.limits, self.where
        )
        return file_refused(self.db, fields, self.clock(), alert)

    def _reconnect(self, link: _Link, uidvalidity: int) -> None:
        """The connection was lost (on one message): log in and SELECT again, and go on with the
        pass, unless UIDVALIDITY changed meanwhile (then the pass ends; the next starts over)."""
        log.info("IMAP %s: the connection is lost; logging in again", self.where)
        self._close(link.client)
        link.client = self._connect()
        selected = link.client.select_folder(self._name(self.mailbox))
        if int(selected[b"UIDVALIDITY"]) != uidvalidity:
            raise IMAPClientError(
                f"UIDVALIDITY of {self.mailbox} changed during the pass ({uidvalidity} → "
                f"{int(selected[b'UIDVALIDITY'])}); the next pass starts over"
            )

    def _key(self, uidvalidity: int, uid: int) -> str:
        return f"imap:{self.where}/{uidvalidity}/{uid}"

    def _fetch(self, client: Any, uid: int) -> tuple[bytes, datetime | None] | None:
        """The message (at most ``max_message_bytes`` + 1 bytes) and its INTERNALDATE (when
        the mail store took it in; ``None`` if the server gave none that reads as a moment)."""
        part = f"BODY.PEEK[]<0.{self.limits.max_message_bytes + 1}>"
        answer = client.fetch([uid], [part, "INTERNALDATE"])
        if uid not in answer:
            return None  # expunged by someone else meanwhile: no FETCH response for it
        data = answer[uid]
        body = next((v for k, v in data.items() if k.startswith(b"BODY[]")), None)
        if not isinstance(body, bytes):
            # A response for it, but no body (BODY[] NIL, or none at all): the message is
            # there and was not returned; counted as a failed pass, not taken for expunged
            # (which left it in the mailbox, unread and unsaid, pass after pass).
            raise IMAPClientError("the FETCH response for it carried no message body (NIL)")
        arrived = data.get(b"INTERNALDATE")
        aware = isinstance(arrived, datetime) and arrived.tzinfo is not None
        return bytes(body), arrived.astimezone(UTC) if aware else None

    def _transport(
        self,
        client: Any,
        uid: int,
        uidvalidity: int,
        arrived: datetime | None,
        floor: datetime | None = None,
    ) -> Transport:
        """How the message came. Its time of receipt is when the hub's mail store took it in
        (INTERNALDATE, RFC 3501 §2.3.3), not when this poller got round to it: the worker
        judges certificates, and compliance deadlines, at that moment; a poller that was down
        for an hour, or the minute past midnight, must not make a submission late or its
        certificate expired. Never later than now (a server clock ahead of ours), and never
        earlier than ``floor``, when the previous pass began: a message it did not see came
        after. INTERNALDATE is whatever put the message there says (IMAP APPEND sets any
        date, a restore or a move keeps an old one); unbounded, a message signed with a
        certificate revoked yesterday and dated last week would be judged before the
        revocation."""
        sock = client.socket()
        secure = isinstance(sock, ssl.SSLSocket) and (cipher := sock.cipher())
        tls = f"{sock.version()} {cipher[0]}" if secure and cipher else None
        extra = {"mailbox": self.mailbox, "uid": str(uid), "uidvalidity": str(uidvalidity)}
        now = self.clock()
        received = min(arrived, now) if arrived is not None else now
        if floor is not None and received < floor:
            received = floor
        return Transport(received, "imap", peer=self.host, tls=tls, extra=extra)

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
        return self._expunge(client, uid)

    def _expunge(self, client: Any, uid: int) -> bool:
        """Expunge ``uid`` (flagged \\Deleted); ``True`` when only an EXPUNGE of every
        \\Deleted message can, owed at the end of the pass (no UIDPLUS)."""
        if b"UIDPLUS" in self._caps:
            client.uid_expunge([uid])
            return False
        return True

    def _copied_before(self, client: Any, uid: int) -> bool:
        """Without MOVE, a message taken in is copied, then flagged \\Deleted, then expunged:
        one already taken in and flagged was copied by a pass that stopped before the expunge.
        Copied again, it would be in the done mailbox twice."""
        if b"MOVE" in self._caps:
            return False
        flags = client.get_flags([uid]).get(uid, ())
        return b"\\Deleted" in flags

    def _connect(self) -> Any:
        implicit = self.security == "tls"
        context = self.ssl_context if implicit else None
        client = IMAPClient(self.host, self.port, ssl=implicit, ssl_context=context, timeout=self.timeout)  # fmt: skip
        client.normalise_times = False  # INTERNALDATE with its zone, not naive local time
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

    def _check_state(self, uidvalidity: int) -> tuple[bool, int, datetime | None]:
        """``(reset, last_uid, when a pass last recorded the state)``: a new or changed
        UIDVALIDITY is recorded, from UID 0."""
        with self.db.session(read_only=True) as s:
            row = s.get(t.MailboxState, self.where)
            stored = None if row is None else (row.uidvalidity, row.last_uid)
            recorded = None if row is None else row.updated_at
        if stored is not None and stored[0] == uidvalidity:
            return False, stored[1], recorded
        if stored is not None:
            log.warning(
                "IMAP %s: UIDVALIDITY changed from %d to %d (the mailbox was recreated or "
                "restored); everything in it is taken in again",
                self.where, stored[0], uidvalidity,
            )  # fmt: skip
        self._save_state(uidvalidity, 0)
        return stored is not None, 0, recorded

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
