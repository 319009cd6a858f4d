"""The SMTP and LMTP intake listener: limits, a durable commit, a reply — nothing else.

An aiosmtpd adapter over :func:`gateway.intake.accept`. The handler checks the limits of
DESIGN §5 rule 4, commits the exact bytes received off the event loop, and answers
``250 2.0.0 queued as <n>`` only once the commit returned (rule 7). Commits are grouped
(:class:`gateway.intake.GroupCommitter`): messages that complete while one is under way share
the next transaction, and each gets its 250 — or, if it failed, its 451 — only after it.
Decryption and verification happen later, in the workers.

Replies (enhanced status codes, RFC 3463; ENHANCEDSTATUSCODES is advertised, RFC 2034)::

    250 2.0.0 queued as N       committed durably (LMTP: one such line per accepted recipient)
    451 4.3.0                   not committed: database locked, disk full, or any unexpected
                                error; generic text, nothing internal (never aiosmtpd's 500)
    552 5.3.4                   message over Limits.max_message_bytes (SIZE= or data)
    452 4.5.3                   more than max_recipients recipients (RFC 5321 §4.5.3.1.10)
    550 5.1.1                   a recipient that is neither one of the hub's addresses nor
                                postmaster (accepted bare or at a hub domain, RFC 5321 §4.5.1)
    421 4.7.0                   at connect: max_sessions open, or max_sessions_per_ip from
                                the peer's address; then closed
    421 4.4.2                   no message completed within the deadline; then closed
    500 5.5.2                   a line over 998 octets + CRLF (RFC 5321 §4.5.3.1.6)
    550 5.6.2                   bare LF or bare CR in the data (RFC 5321 §2.3.8); not stored
    501 5.5.4 / 553 5.1.3       MAIL FROM / RCPT TO syntax (the path in angle brackets)
    530 5.7.0                   STARTTLS required first
    502 5.5.1                   AUTH, when no submitters are configured (not offered)
    454 4.7.0                   AUTH while too many password checks wait, or from an address
                                or for a login locked out by failures (gateway.submitters)

aiosmtpd's own reply texts are rewritten in one place (:mod:`gateway.smtp_protocol`) so that
every reply carries an enhanced code and none echoes what the peer sent; the checks behind the
refusals are pure (:mod:`gateway.smtp_checks`).

Usage::

    listener = start(db, host="127.0.0.1", port=0, hub_addresses=["hub@x.gov.vn"],
                     limits=Limits())
    listener.port   # the bound port
    listener.stop()
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from archive.db import Database
from archive.records import Transport
from formats.errors import ConfigError, DatabaseDamaged, TransientError
from formats.limits import Limits
from gateway import intake
from gateway.smtp_checks import SessionGate, check_data, is_mailbox, peer_parts, safe_text
from gateway.smtp_protocol import TRANSIENT, IntakeLMTP, IntakeSMTP, PeerFaults

log = logging.getLogger(__name__)

#: RFC 5321 §4.5.3.1.8 requires at least 100; a hub has a handful of addresses, so a message
#: naming more than this many is not for us (answered 452 4.5.3, RFC 5321 §4.5.3.1.10).
MAX_RECIPIENTS = 50

#: Seconds a session may stay idle, or wait between two blocks of message data. RFC 5321
#: §4.5.3.2 asks for at least 5 minutes. (The commit has its own budget, COMMIT_TIMEOUT.)
SESSION_TIMEOUT = 300.0

#: What each open session is told when the listener stops (RFC 5321 §3.8).
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"

#: Seconds the STARTTLS handshake may take (at most the session timeout; asyncio's own limit is
#: 60 s). A handshake takes milliseconds; a peer that sends STARTTLS and then nothing holds a
#: session slot for this long, not for the session timeout.
TLS_HANDSHAKE_TIMEOUT = 30.0

#: The deadline of a session, as a multiple of its (idle) timeout: from its start, or from the
#: reply to its last committed message, to the end line of its next message (15 minutes at the
#: default timeout; a 32 MiB message needs ~40 KB/s). The idle timeout is re-armed by every
#: command and block of data, refused ones too, so without it a peer that sends a NOOP, a
#: refused command or a byte of data now and then held its session slot for ever (Slowloris).
#: Only a committed message is progress: a relay that keeps sending mail keeps its session.
DEADLINE_TIMEOUTS = 3

#: Seconds the commit of one message may take (the session timer, re-armed as the data
#: arrives, is set to this once it has all arrived). Far above the worst commit time: SQLite
#: waits up to busy_timeout (5 s) for the write lock, a message may wait for the group before
#: its own, and a PostgreSQL commit or a slow fsync takes seconds. Past it the session is
#: closed without a reply (the peer sends the message again; the workers file it once).
COMMIT_TIMEOUT = 120.0

#: Sessions open at once, in all and from one IP address; over either cap a connection is
#: answered 421 4.7.0 and closed (DESIGN §5 rule 4). A session in DATA holds up to 4/3 of
#: max_message_bytes in memory (a message of the limit, dot-stuffed; gateway.smtp_data),
#: so this bounds memory too. Postfix's own defaults, which
#: the relays in front of the hub use: 100 smtpd processes, 20 connections to one
#: destination (default_destination_concurrency_limit).
MAX_SESSIONS = 100
MAX_SESSIONS_PER_IP = 20

#: Messages one session may carry. A relay reuses its connection for as long as it has mail
#: (Postfix sets no count by default): at 300 msgs/s, five minutes of it is 90,000.
MESSAGES_PER_SESSION = 100_000

#: Commands one session may send (aiosmtpd ``command_call_limit``); over it: 421 and close.
#: MAIL, RCPT and DATA make progress and have budgets of their own; the rest do not.
COMMAND_LIMITS: dict[str, int] = {
    "*": 1000,
    "MAIL": MESSAGES_PER_SESSION,
    "RCPT": MESSAGES_PER_SESSION,  # with several recipients a message, fewer messages
    "DATA": MESSAGES_PER_SESSION,
    "EHLO": 10,
    "HELO": 10,
    "LHLO": 10,
    "STARTTLS": 2,
    "NOOP": 100,
    "RSET": 100,
    "VRFY": 10,
    "HELP": 10,
    "EXPN": 10,
    "AUTH": 3,
}


#: Bigger message data is checked in a thread (~1.5 ms per MiB), off the event loop.
_INLINE_CHECK_BYTES = 1024 * 1024


# --- the handler ------------------------------------------------------------------------------


class IntakeHandler:
    """aiosmtpd handler: limits, durable commit, reply (STYLE habit 3)."""

    def __init__(
        self,
        db: Database,
        *,
        hub_addresses: Iterable[str],
        limits: Limits,
        max_recipients: int = MAX_RECIPIENTS,
        executor: ThreadPoolExecutor | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        committer: intake.GroupCommitter | None = None,
    ) -> None:
        self.db = db
        self.hub_addresses = frozenset(a.strip().lower() for a in hub_addresses)
        if not self.hub_addresses:
            raise ConfigError("the listener needs at least one hub address to accept mail for")
        #: RFC 5321 §4.5.1: "postmaster" (any case), bare or at one of the hub's domains, MUST
        #: be accepted. Its mail is taken in as any message is; the workers decide on what it
        #: holds: a report or a bounce (plain, unsigned mail) is quarantined with its bytes, for
        #: an administrator, with no receipt (DESIGN §5 rules 1, 7).
        self.postmasters = frozenset(
            {"postmaster"} | {f"postmaster@{a.rpartition('@')[2]}" for a in self.hub_addresses}
        )
        self.limits = limits
        self.max_recipients = max_recipients
        self.executor = executor
        self.clock = clock
        #: The group commit (one transaction at a time in ``executor`` unless given).
        self.committer = committer or intake.GroupCommitter(db, executor)
        #: Whether SMTP AUTH is offered (submitters are configured).
        self.auth = False
        #: DATA replies by code ("250", "451", "552" …), for the metrics endpoint.
        self.replies: Counter[str] = Counter()
        #: Commits under way (awaited by a graceful stop).
        self.inflight: set[asyncio.Future[int]] = set()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # AUTH is offered only when submitters are configured (gateway.submitters), and
        # aiosmtpd offers it only once TLS is up.
        lines = [r for r in responses if self.auth or not r[4:].upper().startswith("AUTH")]
        lines.insert(-1, "250-ENHANCEDSTATUSCODES")
        if isinstance(server, LMTP):
            # RFC 2033 §5: an LMTP server MUST support PIPELINING (RFC 2920). The session reads
            # commands in order and leaves what follows the data for the next one.
            lines.insert(-1, "250-PIPELINING")
        return lines

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if address != "<>" and not is_mailbox(address):  # "<>": the null reverse-path
            return "553 5.1.3 Bad sender address syntax"
        login = session.auth_data if session.authenticated else None
        if login is not None and address.strip("<>").lower() != login:
            return "553 5.7.1 Sender address is not the authenticated submitter's"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.max_recipients} per message)"
        if address.lower() in self.postmasters:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return "250 2.1.5 Recipient OK (postmaster)"
        if not is_mailbox(address):
            return "553 5.1.3 Bad recipient address syntax"
        if address.lower() not in self.hub_addresses:
            return f"550 5.1.1 <{safe_text(address)}>: no such recipient here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            reply = await self._commit(session, envelope, lmtp=isinstance(server, LMTP))
        except (TransientError, DatabaseDamaged) as exc:
            log.warning("%s: not stored: %s", _peer(session), exc)
            reply = TRANSIENT
        except Exception:
            log.exception("%s: not stored: unexpected error", _peer(session))
            reply = TRANSIENT
        self.replies[reply[:3]] += 1
        if isinstance(server, LMTP):
            # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order. All of them share
            # the one commit, so they all say the same.
            return "\r\n".join([reply] * max(1, len(envelope.rcpt_tos)))
        return reply

    async def _commit(self, session: Session, envelope: Envelope, *, lmtp: bool) -> str:
        raw = envelope.original_content
        if not isinstance(raw, bytes):  # decode_data=False guarantees bytes
            raise TypeError("message data is not bytes")
        if len(raw) > _INLINE_CHECK_BYTES:
            refusal = await asyncio.to_thread(check_data, raw, self.limits)
        else:
            refusal = check_data(raw, self.limits)
        if refusal is not None:
            log.info("%s: refused: %s", _peer(session), refusal)
            return refusal
        host, port = peer_parts(session.peer)
        transport = Transport(
            received_at=self.clock(),
            protocol="lmtp" if lmtp else "smtp",
            peer=host,
            helo=session.host_name,
            mail_from=envelope.mail_from,
            rcpt_to=tuple(envelope.rcpt_tos),
            tls=_tls(session),
            extra=({"peer_port": port} if port else {})
            | ({"auth": str(session.auth_data)} if session.authenticated else {}),
        )
        # Off the event loop (a slow fsync must not stall the other sessions), and grouped:
        # messages whose data completes while a commit is under way share the next one. The
        # future is resolved only once that transaction committed (or failed: then 451).
        future = self.committer.submit(raw, transport)
        self.inflight.add(future)
        future.add_done_callback(self.inflight.discard)
        number = await future
        postmaster = any(r.lower() in self.postmasters for r in envelope.rcpt_tos)
        log.info(
            "%s: queued as %d (%d bytes%s)",
            transport.peer,
            number,
            len(raw),
            ", for postmaster" if postmaster else "",
        )
        return f"250 2.0.0 queued as {number}"


def _peer(session: Session) -> str:
    return peer_parts(session.peer)[0]


def _tls(session: Session) -> str | None:
    extra: Any = session.ssl
    if not extra:
        return None
    ssl_object = extra.get("ssl_object")
    cipher = extra.get("cipher")
    version = ssl_object.version() if ssl_object is not None else None
    name = cipher[0] if cipher else None
    return " ".join(str(p) for p in (version, name) if p) or "TLS"


# --- the listener -----------------------------------------------------------------------------


class Listener:
    """A running SMTP/LMTP listener: its own thread and event loop (Controller-like).

    ``port`` is the bound port (useful with ``port=0``). :meth:`stop` stops accepting, lets
    commits under way finish (so their 250 still goes out), then closes the sessions.
    """

    def __init__(
        self,
        handler: IntakeHandler,
        protocol: Callable[[], SMTP],
        *,
        host: str,
        port: int,
        executor: ThreadPoolExecutor,
        grace: float = 10.0,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.grace = grace
        self._protocol = protocol
        self._executor = executor
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._transports: set[asyncio.BaseTransport] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Listener:
        if self._thread is not None:
            raise RuntimeError("the listener is already running")
        self._thread = threading.Thread(target=self._run, name="gateway-smtp", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            self._executor.shutdown(wait=True)
            raise self._error
        return self

    def stop(self) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        loop.call_soon_threadsafe(stopping.set)
        thread.join()
        self._thread = None
        self._executor.shutdown(wait=True)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _factory(self) -> SMTP:
        server = self._protocol()
        self._sessions.add(server)
        # Forget transports already closed; keep the live ones until stop() closes them.
        self._transports.difference_update([x for x in self._transports if x.is_closing()])
        server.transports = self._transports  # type: ignore[attr-defined]
        return server

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._factory, host=self.host, port=self.port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            inflight = list(self.handler.inflight)
            if inflight:
                await asyncio.wait(inflight, timeout=self.grace)
                await asyncio.sleep(0.05)  # let the sessions send their replies
            # A connection accepted just before close() gets its transport a tick or two
            # later (connection_made is scheduled): close in a few rounds, not once. Each
            # session is told first (RFC 5321 §3.8: 421 before closing; its client tries again
            # later, or elsewhere), mid-transaction or between messages.
            for _ in range(3):
                for session in list(self._sessions):
                    transport = session.transport
                    if isinstance(transport, asyncio.WriteTransport):
                        if not transport.is_closing():
                            transport.write(SHUTTING_DOWN)
                        transport.close()
                await asyncio.sleep(0.01)
            await server.wait_closed()
            # Cancel the sessions, then sweep a few times: a connection accepted in the last
            # moments gets its transport (connection_made) and its task only a tick later.
            # After STARTTLS the socket's own transport sits under the TLS one: abort both
            # (a TLS close would wait for the peer's close_notify, which may never come).
            current = asyncio.current_task()
            for _ in range(5):
                for known in list(self._transports):
                    if isinstance(known, asyncio.Transport):
                        known.abort()
                for session in list(self._sessions):
                    for transport in (
                        session.transport,
                        getattr(session, "_original_transport", None),
                    ):
                        if isinstance(transport, asyncio.Transport):
                            transport.abort()
                tasks = [t for t in asyncio.all_tasks() if t is not current]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(0.01)


def start(
    db: Database,
    *,
    host: str,
    port: int,
    hub_addresses: Sequence[str],
    limits: Limits,
    tls_context: ssl.SSLContext | None = None,
    require_tls: bool = False,
    lmtp: bool = False,
    max_recipients: int = MAX_RECIPIENTS,
    timeout: float = SESSION_TIMEOUT,
    commit_timeout: float = COMMIT_TIMEOUT,
    max_sessions: int = MAX_SESSIONS,
    max_sessions_per_ip: int = MAX_SESSIONS_PER_IP,
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
    deadline: float | None = None,
    hostname: str | None = None,
    commit_threads: int | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    authenticator: Callable[..., Any] | None = None,
    require_auth: bool = False,
) -> Listener:
    """Start an SMTP (or, with ``lmtp=True``, LMTP) intake listener and return it running.

    ``hostname`` is the name in the greeting (default: the domain of the first hub address;
    no DNS lookup). ``commit_threads``, the group transactions under way at once, defaults to
    1 on SQLite (one writer at a time anyway: queue in Python, not on the busy lock; messages
    arriving meanwhile are committed together next) and 8 on PostgreSQL. ``timeout`` is how
    long a session may idle or wait between two blocks of data, ``commit_timeout`` how long one
    commit may take, ``tls_handshake_timeout`` the STARTTLS handshake (at most ``timeout``);
    ``deadline`` (default :data:`DEADLINE_TIMEOUTS` times ``timeout``) is how long a session may
    go without completing a message (421 4.4.2 past it); ``max_sessions`` and
    ``max_sessions_per_ip`` cap the sessions at once (421 4.7.0 at connect over either).
    """
    if require_tls and tls_context is None:
        raise ConfigError("require_tls needs a tls_context (a certificate and key for STARTTLS)")
    if require_tls and lmtp:
        # aiosmtpd allows only NOOP, EHLO, STARTTLS, QUIT before STARTTLS: LHLO is refused.
        raise ConfigError("LMTP with required STARTTLS is not supported; LMTP is a local hand-off")
    if not hub_addresses:
        raise ConfigError("the listener needs at least one hub address to accept mail for")
    threads = commit_threads or (1 if db.dialect == "sqlite" else 8)
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="intake-commit")
    committer = intake.GroupCommitter(db, executor, concurrency=threads)
    handler = IntakeHandler(
        db,
        hub_addresses=hub_addresses,
        limits=limits,
        max_recipients=max_recipients,
        executor=executor,
        clock=clock,
        committer=committer,
    )
    if require_auth and authenticator is None:
        raise ConfigError("require_auth needs submitters (an auth_file)")
    if authenticator is not None and (tls_context is None or lmtp):
        raise ConfigError("SMTP AUTH needs STARTTLS (a TLS certificate) and is not for LMTP")
    handler.auth = authenticator is not None
    name = hostname or hub_addresses[0].rpartition("@")[2] or "localhost"
    kind = IntakeLMTP if lmtp else IntakeSMTP
    try:
        gate = SessionGate(max_sessions, max_sessions_per_ip, hostname=name)
    except ValueError as exc:
        raise ConfigError(f"listener: {exc}") from None
    faults = PeerFaults()
    session_deadline = deadline if deadline is not None else DEADLINE_TIMEOUTS * timeout
    if not (timeout > 0 and tls_handshake_timeout > 0 and session_deadline > 0):
        raise ConfigError("listener: the timeouts and the deadline must be more than 0 seconds")

    def protocol() -> SMTP:
        return kind(
            handler,
            data_size_limit=limits.max_message_bytes,
            enable_SMTPUTF8=False,
            decode_data=False,
            hostname=name,
            ident="LMTP" if lmtp else "ESMTP",
            tls_context=tls_context,
            require_starttls=require_tls,
            timeout=timeout,
            commit_timeout=commit_timeout,
            gate=gate,
            tls_handshake_timeout=tls_handshake_timeout,
            deadline=session_deadline,
            faults=faults,
            command_call_limit=COMMAND_LIMITS,
            authenticator=authenticator,
            auth_required=require_auth,
            auth_require_tls=True,
        )

    return Listener(handler, protocol, host=host, port=port, executor=executor).start()


__all__ = [
    "COMMAND_LIMITS",
    "COMMIT_TIMEOUT",
    "DEADLINE_TIMEOUTS",
    "MAX_RECIPIENTS",
    "MAX_SESSIONS",
    "MAX_SESSIONS_PER_IP",
    "SESSION_TIMEOUT",
    "TLS_HANDSHAKE_TIMEOUT",
    "IntakeHandler",
    "Listener",
    "start",
]
