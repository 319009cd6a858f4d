"""The header block of what the gateway sends (receipts, deliveries, reminders, alerts,
``gateway send``): addresses written as addresses — never RFC 2047 encoded-words, which
RFC 2047 §5 keeps out of an addr-spec — and the To list folded at its commas so that no line
is over 78 characters (RFC 5322 §2.1.1). Read back with the standard library's mail parser."""

from __future__ import annotations

import dataclasses
import email
import re
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.service import Archive
from formats.smime import message_headers
from gateway.builder import Builder, Hub
from gateway.demo import DemoWorld
from gateway.pipeline import Context
from keys.directory import Directory
from tests.test_outbound import LATER, _process, _receive, _rows

AT = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)
HUB = "hub@exchange.hanoi.gov.vn"
#: 40 mailboxes of one agency, 32 to 43 characters each: 1,600 octets on one line before.
FORTY = [f"van-thu.phong-{n:02d}@so-{n}.{'x' * (n % 12)}hanoi.gov.vn" for n in range(40)]


def _head(to: list[str], *, subject: str = "Biên nhận / Receipt", sender: str = HUB) -> bytes:
    return message_headers(
        from_addr=sender, to_addrs=to, message_id="<r.1@exchange.hanoi.gov.vn>", date=AT,
        subject=subject,
    )  # fmt: skip


def _parsed(head: bytes) -> EmailMessage:
    message = email.message_from_bytes(head + b"\r\n", policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _addresses(message: EmailMessage, name: str) -> list[str]:
    header = message[name]
    assert not header.defects, header.defects
    return [a.addr_spec for a in header.addresses]


def _longest_line(head: bytes) -> int:
    """The longest line of the address fields (From and To, before the Subject)."""
    addresses = head.split(b"\r\nSubject: ", 1)[0]
    assert b"\r" not in addresses.replace(b"\r\n", b"") and b"\n" not in addresses.replace(
        b"\r\n", b""
    )
    return max(len(line) for line in addresses.split(b"\r\n"))


def test_forty_mailboxes_read_back_as_forty_and_no_line_is_over_78() -> None:
    head = _head(FORTY)
    message = _parsed(head)
    assert _addresses(message, "To") == FORTY
    assert _addresses(message, "From") == [HUB]
    assert _longest_line(head) <= 78
    assert b"=?" not in head.split(b"Subject:")[0]  # no encoded-word among the addresses
    assert str(message["Subject"]) == "Biên nhận / Receipt"  # a Subject is still encoded


_LOCAL = st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,30}", fullmatch=True)
_DOMAIN = st.from_regex(r"([a-z0-9][a-z0-9-]{0,15}\.){1,3}(vn|gov\.vn)", fullmatch=True)
#: Up to 73 characters: "To: ", the address and a "," fit in 78 (a longer one gets a line
#: of its own, below).
_MAILBOX = st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN).filter(
    lambda address: (
        ".." not in address and not address.split("@")[0].endswith(".") and len(address) <= 73
    )
)


@settings(max_examples=200)
@given(st.lists(_MAILBOX, min_size=1, max_size=60, unique=True))
def test_any_list_of_mailboxes_reads_back_the_same_in_short_lines(to: list[str]) -> None:
    head = _head(to)
    assert _addresses(_parsed(head), "To") == to
    assert _longest_line(head) <= 78


def test_an_address_too_long_for_78_characters_gets_a_line_of_its_own() -> None:
    long = "phong-tiep-nhan-ho-so-nguoi-nuoc-ngoai@" + "phong-quan-ly-xuat-nhap-canh." * 2 + "vn"
    to = ["a@x.vn", long, "b@x.vn"]
    head = _head(to)
    assert _addresses(_parsed(head), "To") == to
    assert f"To: a@x.vn,\r\n {long},\r\n b@x.vn\r\n".encode() in head


@pytest.mark.parametrize(
    ("to", "sender", "message"),
    [
        (
            ["pa08@congan.hanoi.gov.vn", "nguyễn@congan.hanoi.gov.vn"],
            HUB,
            "To address 'nguyễn@congan.hanoi.gov.vn' is not ASCII: the gateway writes "
            "addresses as they are, never as RFC 2047 encoded-words",
        ),
        (
            ["pa08@congan.hanoi.gov.vn"],
            "hub@sở.hanoi.gov.vn",
            "From address 'hub@sở.hanoi.gov.vn' is not ASCII",
        ),
        (["pa08@congan.hanoi.gov.vn\r\nBcc: x@evil.example"], HUB, "contains a line break"),
        ([], HUB, "a message needs at least one To address"),
    ],
)
def test_an_address_that_cannot_be_written_as_it_is_is_refused(
    to: list[str], sender: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _head(to, sender=sender)


def test_a_delivery_to_forty_mailboxes_reads_back_with_every_one(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """Through the builder: the police with 40 mailboxes get one delivery addressed to all of
    them, in short lines."""
    directory = Directory.of(
        dataclasses.replace(a, emails=frozenset(FORTY)) if a.organ_id == "H26.CATP" else a
        for a in world.directory
    )
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, dataclasses.replace(world_ctx, directory=directory), directory, hub)
    row = _rows(archive)[f"delivery:{seq}:H26.CATP"]
    assert row.state == "ready" and row.message is not None
    head = row.message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    message = _parsed(head)
    assert _addresses(message, "To") == sorted(FORTY) == row.rcpt_to
    assert _addresses(message, "From") == [hub.address]
    assert _longest_line(head) <= 78
    Builder(archive, hub, lambda: directory, lambda: LATER, "b").run_once()  # nothing more
