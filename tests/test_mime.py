"""MIME as spans of the received bytes: limits first, exact cuts, strict parsing."""

from __future__ import annotations

import base64
import binascii
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import mime
from formats.errors import HeaderCountError, LimitExceeded, MalformedMessage
from formats.limits import Limits
from formats.mime import (
    _delimiters,
    decode_base64,
    decode_base64_buffer,
    parse_content_type,
    parse_disposition,
    parse_message,
    single_address,
    single_header,
)
from formats.smime import b64_lines

SIGNED = (
    b"From: a@x.vn\r\nMessage-ID: <1@x.vn>\r\n"
    b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="b1"\r\n'
    b"\r\npreamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nline one\r\nline two\r\n"
    b"--b1\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--b1--\r\nepilogue\r\n"
)


def test_parts_are_cut_exactly_without_the_crlf_before_the_delimiter() -> None:
    top = parse_message(SIGNED)
    first, second = top.children
    assert first.raw == b"Content-Type: text/plain\r\n\r\nline one\r\nline two"
    assert first.body == b"line one\r\nline two"
    assert second.body == b"AAAA"
    assert SIGNED.index(first.raw) == first.start  # a window onto the same buffer


def test_lf_only_messages_are_split_the_same_way() -> None:
    top = parse_message(SIGNED.replace(b"\r\n", b"\n"))
    assert top.children[0].raw == b"Content-Type: text/plain\n\nline one\nline two"


def test_boundary_that_prefixes_a_longer_line_is_not_a_delimiter() -> None:
    raw = SIGNED.replace(b"line one", b"--b1x not a delimiter")
    assert parse_message(raw).children[0].body.startswith(b"--b1x")


_LINES = st.lists(
    st.tuples(
        st.sampled_from([b"", b"", b"x", b" "]),
        st.sampled_from([b"--b1", b"--b1", b"--b", b"--b1x"]),
        st.sampled_from([b"", b"--", b"-", b"x"]),
        st.sampled_from([b"", b" ", b"\t", b" \t ", b"x"]),
        st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n"]),
    ).map(b"".join),
    max_size=12,
)


@settings(max_examples=1000)
@given(_LINES, st.integers(0, 3))
def test_delimiter_lines_are_found_as_rfc_2046_describes_them(
    lines: list[bytes], trim: int
) -> None:
    """The delimiter scanner against the RFC 2046 grammar written as a regular expression:
    ``--boundary``, ``--`` when it closes, transport padding, then a line break or the end."""
    body = b"\n" + b"".join(lines)
    end = max(1, len(body) - trim)
    grammar = re.compile(rb"^--b1(--)?[ \t]*(?:\r?\n|\Z)", re.MULTILINE)
    expected = [(m.start(), m.end(), bool(m.group(1))) for m in grammar.finditer(body, 1, end)]
    assert list(_delimiters(body, 1, end, "b1")) == expected


def test_missing_close_delimiter_is_a_truncation() -> None:
    with pytest.raises(MalformedMessage, match="no closing boundary"):
        parse_message(SIGNED[: SIGNED.index(b"--b1--")])


@pytest.mark.parametrize(
    ("limits", "raw", "match"),
    [
        (Limits(max_message_bytes=100), SIGNED, "message is"),
        (Limits(max_parts=2), SIGNED, "more than 2 MIME parts"),
        (Limits(max_depth=1), SIGNED, "deeper than 1"),
        (Limits(max_header_bytes=40), SIGNED, "header block larger"),
        (Limits(max_line_bytes=40), SIGNED, "header line longer"),
    ],
)
def test_limits_are_refused_with_their_own_message(limits: Limits, raw: bytes, match: str) -> None:
    with pytest.raises(LimitExceeded, match=match):
        parse_message(raw, limits)


def test_part_count_stops_early_on_a_flood_of_parts() -> None:
    body = b"".join(b"--b\r\n\r\nx\r\n" for _ in range(100_000)) + b"--b--\r\n"
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body
    with pytest.raises(LimitExceeded, match="more than 16 MIME parts"):
        parse_message(raw)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="a b"',
         ("multipart", "signed", {"protocol": "application/pkcs7-signature", "micalg": "sha-256", "boundary": "a b"})),
        ("Application/PKCS7-MIME; smime-type=enveloped-data; name=smime.p7m;",
         ("application", "pkcs7-mime", {"smime-type": "enveloped-data", "name": "smime.p7m"})),
        ('text/plain; title="a \\"quoted\\" word"', ("text", "plain", {"title": 'a "quoted" word'})),
    ],
)  # fmt: skip
def test_content_type_parameters(value: str, expected: tuple[str, str, dict[str, str]]) -> None:
    ct = parse_content_type(value)
    assert (ct.maintype, ct.subtype, ct.params) == expected


@pytest.mark.parametrize(
    "value", ["application", "text/plain; charset", "text/plain; a=1; a=2", 'text/plain; x="open']
)
def test_malformed_content_types_are_failures_not_defaults(value: str) -> None:
    with pytest.raises(MalformedMessage):
        parse_content_type(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("name*=utf-8''%C4%91.pdf", "đ.pdf"),
        ("name*=''plain", "plain"),  # no charset: US-ASCII
        ("name*0*=utf-8''%C4; name*1*=%91.pdf", "đ.pdf"),  # one character over two sections
        ('name*0*=utf-8\'\'%C4%91; name*1=" .pdf"', "đ .pdf"),  # a plain section after one
        ('name*1="b"; name*0="a"', "ab"),  # sections in any order
        ("name=old; name*=utf-8''new", "new"),  # RFC 2231 wins (RFC 6266 §4.3)
    ],
)  # fmt: skip
def test_rfc_2231_parameters_are_joined_and_decoded(value: str, expected: str) -> None:
    assert parse_content_type(f"application/pdf; {value}").params == {"name": expected}


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("name*1=b", r"sections \[1\]"),
        ("name*0=a; name*2=c", r"sections \[0, 2\]"),
        ("name*=utf-8''a; name*0*=utf-8''b", "section 0 given twice"),
        ("name*1234=a", "not an RFC 2231 name"),
        ("name*01=a", "not an RFC 2231 name"),
        ("name*=utf-8", "charset'language'"),
        ("name*=utf-8''%G1", "% not followed by two hex digits"),
        ("name*=utf-8''%C4", "not valid 'utf-8' text"),
        ("name*=x-no-such-charset''a", "not valid"),
        ("name*=base64''YQ", "not valid"),  # a codec, but not a text encoding
        ("name*=utf-7''%2B2AA-", "not valid 'utf-7' text"),  # a lone surrogate
    ],
)
def test_rfc_2231_values_that_do_not_decode_are_refused(value: str, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        parse_content_type(f"application/pdf; {value}")


def test_content_disposition_is_parsed_like_content_type() -> None:
    assert parse_disposition('Attachment; filename="a;b.pdf"; size=3') == (
        "attachment",
        {"filename": "a;b.pdf", "size": "3"},
    )
    for bad in ("", 'attachment; filename="open', "attachment; filename=a b"):
        with pytest.raises(MalformedMessage, match="Content-Disposition"):
            parse_disposition(bad)


def test_exactly_one_from_is_required() -> None:
    top = parse_message(b"From: a@x.vn\r\nFrom: b@x.vn\r\n\r\nbody")
    with pytest.raises(HeaderCountError, match="2 From headers"):
        single_header(top, "From")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a@X.VN", "a@x.vn"),
        ('"vanthu@snv.hanoi.gov.vn" <attacker@evil.example>', "attacker@evil.example"),
        ("Văn thư <vanthu@snv.hanoi.gov.vn>", "vanthu@snv.hanoi.gov.vn"),
    ],
)
def test_single_address_takes_the_addr_spec_never_the_display_name(
    value: str, expected: str
) -> None:
    assert single_address(value) == expected


@pytest.mark.parametrize("value", ["a@x.vn, b@x.vn", "undisclosed:;", "no address here", ""])
def test_single_address_refuses_anything_but_one_mailbox(value: str) -> None:
    with pytest.raises(HeaderCountError):
        single_address(value)


def test_nested_comments_in_from_are_refused_before_the_parser_recurses() -> None:
    """~1,500 nested comments made the standard library's parser raise RecursionError (an
    InternalError quarantine): refused, by name, before it is called."""
    nested = "(" * 1500 + ")" * 1500
    with pytest.raises(HeaderCountError, match="nests comments 1500 deep"):
        single_address(f"{nested} vanthu@snv.hanoi.gov.vn")
    deep = mime.MAX_COMMENT_NESTING * "(" + mime.MAX_COMMENT_NESTING * ")"
    assert single_address(f"{deep} vanthu@snv.hanoi.gov.vn") == "vanthu@snv.hanoi.gov.vn"


@pytest.mark.parametrize(
    "value",
    [
        '"' + "(" * 20 + '" <vanthu@snv.hanoi.gov.vn>',  # a quoted display name
        "Văn thư (phòng " + "\\( " * 20 + ") <vanthu@snv.hanoi.gov.vn>",  # quoted pairs
    ],
)
def test_parentheses_that_open_no_comment_are_not_counted(value: str) -> None:
    assert single_address(value) == "vanthu@snv.hanoi.gov.vn"


def test_remembered_answers_are_the_same_and_name_the_header() -> None:
    """Answers are remembered per header and value: a refusal stays a refusal, in words that
    name the header it was given for."""
    for _ in range(2):
        assert single_address("Văn thư <vanthu@snv.hanoi.gov.vn>") == "vanthu@snv.hanoi.gov.vn"
        with pytest.raises(HeaderCountError, match=r"^From must name"):
            single_address("no address")
        with pytest.raises(HeaderCountError, match=r"^Sender must name"):
            single_address("no address", "Sender")


def test_non_utf8_headers_are_refused() -> None:
    with pytest.raises(MalformedMessage, match="UTF-8"):
        parse_message(b"Subject: \xff\xfe\r\n\r\nbody")


def _reference_base64(data: bytes) -> bytes | None:
    """The rule of decode_base64, written plainly over binascii: ``None`` where it refuses."""
    chars = data.translate(None, b" \t\r\n")
    if re.fullmatch(rb"[A-Za-z0-9+/]*=*", chars) is None:
        return None
    body = chars.rstrip(b"=")
    short = -len(body) % 4  # padding the last quantum needs
    if short == 3 or len(chars) - len(body) < short:
        return None
    return binascii.a2b_base64(body + b"=" * short)


@settings(max_examples=600, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=40).map(lambda b: base64.encodebytes(b).replace(b"\n", b"\r\n")),
        st.text("AQgw+/=\r\n $", max_size=40).map(str.encode),
    ),
    cut=st.integers(1, 9),
)
def test_base64_decodes_as_the_plain_rule_says_across_any_slices(data: bytes, cut: int) -> None:
    expected = _reference_base64(data)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mime, "_SLICE", cut)  # slice boundaries anywhere
        for decode in (decode_base64, decode_base64_buffer):
            try:
                got: bytes | None = bytes(decode(data, limit=1000))
            except MalformedMessage:
                got = None
            assert got == expected


def test_base64_is_strict() -> None:
    assert decode_base64(b"aGVs\r\nbG8=\r\n", limit=100) == b"hello"
    with pytest.raises(MalformedMessage, match="invalid base64"):
        decode_base64(b"aGVs!bG8=", limit=100)
    with pytest.raises(MalformedMessage):
        decode_base64(b"aGVsbG8", limit=100)  # bad padding
    with pytest.raises(LimitExceeded):
        decode_base64(b"aGVsbG8gd29ybGQ=", limit=4)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=400), st.integers(0, 3000).map(bytes)))
def test_base64_lines_are_what_the_standard_library_writes_with_crlf(data: bytes) -> None:
    lines = b64_lines(data)
    assert lines == base64.encodebytes(data).replace(b"\n", b"\r\n")
    assert decode_base64(lines, limit=len(data) + 1) == data
