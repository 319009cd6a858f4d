"""What an SMTP peer sends, checked (pure): addresses, message data, sessions at once.

The listener (:mod:`gateway.smtp`) answers with the replies these return; nothing here does
I/O. Text a peer wrote is only ever echoed through :func:`safe_text`.
"""

from __future__ import annotations

import re
from collections import Counter

from formats.limits import Limits


def safe_text(text: str, limit: int = 100) -> str:
    """Peer-supplied text made fit to echo: printable address characters only, bounded."""
    kept = "".join(
        c if c.isascii() and (c.isalnum() or c in ".-_+=@!#$%&'*/?^`{|}~") else "?"
        for c in text[:limit]
    )
    return kept + ("..." if len(text) > limit else "")


# RFC 5321 §4.1.2 Mailbox: Dot-string or Quoted-string "@" a domain or an address literal;
# aiosmtpd's parser is lenient (it takes "<broken" for the address "broken").
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_MAILBOX = re.compile(
    rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")'
    rf"@(?:{_LABEL}(?:\.{_LABEL})*|\[[\x21-\x5a\x5e-\x7e]+\])\Z"
)


def is_mailbox(address: str) -> bool:
    """RFC 5321 Mailbox syntax, within the §4.5.3.1 size limits (local 64, path 256)."""
    local, _, domain = address.rpartition("@")
    return (
        len(address) <= 254
        and len(local) <= 64
        and len(domain) <= 255
        and _MAILBOX.match(address) is not None
    )


# --- the data checks (pure) -----------------------------------------------------------------

# RFC 5321 §4.5.3.1.6 / RFC 5322 §2.1.1: 998 octets plus CRLF; aiosmtpd's reader lets 999
# through (its 1001 counts a transparency dot), so the exact rule is checked again here.
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6: at most 998 octets plus CRLF)"


def check_data(raw: bytes, limits: Limits) -> str | None:
    """The refusal reply for message data that breaks a limit, or ``None`` when it is fine.

    ``raw`` is the data as received, dot-unstuffed: every line ends with CRLF.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf:
        return _bare_line_end("LF")
    if raw.count(b"\r") != crlf:
        return _bare_line_end("CR")
    if not _lines_within(raw, limits.max_line_bytes):
        return LINE_TOO_LONG
    return None


def _lines_within(raw: bytes, limit: int) -> bool:
    """No line of ``raw`` (CRLF line ends only) holds more than ``limit`` octets.

    A line over the limit and its CR are a run of at least ``limit + 2`` octets with no LF,
    and such a run covers a whole block of ``block`` octets (``2 * block - 1 <= limit + 2``)
    counted from the start. So only a block that holds no LF, which one ``find`` per block
    tells (~0.25 ms per MiB), can be inside a long line, and only the line around it is
    measured: no copy of the message is made, and each line is looked at a few times at most.
    (Splitting the message into lines held the event loop ~0.7 s and took ~400 MiB for 32 MiB
    of short lines; a regex such as ``[^\r\n]{999}`` backtracks at every offset: 47 s.)
    """
    block = (limit + 3) // 2
    for at in range(0, len(raw), block):
        if raw.find(b"\n", at, at + block) >= 0:
            continue
        start = raw.rfind(b"\n", 0, at) + 1  # the line holding the block: from its start …
        end = raw.find(b"\r\n", at)  # … to its CRLF (there is no bare CR)
        if (len(raw) if end < 0 else end) - start > limit:
            return False
    return True


def _bare_line_end(what: str) -> str:
    # RFC 5321 §2.3.8: lines end with CRLF; a bare CR or LF must not be treated as one.
    return (
        f"550 5.6.2 Bare {what} in the message data; RFC 5321 section 2.3.8 requires CRLF "
        "line endings. The message was not stored"
    )


# --- sessions at once -----------------------------------------------------------------------


class SessionGate:
    """Counts the sessions open at once, in all and per peer address, and refuses one over
    either cap (DESIGN §5 rule 4): a session in DATA holds up to 4/3 of ``max_message_bytes``
    in memory (a message of the limit, dot-stuffed), so memory stays within about
    ``max_sessions`` times that.

    ``enter(peer)`` admits a session (``None``: counted until ``leave(peer)``) or returns the
    421 reply to close it with. One gate per listener, used on its event loop only.
    """

    def __init__(self, max_sessions: int, max_per_peer: int, *, hostname: str = "") -> None:
        if max_sessions < 1 or max_per_peer < 1:
            raise ValueError("the session caps must be at least 1")
        self.max_sessions = max_sessions
        self.max_per_peer = max_per_peer
        self.hostname = hostname
        self.open = 0
        #: Connections refused since the last one admitted (the first of a run is logged).
        self.refused_in_a_row = 0
        self._per_peer: Counter[str] = Counter()

    def enter(self, peer: str) -> str | None:
        if self.open >= self.max_sessions:
            return self._refusal(f"Too many sessions open (at most {self.max_sessions})")
        if self._per_peer[peer] >= self.max_per_peer:
            return self._refusal(
                f"Too many sessions from your address (at most {self.max_per_peer} at once)"
            )
        self.open += 1
        self._per_peer[peer] += 1
        self.refused_in_a_row = 0
        return None

    def leave(self, peer: str) -> None:
        self.open -= 1
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]

    def _refusal(self, why: str) -> str:
        self.refused_in_a_row += 1
        # RFC 5321 §3.8/§4.2.3: 421 closes the channel; 4.7.0 (RFC 3463): a temporary refusal
        # on policy grounds: the peer tries again later.
        host = f"{self.hostname} " if self.hostname else ""
        return f"421 4.7.0 {host}{why}; try again later"


def peer_parts(peer: object) -> tuple[str, str | None]:
    """(address, port) of a peer as asyncio and aiosmtpd give it: a (host, port[, …]) tuple
    for TCP, anything else as text."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), str(peer[1])
    return str(peer), None
