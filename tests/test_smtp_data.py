"""The DATA phase read in blocks (gateway.smtp_data) gives what RFC 5321 line-by-line reading
gives, whatever the chunks the bytes arrive in, and leaves what follows the end line alone."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from gateway.smtp_data import read_data, unstuff

END = b".\r\n"


def by_lines(wire: bytes, limit: int | None) -> tuple[bytes | None, int, bytes]:
    """RFC 5321 §4.1.1.4 / §4.5.2 the plain way: lines end with CRLF (a bare CR or LF does not
    end one); the first line that is a lone dot ends the data; a line's leading dot goes.
    Returns (content or None if it is over ``limit``, RFC 1870's size: unstuffed; the stuffed
    size, what follows the end line)."""
    pos, size, lines = 0, 0, []
    while True:
        cut = wire.index(b"\r\n", pos) + 2
        line = wire[pos:cut]
        pos = cut
        if line == END:
            break
        size += len(line)
        lines.append(line[1:] if line.startswith(b".") else line)
    content = b"".join(lines)
    over = bool(limit) and len(content) > (limit or 0)
    return (None if over else content), size, wire[pos:]


def run(wire: bytes, cuts: list[int], stream_limit: int, limit: int | None) -> tuple:
    async def go() -> tuple:
        reader = asyncio.StreamReader(limit=stream_limit)

        async def feed() -> None:
            at = 0
            for cut in [*sorted(cuts), len(wire)]:
                reader.feed_data(wire[at:cut])
                at = max(at, cut)
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.create_task(feed())
        data = await read_data(reader, limit)
        rest = await reader.read()
        await feeder
        return data.content, data.size, rest

    return asyncio.run(go())


# Lines drawn to hit the corners: dots at the start and end, lone dots, bare CR and LF, CRs.
_LINE = st.lists(
    st.sampled_from([b".", b"..", b"a", b"=", b"\r", b"\n", b" ", b"x.", b"\r.", b"\n."]),
    max_size=8,
).map(b"".join)


@st.composite
def wires(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    lines = draw(st.lists(_LINE, max_size=12))
    # Sent as a client sends it: each line stuffed and ended with CRLF, then the end line, then
    # maybe a pipelined command. A line that is (after a bare CR/LF) a lone dot is the point.
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    wire = body + END + draw(st.sampled_from([b"", b"QUIT\r\n", b".\r\n", b"MAIL FROM:<>\r\n"]))
    cuts = draw(st.lists(st.integers(0, len(wire)), max_size=6))
    return wire, cuts


@given(wires(), st.sampled_from([3, 4, 7, 64, 2**16]), st.sampled_from([None, 0, 5, 20, 10**6]))
def test_blocks_read_as_lines_would(
    case: tuple[bytes, list[int]], stream_limit: int, limit: int | None
) -> None:
    wire, cuts = case
    assert run(wire, cuts, stream_limit, limit) == by_lines(wire, limit)


@given(st.binary(max_size=200).map(lambda b: b.replace(b"\r\n.\r\n", b"")), st.binary(max_size=40))
def test_any_bytes_before_the_end_line_read_as_lines_would(body: bytes, after: bytes) -> None:
    # Arbitrary bytes (bare CR/LF, NULs, lines that start with dots) ending in CRLF.CRLF.
    if body.startswith(b".\r\n"):
        body = body[3:]
    wire = body + b"\r\n.\r\n" + after
    assert run(wire, [len(wire) // 3], 16, None) == by_lines(wire, None)


def test_a_message_that_is_only_the_end_line_is_empty() -> None:
    assert run(b".\r\nQUIT\r\n", [], 64, None) == (b"", 0, b"QUIT\r\n")


def test_unstuff() -> None:
    assert unstuff(b"..a\r\nb\r\n...\r\n") == b".a\r\nb\r\n..\r\n"
    assert unstuff(b"a.\r\n.\r\n") == b"a.\r\n\r\n"  # (a lone "." line cannot be stuffed data)


class CountingReader(asyncio.StreamReader):
    """asyncio's stream, counting the pieces taken from it (each one a pass of Python)."""

    pieces = 0

    async def read(self, n: int = -1) -> bytes:
        self.pieces += 1
        return await super().read(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        self.pieces += 1
        return await super().readuntil(separator)

    async def readexactly(self, n: int) -> bytes:
        self.pieces += 1
        return await super().readexactly(n)


def pieces_taken(wire: bytes, block: int) -> tuple[int, bytes | None]:
    """Feed ``wire`` in blocks of ``block`` bytes; the pieces read_data took, and its content."""

    async def go() -> tuple[int, bytes | None]:
        reader = CountingReader(limit=64 * 1024)

        async def feed() -> None:
            for at in range(0, len(wire), block):
                reader.feed_data(wire[at : at + block])
                await asyncio.sleep(0)

        feeder = asyncio.create_task(feed())
        data = await read_data(reader, None)
        await feeder
        return reader.pieces, data.content

    return asyncio.run(go())


def test_lines_that_end_in_a_dot_take_no_more_pieces_than_any_other_line() -> None:
    """Read up to each ".<CRLF>", a body of "a.<CRLF>" lines was a piece and a pass of Python
    per line: 16 MiB of them cost 3.7 s of the listener's event loop, 20 times a plain body."""
    for line in (b"a.\r\n", b"Q" * 76 + b"\r\n", b".\r\r\n", b"\r\n"):
        body = line * (256 * 1024 // len(line))
        pieces, content = pieces_taken(body + END, 16 * 1024)
        assert content == by_lines(body + END, None)[0]
        assert pieces <= 256 // 16 + 1, (line, pieces)


def test_the_limit_is_the_messages_size_without_its_transparency_dots() -> None:
    """RFC 1870: the size is the message's, without the dots a client adds to lines that begin
    with one. A client that declared SIZE=20 and had it accepted sent 20 bytes, one line with a
    dot: 21 stuffed, and refused."""
    message = b".abcdefg\r\nabcdefgh\r\n"  # 20 bytes
    wire = b"." + message + END
    assert run(wire, [], 64, 20) == (message, 21, b"")
    assert run(wire, [], 64, 19)[0] is None
    lone_dots = b".\r\n" * 30  # stuffed 4/3 as long: the most a message can grow sent
    assert run(b"." + lone_dots.replace(b"\r\n.", b"\r\n..") + END, [5, 50], 7, 90)[0] == lone_dots
