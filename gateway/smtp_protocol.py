"""aiosmtpd's SMTP and LMTP with the gateway's replies (the protocol side of the listener).

Every reply carries an enhanced status code (RFC 3463) and none echoes what the peer sent:
aiosmtpd's own texts are rewritten in one place (:data:`REWRITES`, applied by ``push``), and
an unexpected error is the generic :data:`TRANSIENT` 451, never aiosmtpd's ``500 Error: (…)``.
The DATA phase is read in blocks (:mod:`gateway.smtp_data`).

A message whose data has arrived gets its reply whenever the connection still allows it
(DESIGN §5 rule 7: never committed without its 250 being at least attempted):

- the session timer is re-armed as the data arrives, and set to ``commit_timeout`` while the
  message is committed (aiosmtpd arms it only when a command line arrives, so one timer would
  cover the whole transfer and the commit);
- the commit is shielded from the session's cancellation: cancelled with the connection still
  open, the session waits for the commit and sends its reply before it ends. aiosmtpd cancels
  the session when the peer half-closes (``shutdown(SHUT_WR)`` after the end line and QUIT,
  while it reads the replies): that peer gets its reply.

It also admits a connection only within the listener's caps on sessions at once
(:class:`gateway.smtp_checks.SessionGate`; over one: ``421 4.7.0`` and closed), and runs the
AUTH password check off the event loop (:meth:`gateway.submitters.Authenticator.verify`).

A session gives its slot back however it ends: when its task ends (QUIT, the connection lost or
reset, a timer, an error, the listener stopping), not only when asyncio calls
``connection_lost`` — which Python 3.11 never does for a connection closed in the middle of a
TLS handshake, and it then wakes the handshake as if it had succeeded. Every timer that ends a
session therefore also cancels its task, and a handshake that "succeeds" on a closed connection
ends the session as a failed one does. Three timers bound a session:

- ``timeout``: idle (aiosmtpd's timer, re-armed by each command and each block of data);
- ``tls_handshake_timeout``: the STARTTLS handshake, at most the idle timeout;
- ``deadline``: from the session's start, or from the reply to its last committed message, to
  the end line of its next message. Only a committed message is progress: NOOPs, refused
  commands and data sent a byte at a time do not keep a session (and its slot) for ever. Past
  it: ``421 4.4.2`` and closed.

A peer's failures (a TLS handshake that fails or is cut off, a connection cut) are logged as one
INFO line without a traceback, for the first of a run and then at the 10th, 100th … of it
(:class:`PeerFaults`): a peer cannot fill the log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import ssl
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from typing import TYPE_CHECKING, Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    Session,
    TLSSetupException,
    syntax,
)

from gateway.smtp_checks import LINE_TOO_LONG, SessionGate, peer_parts
from gateway.smtp_data import BLOCK, read_data

if TYPE_CHECKING:
    from gateway.smtp import IntakeHandler

log = logging.getLogger("gateway.smtp")

TRANSIENT = "451 4.3.0 Temporary failure; the message was not stored, please try again later"
#: Replies a session gives, its peer's input waiting all along, before it lets the other
#: sessions run (:meth:`_Replies.push`).
PIPELINED_REPLIES = 100
#: Seconds an ended session's connection may take to send what is still written to it (a
#: last reply, a 421) before it is dropped (:func:`_drop_unsent`).
CLOSE_GRACE = 10.0


@dataclass(frozen=True)
class Rewrite:
    """Replace an aiosmtpd reply that starts with ``prefix`` (``data``: a DATA-phase reply)."""

    prefix: str
    reply: str
    data: bool = False
    #: Keep what follows the prefix (aiosmtpd's own text, never the peer's).
    keep: bool = False


#: aiosmtpd's replies → ours: an enhanced code on each, no peer text echoed, no internals.
REWRITES: tuple[Rewrite, ...] = (
    # handle_exception's default "500 Error: (Exc) text" leaks internals and bounces for good.
    Rewrite("500 Error: (", TRANSIENT),
    Rewrite("500 Error: Cannot describe error", TRANSIENT),
    Rewrite("500 Command line too long", "500 5.5.2 Command line too long"),
    Rewrite("500 Error: bad syntax", "500 5.5.2 Syntax error"),
    Rewrite("500 Error: strict ASCII mode", "500 5.5.2 Non-ASCII command; SMTPUTF8 is not offered"),
    Rewrite('500 Error: command "', "500 5.5.1 Command not recognized"),
    Rewrite("500 Error: command 'AUTH'", "502 5.5.1 AUTH is not offered"),
    Rewrite("554 Command refused due to lack of security", "554 5.7.0 TLS negotiation failed"),
    Rewrite(
        "530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"
    ),
    Rewrite("421 4.7.0 ", "421 4.7.0 Too many commands in one session; closing"),
    Rewrite("503 Error: send ", "503 5.5.1 Send EHLO, HELO or LHLO first"),
    Rewrite("503 Error: nested MAIL command", "503 5.5.1 Nested MAIL command"),
    Rewrite("503 Error: need MAIL command", "503 5.5.1 Need MAIL command"),
    Rewrite("503 Error: need RCPT command", "503 5.5.1 Need RCPT command"),
    Rewrite("501 Error: BODY can only be", "501 5.5.4 BODY must be 7BIT or 8BITMIME"),
    Rewrite("501 Error: SMTPUTF8", "501 5.5.4 SMTPUTF8 is not offered"),
    Rewrite("501 Syntax: MAIL", "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"),
    Rewrite("501 Syntax: RCPT", "501 5.5.4 Syntax: RCPT TO:<address>"),
    Rewrite("501 Syntax: ", "501 5.5.4 Syntax error in parameters"),
    Rewrite("555 MAIL FROM parameters", "555 5.5.4 MAIL FROM parameters not recognized"),
    Rewrite("555 RCPT TO parameters", "555 5.5.4 RCPT TO parameters not recognized"),
    Rewrite(
        "552 Error: message size exceeds", "552 5.3.4 Message size exceeds the limit ({size} bytes)"
    ),
    Rewrite("502 Could not VRFY", "502 5.5.4 Could not VRFY that address"),
    Rewrite("252 Cannot VRFY", "252 2.5.0 Cannot VRFY user; send the message"),
    Rewrite("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    # RFC 5321 §4.1.1.8: HELP is answered 211 or 214 (aiosmtpd: 250, and 501 for an unknown
    # command); the command list and syntax lines are aiosmtpd's own text, kept.
    Rewrite("250 Supported commands: ", "214 2.0.0 Supported commands: ", keep=True),
    Rewrite("250 Syntax: ", "214 2.0.0 Syntax: ", keep=True),
    Rewrite("501 Supported commands: ", "501 5.5.4 No help for that; supported: ", keep=True),
    Rewrite("503 Already authenticated", "503 5.5.1 Already authenticated"),
    Rewrite("501 Not enough value", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    Rewrite("501 Too many values", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    Rewrite("454 TLS not available", "454 4.7.0 TLS not available"),
    Rewrite("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
    Rewrite("221 Bye", "221 2.0.0 Bye"),
    Rewrite("250 OK", "250 2.0.0 OK"),
    Rewrite("500 Line too long", LINE_TOO_LONG, data=True),
    Rewrite(
        "552 Error: Too much mail data",
        "552 5.3.4 Message too big (at most {size} bytes)",
        data=True,
    ),
)


#: Errors that are the peer's doing, not ours: a TLS handshake that fails or is cut off, a
#: connection reset or cut mid-command. One INFO line each (rate-limited), no traceback.
PEER_ERRORS: tuple[type[BaseException], ...] = (
    TLSSetupException,
    ConnectionError,
    ssl.SSLError,
    asyncio.IncompleteReadError,
    TimeoutError,
)


class PeerFaults:
    """Logs peers' failures (:data:`PEER_ERRORS`) as one INFO line each, without a traceback,
    for the first of a run and then at the 10th, 100th, 1,000th … of it, as the session caps
    log only the first 421 of a run: 300 broken handshakes make three lines, not 600
    tracebacks. A run ends when a TLS handshake succeeds or a message is committed. One per
    listener, used on its event loop only."""

    def __init__(self) -> None:
        #: Failures since the run began.
        self.in_a_row = 0

    def note(self, peer: str, error: BaseException) -> None:
        self.in_a_row += 1
        if str(self.in_a_row).rstrip("0") == "1":  # 1, 10, 100 …
            log.info(
                "%s: %s (%d in a row; logged at the 1st, 10th, 100th …)",
                peer,
                describe(error),
                self.in_a_row,
            )

    def clear(self) -> None:
        self.in_a_row = 0


def describe(error: BaseException) -> str:
    """A peer's failure in a few words: what failed and the library's reason (no peer text)."""
    what = "TLS handshake failed" if isinstance(error, TLSSetupException) else "connection failed"
    cause = error.__cause__ if isinstance(error, TLSSetupException) else error
    if cause is None:
        return what
    reason = str(cause).strip()
    reason = f"{type(cause).__name__}: {reason}" if reason else type(cause).__name__
    return f"{what} ({reason[:200]})"


def angle_path(argument: str) -> bool:
    """Whether a MAIL FROM/RCPT TO argument (after ``FROM:``/``TO:``) opens with a path in angle
    brackets, closed (RFC 5321 §4.1.2: ``Path = "<" [ A-d-l ":" ] Mailbox ">"``). aiosmtpd's
    parser also takes ``a@b`` and ``<a@b`` (no closing bracket) for the address ``a@b``."""
    text = argument.lstrip()
    if not text.startswith("<"):
        return False
    quoted = escaped = False
    for char in text[1:]:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return True
    return False


class _Replies:
    """Mixed into aiosmtpd's SMTP/LMTP: our replies, a 451 for anything unexpected, the DATA
    phase read in blocks (:mod:`gateway.smtp_data`), timed and shielded, the session caps, the
    timers that bound a session and the AUTH check off the event loop (module docstring)."""

    data_size_limit: int | None
    envelope: Envelope | None
    session: Session | None
    event_handler: IntakeHandler
    transport: asyncio.BaseTransport | None
    hostname: str
    loop: asyncio.AbstractEventLoop
    tls_context: ssl.SSLContext | None
    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter
    _handler_coroutine: asyncio.Task[None] | None
    _timeout_handle: asyncio.TimerHandle | None
    _timeout_duration: float
    _tls_protocol: Any
    _original_transport: asyncio.BaseTransport | None

    #: aiosmtpd sizes the session's stream with this. Its own DATA reader (replaced below) is
    #: the only other user; lines are held to 998 octets by :func:`check_data`, and command
    #: lines to aiosmtpd's command size limits.
    line_length_limit = BLOCK

    #: The listener's set of live transports (so that stop() can close every one).
    transports: set[asyncio.BaseTransport] | None = None

    #: Whether message data is being received (from 354 to the end line).
    _receiving = False
    #: Whether the data is being committed (the session timer is the commit's budget then).
    _committing = False
    #: Replies given in a row with the peer's input waiting (:data:`PIPELINED_REPLIES`).
    _pipelined = 0

    def __init__(
        self,
        handler: Any,
        *,
        commit_timeout: float,
        gate: SessionGate | None = None,
        tls_handshake_timeout: float | None = None,
        deadline: float | None = None,
        faults: PeerFaults | None = None,
        **options: Any,
    ) -> None:
        super().__init__(handler, **options)  # type: ignore[call-arg]
        #: The session's own command line limits. aiosmtpd keeps one dict on its class, which
        #: every session's EHLO added to and every new connection cleared: one peer's EHLOs
        #: lengthened the MAIL lines all sessions may send (until SIZE= held more digits than
        #: int() reads, and MAIL got 451 with a traceback).
        self.command_size_limits: dict[str, int] = collections.defaultdict(
            lambda: SMTP.command_size_limit
        )
        #: Seconds one commit may take before the session is closed without its reply.
        self.commit_timeout = commit_timeout
        #: The listener's caps on sessions at once; ``_admitted`` is the address it counted.
        self.gate = gate
        self._admitted: str | None = None
        self._refused = False
        #: The peer's address, for the log (the transport forgets it once closed).
        self.peer_address = "?"
        #: Seconds the STARTTLS handshake may take (at most the idle timeout); None: that.
        self.tls_handshake_timeout = tls_handshake_timeout
        #: Seconds from the start, or from the last committed message, to the next message's
        #: end line (module docstring); None: no deadline.
        self.deadline = deadline
        self._deadline_at = 0.0
        self._deadline_handle: asyncio.TimerHandle | None = None
        #: The listener's log of peers' failures.
        self.faults = faults or PeerFaults()

    # --- the session's life: admitted, timed, ended however it ends ---------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.session is None  # STARTTLS calls this again, for the TLS layer
        if first:
            self.peer_address = _address(transport)
        if first and self.gate is not None:
            peer = self.peer_address
            refusal = self.gate.enter(peer)
            if refusal is not None:  # over a cap: 421 at once, no session
                if self.gate.refused_in_a_row == 1:  # not a line per connection of a flood
                    log.warning("%s: %s (no more logged until one is admitted)", peer, refusal)
                self._refused = True
                if isinstance(transport, asyncio.WriteTransport):
                    transport.write(refusal.encode("ascii") + b"\r\n")
                transport.close()
                return
            self._admitted = peer
        if self.transports is not None:
            self.transports.add(transport)
        super().connection_made(transport)  # type: ignore[misc]
        if first:
            if self._handler_coroutine is not None:
                self._handler_coroutine.add_done_callback(self._session_ended)
            if self.deadline is not None:
                self._arm_deadline(self.loop.time() + self.deadline)
        else:
            self.faults.clear()  # a handshake that succeeded ends a run of failures

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._leave_gate()
        self._stop_deadline()
        super().connection_lost(error)  # type: ignore[misc]

    def _session_ended(self, task: asyncio.Task[None]) -> None:
        """The session's task has ended, whichever way: its slot comes back (connection_lost may
        never come, module docstring), and its connection is closed if it is not already."""
        if not task.cancelled():
            error = task.exception()  # retrieved, so that asyncio does not log it again
            if error is not None and not isinstance(error, PEER_ERRORS):
                log.error("SMTP session ended by an unexpected error", exc_info=error)
        self._leave_gate()
        self._stop_deadline()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        # close() keeps the socket until what was written has gone: a peer that reads nothing
        # (its window shut) would hold it, and its buffers, for good once its slot is back, and
        # enough of them would leave the listener no descriptor to accept with.
        held = {x for x in (self.transport, self._original_transport) if x is not None}
        if held:
            self.loop.call_later(CLOSE_GRACE, _drop_unsent, held)

    def _leave_gate(self) -> None:
        if self._admitted is not None and self.gate is not None:
            self.gate.leave(self._admitted)
            self._admitted = None

    def _end_session(self) -> None:
        """Cancel the session's task (its transport is closed or closing): it ends, and
        :meth:`_session_ended` gives its slot back, even if connection_lost never comes."""
        task = self._handler_coroutine
        if task is not None and not task.done():
            task.cancel()

    def _timeout_cb(self) -> None:
        # aiosmtpd closes the transport, without a word, and counts on connection_lost to end
        # the session. Closed mid-handshake, a TLS transport never calls it (module docstring).
        transport = self.transport
        if (
            isinstance(transport, asyncio.WriteTransport)
            and not transport.is_closing()
            and not self._committing  # a commit over its budget: closed without a reply
        ):
            # RFC 5321 §4.2.3 / §3.8, as the deadline's: 421, then the channel is closed.
            reply = f"421 4.4.2 {self.hostname} Timeout, nothing received; closing"
            transport.write(reply.encode("ascii", "replace") + b"\r\n")
        super()._timeout_cb()  # type: ignore[misc]
        self._end_session()

    def _arm_deadline(self, at: float) -> None:
        self._stop_deadline()
        self._deadline_at = at
        self._deadline_handle = self.loop.call_at(at, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None

    def _deadline_passed(self) -> None:
        """No message completed in time (module docstring): 421 4.4.2, closed, ended."""
        self._deadline_handle = None
        transport = self.transport
        log.info(
            "%s: no message completed within %g s; session closed (421 4.4.2)",
            self.peer_address,
            self.deadline,
        )
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            # RFC 5321 §4.2.3 / §3.8: 421 closes the channel; X.4.2 (RFC 3463): bad connection.
            reply = f"421 4.4.2 {self.hostname} No message completed in time; closing"
            transport.write(reply.encode("ascii", "replace") + b"\r\n")
            transport.close()
        self._end_session()

    def data_received(self, data: bytes) -> None:
        if self._receiving:
            # RFC 5321 §4.5.3.2.5: the data timeout runs from the last block received, not from
            # the DATA command: a transfer that keeps arriving is not cut off (the deadline
            # still bounds it).
            self._reset_timeout()  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._original_transport is not None:
            # RFC 3207 §4.2: no STARTTLS once TLS is on (aiosmtpd would stack a second TLS
            # layer on the first, and a failed inner handshake logs two tracebacks).
            await self.push("554 5.5.1 TLS already active")
            return
        if not arg and self.tls_context and self.tls_handshake_timeout:
            # The handshake has its own timer, at most the idle one (asyncio's own is 60 s).
            # connection_made sets the idle timer again once the handshake has succeeded.
            self._reset_timeout(min(self.tls_handshake_timeout, self._timeout_duration))  # type: ignore[attr-defined]
        await super().smtp_STARTTLS(arg)  # type: ignore[misc]
        if self._tls_protocol is not None and (
            self.transport is None or self.transport.is_closing()
        ):
            # Closed during the handshake (a timer, the listener stopping): Python 3.11 wakes
            # the handshake as if it had succeeded and never calls connection_lost. Ended as a
            # failed handshake is (aiosmtpd closes the connection and calls connection_lost).
            raise TLSSetupException("the connection was closed during the TLS handshake")

    # --- replies ------------------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            # Nothing more can be said (asyncio's TLS transport even raises AttributeError when
            # written to once closed): the session ends, as when the peer resets it.
            raise ConnectionResetError("the connection is closing")
        if isinstance(status, str):
            status = self.rewrite(status)
            if not status.isascii():  # replies are ASCII (no SMTPUTF8): never fail on one
                status = status.encode("ascii", "replace").decode("ascii")
        await super().push(status)  # type: ignore[misc]
        # While the stream holds more of what the peer sent, reading it does not wait, and
        # writing does not while the peer reads its replies: a peer pipelining thousands of
        # commands kept the event loop to itself (an honest sender waited 130 s behind five).
        # So every PIPELINED_REPLIES replies given without waiting for input, the other
        # sessions run. Not at every reply: a client that sends its whole session at once and
        # half-closes is cancelled at the first wait after its EOF (aiosmtpd), and a few
        # commands and a message must still be answered as they were.
        # (asyncio's StreamReader holds what is read and not yet taken in ``_buffer``; should
        # that change, sessions simply never yield here, as before.)
        if getattr(self._reader, "_buffer", None):
            self._pipelined += 1
            if self._pipelined >= PIPELINED_REPLIES:
                self._pipelined = 0
                await asyncio.sleep(0)
        else:
            self._pipelined = 0

    def rewrite(self, status: str) -> str:
        for rule in REWRITES:
            if status.startswith(rule.prefix):
                reply = rule.reply.replace("{size}", str(self.data_size_limit))
                if rule.keep:
                    reply += status[len(rule.prefix) :]
                if rule.data and isinstance(self, LMTP) and self.envelope is not None:
                    # LMTP (RFC 2033 §4.2): a DATA refusal is given once per recipient.
                    return "\r\n".join([reply] * max(1, len(self.envelope.rcpt_tos)))
                return reply
        return status

    async def handle_exception(self, error: Exception) -> str:
        # Replaces aiosmtpd's '500 Error: (ExcName) text': details go to the log only. A peer's
        # failure is one rate-limited INFO line (PeerFaults); ours, a traceback.
        if isinstance(error, PEER_ERRORS):
            self.faults.note(self.peer_address, error)
        else:
            log.error("SMTP session error", exc_info=error)
        return TRANSIENT

    # --- MAIL and RCPT: the path in angle brackets ----------------------------------------------

    def _limits_anew(self) -> None:
        """aiosmtpd lengthens the MAIL line limit at each EHLO or LHLO (for SIZE=, SMTPUTF8):
        from the base each time, or a session greeting again and again lengthens it without
        end."""
        self.command_size_limits.clear()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if not await self._bare_path(arg, "FROM:", "sender", "MAIL"):
            await super().smtp_MAIL(arg)  # type: ignore[misc]

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if not await self._bare_path(arg, "TO:", "recipient", "RCPT"):
            await super().smtp_RCPT(arg)  # type: ignore[misc]

    async def _bare_path(self, arg: str | None, keyword: str, what: str, command: str) -> bool:
        """Refuse (553 5.1.3) an address not in angle brackets, where aiosmtpd would take it;
        True if refused. Anything else is left to aiosmtpd's checks, in its order."""
        path = self._strip_command_keyword(keyword, arg) if arg else None  # type: ignore[attr-defined]
        if not path or angle_path(path):
            return False
        if keyword == "TO:" and (self.envelope is None or not self.envelope.mail_from):
            return False  # aiosmtpd: 503 need MAIL
        if await self.check_helo_needed() or await self.check_auth_needed(command):  # type: ignore[attr-defined]
            return True
        await self.push(
            f"553 5.1.3 Bad {what} address syntax (RFC 5321 section 4.1.2: the address goes in"
            " angle brackets)"
        )
        return True

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parse of the path in MAIL and RCPT, the same results, without the
        ``typing.Protocol`` class aiosmtpd 1.4 defines on each call (two a message: 50 µs of
        the listener's one thread, about a tenth of its time per message in a burst)."""
        if not arg:
            return "", ""
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        try:
            address, rest = parse(arg)
            addr = address.addr_spec
        except Exception:  # the stdlib parser fails on some input with IndexError,
            # AttributeError, UnboundLocalError …, in the parse or in addr_spec: a bad address
            return None, None
        local_part = addr.rpartition("@")[0]
        if self.local_part_limit and len(local_part) > self.local_part_limit:  # type: ignore[attr-defined]
            return None, None
        return addr, rest

    # --- DATA ---------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA (the same checks and replies) with the data read in blocks."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):  # type: ignore[attr-defined]
            return
        if self.envelope is None or self.envelope.mail_from is None:  # ("" is MAIL FROM:<>)
            await self.push("503 Error: need MAIL command")  # (not RCPT: MAIL comes first)
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._receiving = True
        try:
            data = await read_data(self._reader, self.data_size_limit)
        except asyncio.IncompleteReadError as err:  # closed mid-DATA: the session ends quietly
            raise ConnectionResetError("connection closed during DATA") from err
        finally:
            self._receiving = False
        # The data is in: the commit has its own budget, not what is left of the deadline.
        self._stop_deadline()
        if data.content is None:
            status = "552 Error: Too much mail data"
            self.event_handler.replies["552"] += 1  # a reply to DATA the handler never saw
        else:
            self.envelope.content = self.envelope.original_content = data.content
            status = await self._commit()
        # Pushed before the envelope is reset: LMTP's replies are one line per recipient.
        await self.push(status)
        self._set_post_data_state()  # type: ignore[attr-defined]
        self._reset_timeout()  # type: ignore[attr-defined]
        if status.startswith("250"):
            self.faults.clear()
            if self.deadline is not None:  # progress: the next message has a deadline anew
                self._arm_deadline(self.loop.time() + self.deadline)
        elif self.deadline is not None:  # a refused message is no progress
            self._arm_deadline(self._deadline_at)

    async def _commit(self) -> str:
        """The handler's limits and durable commit, timed and shielded (module docstring)."""
        self._reset_timeout(self.commit_timeout)  # type: ignore[attr-defined]
        job = asyncio.ensure_future(
            self.event_handler.handle_DATA(self, self.session, self.envelope)  # type: ignore[arg-type]
        )
        self._committing = True
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            if self.transport is None or self.transport.is_closing():
                # No one to answer: a message still queued is dropped (the peer sends it
                # again); one in a transaction is committed all the same.
                job.cancel()
                raise
            # Cancelled with the connection open: the peer half-closed (aiosmtpd's eof_received
            # cancels the session; a batch sender writes the data, the end line and QUIT, then
            # shuts down writing while it reads the replies), or anything else ended the
            # session. The commit goes on, and its reply is sent before the session ends.
            await asyncio.wait([job])
            await self.push(job.result() if not job.cancelled() else TRANSIENT)
            raise
        finally:
            self._committing = False

    async def smtp_AUTH(self, arg: str) -> None:
        if self._authenticator is None:  # type: ignore[attr-defined]
            await self.push("502 5.5.1 AUTH is not offered")
            return
        await super().smtp_AUTH(arg)  # type: ignore[misc]

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> Any:  # the answer's bytes, or MISSING
        """aiosmtpd's challenge (RFC 4954 §4), with its answer read whole: aiosmtpd reads it with
        ``readline``, which fails on a line longer than the stream takes (a 451 and a traceback)
        and leaves the rest of the line to be read as commands."""
        del log_client_response  # the answer carries a password: never logged
        if isinstance(challenge, str):
            challenge = challenge.encode()
        await self.push(b"334 " + (base64.b64encode(challenge) if encode_to_b64 else challenge))
        line = await self._answer_line()
        if line is None:
            await self.push("500 5.5.6 Authentication Exchange line is too long")
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def _answer_line(self) -> bytes | None:
        """The next line from the peer, or None for one longer than the stream's limit (read
        to its end and dropped, as aiosmtpd does with an over-long command line)."""
        try:
            return await self._reader.readuntil()
        except asyncio.IncompleteReadError as cut:  # the peer closed mid-line
            return cut.partial
        except asyncio.LimitOverrunError as over:
            await self._reader.readexactly(over.consumed)
        while True:
            try:
                await self._reader.readuntil()
            except asyncio.LimitOverrunError as over:
                await self._reader.readexactly(over.consumed)
                continue
            except asyncio.IncompleteReadError:
                pass
            return None

    # aiosmtpd calls the authenticator synchronously (auth_PLAIN and auth_LOGIN return
    # _authenticate's result), on the event loop: a password check (scrypt, ~40 ms) would hold
    # up every session. _authenticate only notes what to check; the check is awaited below.

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False, auth_data=_Pending(mechanism, auth_data))

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        return await self._check_login(await super().auth_PLAIN(server, args))  # type: ignore[misc]

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        return await self._check_login(await super().auth_LOGIN(server, args))  # type: ignore[misc]

    async def _check_login(self, result: AuthResult) -> AuthResult:
        pending = result.auth_data
        if not isinstance(pending, _Pending):  # refused before any check (bad base64, "*")
            return result
        args = (self, self.session, self.envelope, pending.mechanism, pending.data)
        authenticator: Any = self._authenticator  # type: ignore[attr-defined]
        verify = getattr(authenticator, "verify", None)  # gateway.submitters.Authenticator
        if verify is not None:
            return await verify(*args)  # type: ignore[no-any-return]
        checked: AuthResult = await asyncio.to_thread(lambda: authenticator(*args))
        return checked


@dataclass(frozen=True)
class _Pending:
    """A login to check (mechanism and aiosmtpd's LoginPassword), noted by _authenticate."""

    mechanism: str
    data: Any


def _address(transport: asyncio.BaseTransport) -> str:
    """The peer's address (without the port) for the per-address session cap."""
    return peer_parts(transport.get_extra_info("peername"))[0]


class IntakeSMTP(_Replies, SMTP):
    """aiosmtpd's SMTP with the gateway's replies."""

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._limits_anew()
        await super().smtp_EHLO(hostname)


class IntakeLMTP(_Replies, LMTP):
    """aiosmtpd's LMTP (LHLO, one reply per recipient) with the gateway's replies."""

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        self._limits_anew()
        await super().smtp_LHLO(arg)


def _drop_unsent(transports: set[asyncio.BaseTransport]) -> None:
    """Drop the connection of an ended session that still holds unsent replies (the peer
    does not read them): :data:`CLOSE_GRACE` after it ended."""
    for transport in transports:
        if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
            transport.abort()
