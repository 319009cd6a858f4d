"""Attachment file names, from the sender's MIME to the manifest check, as clients write them.

A name is compared with the payload's manifest (an honest message whose names do not come
through is refused with AttachmentMismatch) and shown; it is never written into a header we
send. Names arrive quoted (with a ``;`` or ``"`` inside), as RFC 2231 ``filename*`` (our builder,
Thunderbird, Outlook, Python's email), or as RFC 2047 encoded-words inside the quotes (older
clients, and this builder before it wrote RFC 2231).
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata
import uuid
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP

import pytest
from hypothesis import given
from hypothesis import strategies as st

from formats.mime import parse_disposition, parse_entity
from formats.payload import Attachment as Listed
from formats.payload import Organ, build_payload
from formats.smime import (
    Attachment,
    _filename,
    build_message,
    filename_parameter,
    header_value,
    payload_entity,
    sign_entity,
    wrap_enveloped,
)
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.pipeline import Context, Verdict, process
from tests.conftest import WORLD_AT
from tests.hostile import _encrypt_inner

SNV, SNV_EMAIL = "H26.SNV", "vanthu@snv.hanoi.gov.vn"
VIETNAMESE = "Danh sách người nước ngoài tạm trú quý III.pdf"
#: 140 characters: RFC 2231 continuations, in our builder and in Python's email.
LONG = (
    "Báo cáo tình hình người nước ngoài tạm trú, lao động và học tập trên địa bàn thành phố "
    "Hà Nội quý III năm 2026 (bản có chữ ký số của Sở Nội vụ).pdf"
)


def _scan(name: str) -> Attachment:
    return Attachment(name, "application/pdf", b"%PDF-1.7 scan of " + name.encode())


def _payload(attachments: Sequence[Attachment]) -> bytes:
    """A document payload whose manifest lists ``attachments``."""
    return build_payload(
        "document",
        sender=Organ(SNV, None, SNV_EMAIL),
        recipients=[Organ("H26.CATP")],
        records=[{"DocumentType": "Công văn", "Summary": "Gửi kèm danh sách", "PageCount": 2}],
        document_number="7/SNV-VP",
        issued_on=WORLD_AT.date(),
        message_id=uuid.uuid4(),
        attachments=[
            Listed(a.filename, a.media_type, len(a.data), hashlib.sha256(a.data).hexdigest())
            for a in attachments
        ],
    ).to_xml()


def _built(
    world: DemoWorld, *, listed: Sequence[Attachment], attached: Sequence[Attachment]
) -> bytes:
    """A submission by Home Affairs from our builder: the manifest lists ``listed``, the
    message carries ``attached``."""
    snv = world.agencies[SNV]
    return build_message(
        _payload(listed),
        signer_cert=snv.cert,
        signer_key=snv.key,  # type: ignore[arg-type]
        recipients=[world.hub.cert],
        from_addr=SNV_EMAIL,
        to_addrs=[HUB_ADDRESS],
        message_id=f"<{uuid.uuid4()}@snv.hanoi.gov.vn>",
        date=WORLD_AT,
        attachments=attached,
    )


def _signed_and_sent(world: DemoWorld, ctx: Context, entity: bytes) -> Verdict:
    """``entity`` signed by Home Affairs, encrypted to the hub, through the pipeline."""
    snv = world.agencies[SNV]
    signed = sign_entity(entity, cert=snv.cert, key=snv.key)  # type: ignore[arg-type]
    return process(_encrypt_inner(world, signed), ctx, at=WORLD_AT)


@pytest.mark.parametrize(
    "name",
    ["danh-sach.pdf", VIETNAMESE, LONG, "biên bản; kỳ 2.pdf", 'bien-ban;ky-2 "ban sao".pdf'],
    ids=["ascii", "vietnamese", "long-vietnamese", "semicolon", "quotes"],
)
def test_names_come_through_our_builder_and_the_pipeline(
    world: DemoWorld, world_ctx: Context, name: str
) -> None:
    scan = _scan(name)
    raw = _built(world, listed=[scan], attached=[scan])

    verdict = process(raw, world_ctx, at=WORLD_AT)

    assert verdict.errors == ()
    assert verdict.accepted
    assert verdict.opened is not None
    assert verdict.opened.attachments == (scan,)


def test_a_decomposed_name_matches_its_precomposed_manifest_entry(
    world: DemoWorld, world_ctx: Context
) -> None:
    """macOS mail clients write Vietnamese file names decomposed (NFD); the manifest has them
    precomposed (NFC). The same name: accepted."""
    listed = _scan(unicodedata.normalize("NFC", VIETNAMESE))
    sent = Attachment(unicodedata.normalize("NFD", VIETNAMESE), listed.media_type, listed.data)
    assert sent.filename != listed.filename
    raw = _built(world, listed=[listed], attached=[sent])
    verdict = process(raw, world_ctx, at=WORLD_AT)
    assert verdict.errors == ()
    assert verdict.accepted


@pytest.mark.parametrize("name", [VIETNAMESE, LONG], ids=["one-section", "continuations"])
def test_rfc_2231_names_as_python_email_writes_them(
    world: DemoWorld, world_ctx: Context, name: str
) -> None:
    """``filename*=utf-8''…`` (and ``filename*0*=…`` sections), as Thunderbird, Outlook and
    Python's email write a non-ASCII name."""
    scan = _scan(name)
    message = EmailMessage(policy=SMTP)
    message.set_content(_payload([scan]), maintype="application", subtype="xml", cte="base64")
    message.add_attachment(scan.data, maintype="application", subtype="pdf", filename=name)
    entity = message.as_bytes()
    entity = entity[entity.index(b"Content-Type") :]  # the entity, without MIME-Version
    assert b"filename*" in entity

    verdict = _signed_and_sent(world, world_ctx, entity)

    assert verdict.errors == ()
    assert verdict.opened is not None
    assert verdict.opened.attachments == (scan,)


def test_rfc_2047_names_inside_quotes_as_older_clients_write_them(
    world: DemoWorld, world_ctx: Context
) -> None:
    """Encoded-words folded inside the quotes: what this builder wrote before RFC 2231."""
    scan = _scan(LONG)
    words = header_value(LONG)
    assert "\r\n " in words  # several words, folded
    xml = _payload([scan])
    boundary = b"=_old_builder"
    entity = (
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
        b"--" + boundary + b"\r\n" + payload_entity(xml) + b"\r\n"
        b"--" + boundary + b"\r\n"
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="' + words.encode() + b'"\r\n\r\n'
        + base64.encodebytes(scan.data).replace(b"\n", b"\r\n")
        + b"\r\n--" + boundary + b"--\r\n"
    )  # fmt: skip

    verdict = _signed_and_sent(world, world_ctx, entity)

    assert verdict.errors == ()
    assert verdict.opened is not None
    assert verdict.opened.attachments == (scan,)


def _name_of(disposition: str) -> str | None:
    part = parse_entity(f"Content-Disposition: {disposition}\r\n\r\nbody".encode())
    return _filename(part)


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        ('attachment; filename="a;b.pdf"; size=3', "a;b.pdf"),
        ("attachment; filename*=utf-8''Bi%C3%AAn%20b%E1%BA%A3n.pdf", "Biên bản.pdf"),
        # RFC 6266 §4.3: the RFC 2231 value wins over the plain one beside it, in either order.
        ("attachment; filename*=utf-8''%C4%91.pdf; filename=\"d.pdf\"", "đ.pdf"),
        ("attachment; filename=\"d.pdf\"; filename*=utf-8''%C4%91.pdf", "đ.pdf"),
        ("attachment; filename*=iso-8859-1'vi'caf%E9.pdf", "café.pdf"),
        ('attachment; filename="=?utf-8?q?bi=C3=AAn_b=E1=BA=A3n.pdf?="', "biên bản.pdf"),
        ("attachment", None),
    ],
)
def test_names_are_read_as_parameters(disposition: str, expected: str | None) -> None:
    assert _name_of(disposition) == expected


def test_the_content_type_name_is_read_when_there_is_no_filename() -> None:
    part = parse_entity(b"Content-Type: application/pdf; name*=utf-8''%C4%91.pdf\r\n\r\nbody")
    assert _filename(part) == "đ.pdf"


@pytest.mark.parametrize(
    "disposition",
    [
        "attachment; filename*=utf-8''a%0D%0ASubject%3A%20forged.pdf",
        'attachment; filename="=?utf-8?b?YQ0KU3ViamVjdDogZm9yZ2VkLnBkZg==?="',
    ],
    ids=["rfc2231", "rfc2047"],
)
def test_decoded_line_breaks_never_reach_a_name(disposition: str) -> None:
    """Decoding can make control characters a header could not carry; they become U+FFFD (no
    manifest name holds them, so such a message is refused as a mismatch)."""
    assert _name_of(disposition) == "a\ufffd\ufffdSubject: forged.pdf"


@given(
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
        min_size=1,
        max_size=255,
    )
)
def test_our_filename_parameter_reads_back_and_keeps_lines_short(name: str) -> None:
    header = f"Content-Disposition: attachment;\r\n {filename_parameter(name)}\r\n"
    assert all(len(line) <= 78 for line in header.split("\r\n"))
    part = parse_entity(header.encode() + b"\r\nbody")
    disposition = part.get("content-disposition")
    assert disposition is not None
    assert parse_disposition(disposition)[1]["filename"] == name


@pytest.mark.parametrize("smime_type", ["enveloped-data", "authEnveloped-data"])
def test_our_enveloped_messages_keep_header_lines_within_78(
    world: DemoWorld, smime_type: str
) -> None:
    """RFC 5322 §2.1.1: a line SHOULD be at most 78 characters; the Content-Type line was 82
    (86 for AES-GCM) and is folded before its name parameter, which reads back the same."""
    message = wrap_enveloped(
        b"\x30\x00",
        smime_type=smime_type,
        from_addr=HUB_ADDRESS,
        to_addrs=["vanthu@snv.hanoi.gov.vn"],
        message_id="<r@hub>",
        date=WORLD_AT,
        subject="Biên nhận / Receipt",
    )
    head = message.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    content_type = parse_entity(message).get("content-type")
    assert content_type is not None
    assert "application/pkcs7-mime" in content_type
    assert f"smime-type={smime_type}" in content_type
    assert 'name="smime.p7m"' in content_type


@pytest.mark.parametrize("detached", [True, False], ids=["multipart-signed", "opaque"])
def test_our_signed_entities_keep_header_lines_within_78(world: DemoWorld, detached: bool) -> None:
    snv = world.agencies[SNV]
    entity = b"Content-Type: text/plain\r\n\r\nxin chao\r\n"
    signed = sign_entity(entity, cert=snv.cert, key=snv.key, detached=detached)  # type: ignore[arg-type]
    head = signed.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
