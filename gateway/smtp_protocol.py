"""aiosmtpd's SMTP and LMTP with the gateway's replies (the protocol side of the listener).

Every reply carries an enhanced status code (RFC 3463) and none echoes what the peer sent:
aiosmtpd's own texts are rewritten in one place (:data:`REWRITES`, applied by ``push``), and
an unexpected error is the generic :data:`TRANSIENT` 451, never aiosmtpd's ``500 Error: (…)``.
The DATA phase is read in blocks (:mod:`gateway.smtp_data`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from gateway.smtp_checks import LINE_TOO_LONG
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
    """Mixed into aiosmtpd's SMTP/LMTP: our replies, a 451 for anything unexpected, and the
    DATA phase read in blocks (:mod:`gateway.smtp_data`)."""

    data_size_limit: int | None
    envelope: Envelope | None
    session: Session | None
    event_handler: IntakeHandler
    _reader: asyncio.StreamReader

    #: aiosmtpd sizes the session's stream with this. Its own DATA reader (replaced below) is
    #: the only other user; lines are held to 998 octets by :func:`check_data`, and command
    #: lines to aiosmtpd's command size limits.
    line_length_limit = BLOCK

    #: The listener's set of live transports (so that stop() can close every one).
    transports: set[asyncio.BaseTransport] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transports is not None:
            self.transports.add(transport)
        super().connection_made(transport)  # type: ignore[misc]

    async def push(self, status: Any) -> None:
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
        try:
            data = await read_data(self._reader, self.data_size_limit)
        except asyncio.IncompleteReadError as err:  # closed mid-DATA: the session ends quietly
            raise ConnectionResetError("connection closed during DATA") from err
        if data.content is None:
            self._set_post_data_state()  # type: ignore[attr-defined]
            await self.push("552 Error: Too much mail data")
            return
        envelope, session = self.envelope, self.session
        envelope.content = envelope.original_content = data.content
        status = await self.event_handler.handle_DATA(self, session, envelope)  # type: ignore[arg-type]
        self._set_post_data_state()  # type: ignore[attr-defined]
        await self.push(status)

    async def smtp_AUTH(self, arg: str) -> None:
        if self._authenticator is None:  # type: ignore[attr-defined]
            await self.push("502 5.5.1 AUTH is not offered")
            return
        await super().smtp_AUTH(arg)  # type: ignore[misc]


class IntakeSMTP(_Replies, SMTP):
    """aiosmtpd's SMTP with the gateway's replies."""


class IntakeLMTP(_Replies, LMTP):
    """aiosmtpd's LMTP (LHLO, one reply per recipient) with the gateway's replies."""
