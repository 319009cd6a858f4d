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
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, syntax

from gateway.smtp_checks import LINE_TOO_LONG, SessionGate
from gateway.smtp_data import BLOCK, read_data

if TYPE_CHECKING:
    from gateway.smtp import IntakeHandler

log = logging.getLogger("gateway.smtp")

TRANSIENT = "451 4.3.0 Temporary failure; the message was not stored, please try again later"


@dataclass(frozen=True)
class Rewrite:
    """Replace an aiosmtpd reply that starts with ``prefix`` (``data``: a DATA-phase reply)."""

    prefix: str
    reply: str
    data: bool = False


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


class _Replies:
    """Mixed into aiosmtpd's SMTP/LMTP: our replies, a 451 for anything unexpected, the DATA
    phase read in blocks (:mod:`gateway.smtp_data`), timed and shielded, the session caps and
    the AUTH check off the event loop (module docstring)."""

    data_size_limit: int | None
    envelope: Envelope | None
    session: Session | None
    event_handler: IntakeHandler
    transport: asyncio.BaseTransport | None
    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter

    #: aiosmtpd sizes the session's stream with this. Its own DATA reader (replaced below) is
    #: the only other user; lines are held to 998 octets by :func:`check_data`, and command
    #: lines to aiosmtpd's command size limits.
    line_length_limit = BLOCK

    #: The listener's set of live transports (so that stop() can close every one).
    transports: set[asyncio.BaseTransport] | None = None

    #: Whether message data is being received (from 354 to the end line).
    _receiving = False

    def __init__(
        self,
        handler: Any,
        *,
        commit_timeout: float,
        gate: SessionGate | None = None,
        **options: Any,
    ) -> None:
        super().__init__(handler, **options)  # type: ignore[call-arg]
        #: Seconds one commit may take before the session is closed without its reply.
        self.commit_timeout = commit_timeout
        #: The listener's caps on sessions at once; ``_admitted`` is the address it counted.
        self.gate = gate
        self._admitted: str | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.session is None and self.gate is not None:  # (STARTTLS calls this again)
            peer = _address(transport)
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

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._admitted is not None and self.gate is not None:
            self.gate.leave(self._admitted)
            self._admitted = None
        super().connection_lost(error)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._receiving:
            # RFC 5321 §4.5.3.2.5: the data timeout runs from the last block received, not from
            # the DATA command: a transfer that keeps arriving is not cut off.
            self._reset_timeout()  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]

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

    def rewrite(self, status: str) -> str:
        for rule in REWRITES:
            if status.startswith(rule.prefix):
                reply = rule.reply.replace("{size}", str(self.data_size_limit))
                if rule.data and isinstance(self, LMTP) and self.envelope is not None:
                    # LMTP (RFC 2033 §4.2): a DATA refusal is given once per recipient.
                    return "\r\n".join([reply] * max(1, len(self.envelope.rcpt_tos)))
                return reply
        return status

    async def handle_exception(self, error: Exception) -> str:
        # Replaces aiosmtpd's '500 Error: (ExcName) text': details go to the log only.
        log.error("SMTP session error", exc_info=error)
        return TRANSIENT

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA (the same checks and replies) with the data read in blocks."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):  # type: ignore[attr-defined]
            return
        if self.envelope is None or not self.envelope.rcpt_tos:
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
        if data.content is None:
            status = "552 Error: Too much mail data"
        else:
            self.envelope.content = self.envelope.original_content = data.content
            status = await self._commit()
        # Pushed before the envelope is reset: LMTP's replies are one line per recipient.
        await self.push(status)
        self._set_post_data_state()  # type: ignore[attr-defined]
        self._reset_timeout()  # type: ignore[attr-defined]

    async def _commit(self) -> str:
        """The handler's limits and durable commit, timed and shielded (module docstring)."""
        self._reset_timeout(self.commit_timeout)  # type: ignore[attr-defined]
        job = asyncio.ensure_future(
            self.event_handler.handle_DATA(self, self.session, self.envelope)  # type: ignore[arg-type]
        )
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

    async def smtp_AUTH(self, arg: str) -> None:
        if self._authenticator is None:  # type: ignore[attr-defined]
            await self.push("502 5.5.1 AUTH is not offered")
            return
        await super().smtp_AUTH(arg)  # type: ignore[misc]

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
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


class IntakeSMTP(_Replies, SMTP):
    """aiosmtpd's SMTP with the gateway's replies."""


class IntakeLMTP(_Replies, LMTP):
    """aiosmtpd's LMTP (LHLO, one reply per recipient) with the gateway's replies."""
