"""The DATA phase read in blocks: up to the end-of-data line, not line by line.

aiosmtpd reads message data with one ``readuntil(b"\\r\\n")`` per line, through a stream whose
limit (1,001 bytes) also pauses the socket whenever 2 KB are buffered: ~20 ms of Python per MB
received (``bench/e2e_bench.py``). :func:`read_data` asks the stream only for ``.<CRLF>``, so a
base64 body arrives in a few pieces of up to :data:`BLOCK` bytes, and the message is unstuffed
(RFC 5321 §4.5.2) with one ``replace`` over the whole.

The result is what aiosmtpd's reader gives for the same bytes: the data ends at the first
``<CRLF>.<CRLF>`` (or at a ``.<CRLF>`` that opens the data); a line's leading dot is removed; a
bare CR or LF is not a line end (and is refused later, :func:`gateway.smtp_checks.check_data`); the
size counted against the limit is the stuffed size without the end line; over the limit the data
is read to its end and dropped. Nothing after the end line is consumed: a pipelined command
(RFC 2920) stays in the stream for the session.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

#: The stream limit for sessions that use :func:`read_data`: the most buffered before a piece
#: is taken (the stream pauses the socket at twice this). Command lines are still held to
#: aiosmtpd's command size limits, checked once the line is read.
BLOCK = 64 * 1024

_END = b".\r\n"
_CRLF = b"\r\n"


@dataclass(frozen=True)
class Data:
    """One DATA phase: the unstuffed message, or ``None`` when it went over the size limit."""

    content: bytes | None
    #: Bytes received before the end line, as sent (dot-stuffed).
    size: int


async def read_data(reader: asyncio.StreamReader, size_limit: int | None) -> Data:
    """Read message data from ``reader`` through its end line (which is consumed, not kept).
    ``size_limit`` 0 or ``None``: no limit (as aiosmtpd's ``data_size_limit``)."""
    limit = size_limit or None
    parts: list[bytes] = []
    size = 0
    over = False
    tail = _CRLF  # the last two bytes so far: the data begins at a line start
    while True:
        try:
            piece = await reader.readuntil(_END)
        except asyncio.LimitOverrunError as err:  # no ".<CRLF>" within BLOCK: take what is safe
            piece = await reader.readexactly(err.consumed)
        # The end: a ".<CRLF>" whose dot opens a line (a piece taken at the limit never ends so).
        before = piece[-5:-3] if len(piece) >= 5 else (tail + piece[:-3])[-2:]
        end = piece.endswith(_END) and before == _CRLF
        if end:
            piece = piece[:-3]
        size += len(piece)
        if not over and limit is not None and size > limit:
            over = True
            parts.clear()  # read on to the end, keep nothing
        if not over:
            parts.append(piece)
        if end:
            return Data(None if over else unstuff(b"".join(parts)), size)
        tail = (tail + piece[-2:])[-2:]


def unstuff(data: bytes) -> bytes:
    """Remove the transparency dot that opens a line (RFC 5321 §4.5.2)."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", _CRLF)


__all__ = ["BLOCK", "Data", "read_data", "unstuff"]
