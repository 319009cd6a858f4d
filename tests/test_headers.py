"""Outbound header text: RFC 2047 encoded words that any mail reader decodes back."""

from __future__ import annotations

import email
from email import policy
from email.header import decode_header, make_header

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.smime import header_value

_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    min_size=1,
    max_size=300,
)


@settings(max_examples=500)
@given(_TEXT.filter(lambda text: not text.isascii()))
def test_any_subject_reads_back_the_same_in_a_mail_reader(subject: str) -> None:
    line = f"Subject: {header_value(subject)}\r\n".encode("ascii")
    assert all(len(part) <= 78 for part in line.split(b"\r\n"))
    assert str(make_header(decode_header(header_value(subject)))) == subject
    parsed = email.message_from_bytes(line + b"\r\n", policy=policy.default)
    assert parsed["Subject"] == subject


def test_vietnamese_subject_is_cut_between_characters() -> None:
    subject = "Biên nhận: đã tiếp nhận (số 12345) / Receipt: accepted (entry 12345)"
    value = header_value(subject)
    assert value.startswith("=?utf-8?b?") and "\r\n " in value
    assert str(make_header(decode_header(value))) == subject


def test_line_breaks_are_refused() -> None:
    with pytest.raises(ValueError, match="line breaks"):
        header_value("Biên nhận\r\nBcc: x@y")
