"""The pipeline end to end on the demo world: every step, every outcome, time as an argument."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from datetime import timedelta
from typing import Any

import pytest

from archive.records import Transport
from formats.errors import (
    AgencyMismatch,
    AttachmentMismatch,
    CertificateExpired,
    RevocationUnavailable,
    SchemaInvalid,
    SenderMismatch,
    SignatureInvalid,
    UnknownAgency,
    UnknownRecipient,
)
from formats.payload import Attachment as Listed
from formats.payload import Organ, build_payload
from formats.smime import Attachment, build_message
from gateway.demo import HUB_ADDRESS, DemoWorld, tamper
from gateway.filing import message_item
from gateway.pipeline import STEPS, Context, process
from gateway.verdict import TRANSITIONS, Verdict, can_move, disposition_for
from keys.directory import Directory
from tests.conftest import WORLD_AT

SNV = "H26.SNV"
SNV_EMAIL = "vanthu@snv.hanoi.gov.vn"


def test_a_genuine_submission_is_accepted_with_everything_it_proves(
    world: DemoWorld, world_ctx: Context
) -> None:
    raw = world.submission(SNV)
    verdict = process(raw, world_ctx, at=WORLD_AT)

    assert verdict.disposition == "accepted"
    assert verdict.errors == ()
    assert [s.outcome for s in verdict.steps] == ["ok"] * len(STEPS)
    assert verdict.smtp_reply.startswith("250 ")
    assert verdict.receipt_status == "03"
    assert verdict.agency is not None and verdict.agency.organ_id == SNV
    assert verdict.signer is not None and verdict.signer.emails == (SNV_EMAIL,)
    assert verdict.payload is not None
    assert verdict.payload.exchange.category == "work-permit"
    assert str(verdict.payload.exchange.period_start) == "2026-09-16"
    assert verdict.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert verdict.opened is not None
    assert verdict.opened.payload_sha256 == hashlib.sha256(verdict.opened.payload).hexdigest()
    summary = verdict.as_dict()
    assert summary["payload"]["records"] == 2
    assert summary["signer"]["emails"] == [SNV_EMAIL]


def test_the_entry_of_a_message_that_decrypted_marks_its_raw_bytes_dense(
    world: DemoWorld, world_ctx: Context
) -> None:
    """Base64 of ciphertext is stored by Huffman coding alone (LZ77 finds nothing in it, at
    twice the CPU); a message that did not decrypt may be anything, and is judged by its bytes.
    Its signer's fields, kept for the next message of the same certificate, are the same."""
    raw = world.submission(SNV)
    transport = Transport(WORLD_AT, "smtp", "192.0.2.1")
    item = message_item(process(raw, world_ctx, at=WORLD_AT), raw, transport)
    assert item.dense == {"raw"}
    again = message_item(process(raw, world_ctx, at=WORLD_AT), raw, transport)
    assert again.fields["signer"] == item.fields["signer"]
    assert again.fields["signer"]["subject"].startswith("serialNumber=H26.SNV,")
    assert again.blobs["chain"] == item.blobs["chain"]
    plain = b"From: a@b.vn\r\nTo: hub@b.vn\r\n\r\nnot encrypted\r\n"
    assert message_item(process(plain, world_ctx, at=WORLD_AT), plain, transport).dense == set()


def test_tampering_is_caught_and_nothing_after_it_runs(
    world: DemoWorld, world_ctx: Context
) -> None:
    raw = tamper(world.submission(SNV))
    verdict = process(raw, world_ctx, at=WORLD_AT)
    assert verdict.disposition == "quarantined"
    assert verdict.raw_sha256 == hashlib.sha256(raw).hexdigest()  # though nothing opened it
    assert isinstance(verdict.errors[0], SignatureInvalid)
    outcomes = {s.name: s.outcome for s in verdict.steps}
    assert outcomes["decrypt-verify"] == "failed"
    assert outcomes["payload"] == "skipped"
    assert verdict.payload is None


def test_certificates_are_judged_at_the_instant_given(world: DemoWorld, world_ctx: Context) -> None:
    raw = world.submission(SNV)
    later = world.agencies[SNV].cert.not_valid_after_utc + timedelta(days=1)
    verdict = process(raw, world_ctx, at=later)
    assert verdict.disposition != "accepted"
    assert any(isinstance(e, CertificateExpired) for e in verdict.errors)


def test_a_from_that_is_neither_the_signer_nor_an_agency_gives_both_reasons(
    world: DemoWorld, world_ctx: Context
) -> None:
    raw = world.submission(SNV, from_addr="someone@elsewhere.example")
    verdict = process(raw, world_ctx, at=WORLD_AT)
    assert verdict.disposition == "quarantined"
    assert [type(e) for e in verdict.errors] == [SenderMismatch, UnknownAgency]
    assert verdict.receipt_status == "02"


def test_a_from_whose_quoted_local_part_differs_from_the_agency_mailbox_is_not_it(
    world: DemoWorld, world_ctx: Context
) -> None:
    """``"\\ vanthu"@…`` is the mailbox `` vanthu`` (RFC 5321: the local part compares
    exactly), not the agency's ``vanthu``: it was accepted, the space stripped, and its
    receipt built from the inbound text failed the status schema."""
    raw = world.submission(SNV, from_addr='"\\ vanthu"@snv.hanoi.gov.vn')
    verdict = process(raw, world_ctx, at=WORLD_AT)
    assert verdict.disposition != "accepted"
    assert SenderMismatch in [type(e) for e in verdict.errors]


def test_payload_from_another_agency_is_rejected_not_quarantined(
    world: DemoWorld, world_ctx: Context
) -> None:
    """The sender is authenticated, so a signed rejection can go back to it."""
    verdict = process(world.submission(SNV, payload_from="H26.CATP"), world_ctx, at=WORLD_AT)
    assert verdict.disposition == "rejected"
    assert [type(e) for e in verdict.errors] == [AgencyMismatch]
    assert "H26.CATP" in verdict.errors[0].message


@pytest.mark.parametrize(
    ("police", "why", "why_vi"),
    [
        (None, "H26.CATP is not an agency in the hub's directory",
         "cơ quan nhận (To) H26.CATP không có trong danh bạ của cổng: không chuyển"),
        ({"valid_to": WORLD_AT.date() - timedelta(days=1)}, "ceased after",
         "H26.CATP (Công an thành phố Hà Nội) đã thôi hoạt động sau ngày 2026-11-01"),
        ({"valid_from": WORLD_AT.date() + timedelta(days=1)}, "is in being only from",
         "H26.CATP (Công an thành phố Hà Nội) chỉ hoạt động từ ngày 2026-11-03"),
    ],
)  # fmt: skip
def test_a_payload_to_an_agency_the_hub_cannot_deliver_to_is_rejected(
    world: DemoWorld, world_ctx: Context, police: dict[str, Any] | None, why: str, why_vi: str
) -> None:
    """To names an agency missing from the directory, merged away or not yet in being: it was
    accepted, receipted 03, and its delivery could only fail (the admin alerted, the sender
    never told). The authenticated sender now gets a rejection saying which agency and why."""
    others = [a for a in world.directory if a.organ_id != "H26.CATP"]
    agency = world.directory.get("H26.CATP")
    assert agency is not None
    changed = [] if police is None else [dataclasses.replace(agency, **police)]
    ctx = dataclasses.replace(world_ctx, directory=Directory.of([*others, *changed]))
    verdict = process(world.submission(SNV), ctx, at=WORLD_AT)
    assert verdict.disposition == "rejected" and verdict.receipt_status == "02"
    [error] = verdict.errors
    assert isinstance(error, UnknownRecipient) and why in error.message
    assert error.message_vi is not None and why_vi in error.message_vi
    assert verdict.smtp_reply.startswith("550 5.1.1 ")
    assert dict((s.name, s.outcome) for s in verdict.steps)["recipients"] == "failed"


def _document_with(
    world: DemoWorld,
    listed: list[Listed],
    attached: list[Attachment],
    message_id: str = "<doc-7@snv.hanoi.gov.vn>",
) -> bytes:
    payload = build_payload(
        "document",
        sender=Organ(SNV, None, SNV_EMAIL),
        recipients=[Organ("H26.CATP")],
        records=[{"DocumentType": "Công văn", "Summary": "Gửi kèm danh sách", "PageCount": 2}],
        document_number="7/SNV-VP",
        issued_on=WORLD_AT.date(),
        message_id=uuid.UUID(int=7),
        attachments=listed,
    )
    signer = world.agencies[SNV]
    return build_message(
        payload.to_xml(),
        signer_cert=signer.cert,
        signer_key=signer.key,  # type: ignore[arg-type]
        recipients=[world.hub.cert],
        from_addr=SNV_EMAIL,
        to_addrs=[HUB_ADDRESS],
        message_id=message_id,
        date=WORLD_AT,
        attachments=attached,
    )


def _listed(a: Attachment) -> Listed:
    return Listed(a.filename, a.media_type, len(a.data), hashlib.sha256(a.data).hexdigest())


def test_attachments_must_match_the_manifest(world: DemoWorld, world_ctx: Context) -> None:
    scan = Attachment("danh-sach.pdf", "application/pdf", b"%PDF-1.7 scan")
    other = Attachment("extra.txt", "text/plain", b"not listed")

    good = process(_document_with(world, [_listed(scan)], [scan]), world_ctx, at=WORLD_AT)
    assert good.accepted, good.errors
    assert good.opened is not None and good.opened.attachments[0].data == scan.data

    extra = process(_document_with(world, [_listed(scan)], [scan, other]), world_ctx, at=WORLD_AT)
    assert [type(e) for e in extra.errors] == [AttachmentMismatch]
    assert "extra.txt" in extra.errors[0].message
    assert extra.errors[0].message_vi == (
        "được đính kèm nhưng không có trong danh mục: extra.txt; hãy đính kèm đúng các tệp mà "
        "dữ liệu liệt kê"
    )

    swapped = Attachment(scan.filename, scan.media_type, b"%PDF-1.7 other")
    altered = process(_document_with(world, [_listed(scan)], [swapped]), world_ctx, at=WORLD_AT)
    assert [type(e) for e in altered.errors] == [AttachmentMismatch]
    assert altered.errors[0].message_vi is not None
    assert altered.errors[0].message_vi.startswith(
        "có trong danh mục nhưng không được đính kèm (hoặc đã bị sửa): danh-sach.pdf"
    )


def test_process_refuses_a_naive_time(world: DemoWorld, world_ctx: Context) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        process(world.submission(SNV), world_ctx, at=WORLD_AT.replace(tzinfo=None))


def test_state_machine() -> None:
    assert can_move("received", "accepted")
    assert can_move("accepted", "delivered")
    assert not can_move("rejected", "accepted")
    assert not can_move("received", "delivered")
    assert all(target in TRANSITIONS for targets in TRANSITIONS.values() for target in targets)


def test_a_verdict_to_retry_answers_with_its_transient_reason() -> None:
    """A permanent reason found before a transient one does not make the retry a 5xx: the
    message is to be tried again, so its reply is the transient error's 4xx."""
    errors = (SchemaInvalid("field X is missing"), RevocationUnavailable("no CRL for the CA yet"))
    disposition = disposition_for(errors, authenticated=True)
    verdict = Verdict(disposition=disposition, errors=errors, steps=(), raw_sha256="0" * 64)
    assert disposition == "retry"
    assert verdict.smtp_reply.startswith("451 4.7.5 ")
    rejected = Verdict(disposition="rejected", errors=errors[:1], steps=(), raw_sha256="0" * 64)
    assert rejected.smtp_reply.startswith("5")
