"""The DATA phase read in blocks: whatever has arrived, searched for the end-of-data line.

aiosmtpd reads message data with one ``readuntil(b"\\r\\n")`` per line, through a stream whose
limit (1,001 bytes) also pauses the socket whenever 2 KB are buffered: ~20 ms of Python per MB
received (``bench/e2e_bench.py``). :func:`read_data` takes everything the stream holds at once
(up to about twice :data:`BLOCK`, where the stream pauses the socket) and looks for the end with
one ``bytes.find`` per block, so the cost per byte does not depend on what the lines hold: a
body of short lines that end in a dot (``a.<CRLF>``) used to be one piece and one pass of
Python per line (16 MiB: 3.7 s of CPU on the listener's event loop, 20 times a plain body).
The message is unstuffed (RFC 5321 §4.5.2) with one ``replace`` over the whole.

The result is what aiosmtpd's reader gives for the same bytes: the data ends at the first
``<CRLF>.<CRLF>`` (or at a ``.<CRLF>`` that opens the data); a line's leading dot is removed; a
bare CR or LF is not a line end (and is refused later, :func:`gateway.smtp_checks.check_data`).
The size held to the limit is the message's, unstuffed, as RFC 1870 defines it (the size a
client declared with ``SIZE=`` and had accepted); aiosmtpd counts the transparency dots too, and
refused a message of exactly the limit that had a line starting with a dot. Over the limit the
data is read to its end and dropped: once the stuffed bytes are more than a message of the limit
can be sent as (4/3 of it: a line ``.<CRLF>`` goes as ``..<CRLF>``), nothing more is kept. What follows the end line (a pipelined command, RFC 2920) is
given back to the stream, in front of anything that arrives later, for the session to read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

#: The stream limit for sessions that use :func:`read_data`: the stream pauses the socket once
#: it holds twice this, so a block is at most about that much. Command lines are still held to
#: aiosmtpd's command size limits, checked once the line is read.
BLOCK = 64 * 1024

#: The end of the data (RFC 5321 §4.1.1.4): a line that is a lone dot, after a line end.
_END = b"\r\n.\r\n"
#: Bytes kept back from each block: an end line split between two blocks is still found whole.
_KEEP = len(_END) - 1
#: "Everything the stream holds" for StreamReader.read (which returns at most what it holds).
_ALL = 1 << 40


@dataclass(frozen=True)
class Data:
    """One DATA phase: the unstuffed message, or ``None`` when it is over the size limit."""

    content: bytes | None
    #: Bytes received before the end line, as sent (dot-stuffed).
    size: int


async def read_data(reader: asyncio.StreamReader, size_limit: int | None) -> Data:
    """Read message data from ``reader`` through its end line (which is consumed, not kept).
    ``size_limit`` 0 or ``None``: no limit (as aiosmtpd's ``data_size_limit``).

    Raises :class:`asyncio.IncompleteReadError` if the stream ends first."""
    limit = size_limit or None
    # The most a message within the limit can take, stuffed: beyond, it is over for sure.
    most = None if limit is None else limit + limit // 3 + 1
    parts: list[bytes] = []
    size = 0
    over = False
    # Bytes seen but not yet taken as data. It begins with the CRLF that ended the DATA command
    # (``virtual`` bytes, not data): the data begins at a line start, so a ".<CRLF>" that opens
    # it is the end too.
    held = b"\r\n"
    virtual = 2
    while True:
        # Everything the stream holds (at least a byte). Nothing is awaited from here to the
        # end of the pass, so no byte can arrive between this read and feed_data below.
        block = await reader.read(_ALL)
        if not block:
            raise asyncio.IncompleteReadError(held[virtual:], None)
        window = held + block
        end = window.find(_END)
        if end >= 0:
            taken = window[virtual : end + 2]  # the CRLF before the end line ends the last line
            rest = window[end + len(_END) :]
            if rest:  # a pipelined command: back to the stream, which holds nothing else now
                reader.feed_data(rest)
        elif len(window) - _KEEP > virtual:
            cut = len(window) - _KEEP
            taken, held, virtual = window[virtual:cut], window[cut:], 0
        else:  # too little to tell yet: keep it all
            taken, held = b"", window
        size += len(taken)
        if not over and most is not None and size > most:
            over = True
            parts.clear()  # read on to the end, keep nothing
        if not over and taken:
            parts.append(taken)
        if end >= 0:
            content = None if over else unstuff(b"".join(parts))
            if content is not None and limit is not None and len(content) > limit:
                content = None
            return Data(content, size)


def unstuff(data: bytes) -> bytes:
    """Remove the transparency dot that opens a line (RFC 5321 §4.5.2)."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


__all__ = ["BLOCK", "Data", "read_data", "unstuff"]
