"""keys.binding: the signer must be the sending agency."""

from __future__ import annotations

from datetime import date

import pytest

from formats.errors import AgencyMismatch, SenderMismatch, UnknownAgency
from keys.binding import (
    AgencyIs,
    AllOf,
    BindingContext,
    EmailIs,
    SenderIsAgency,
    UnsafeNoOp,
)
from keys.directory import Agency, Directory
from keys.trust import ValidatedSigner, validate_signer
from tests.pki import AGENCY_EMAIL, AGENCY_ORGAN_ID, T0, Pki

TODAY = date(2026, 3, 1)
DIRECTORY = Directory.of(
    [
        Agency(AGENCY_ORGAN_ID, "Sở Tư pháp", "Department of Justice", frozenset({AGENCY_EMAIL})),
        Agency("000.00.08.H26", "Sở Tài chính", "Finance", frozenset({"vanthu@sotc.hanoi.gov.vn"})),
    ]
)


@pytest.fixture(scope="module")
def signer(pki: Pki) -> ValidatedSigner:
    return validate_signer(pki.store(), pki.agency.cert, at=T0)


def ctx(signer: ValidatedSigner, from_addr: str = AGENCY_EMAIL) -> BindingContext:
    return BindingContext(signer=signer, from_addr=from_addr, at=TODAY)


def policy(from_addr: str = AGENCY_EMAIL, organ_id: str = AGENCY_ORGAN_ID) -> AllOf:
    return AllOf(EmailIs(from_addr), SenderIsAgency(DIRECTORY), AgencyIs(organ_id, DIRECTORY))


def test_the_agency_itself_passes(signer: ValidatedSigner) -> None:
    policy().verify(ctx(signer))
    assert policy().failures(ctx(signer)) == []


def test_domain_case_does_not_matter(signer: ValidatedSigner) -> None:
    EmailIs("vanthu@SoTuPhap.HaNoi.gov.vn").verify(ctx(signer))


def test_local_part_case_does(signer: ValidatedSigner) -> None:
    with pytest.raises(SenderMismatch):
        EmailIs("VanThu@sotuphap.hanoi.gov.vn").verify(ctx(signer))


def test_sender_mismatch_names_both_addresses_and_the_fix(signer: ValidatedSigner) -> None:
    with pytest.raises(SenderMismatch) as caught:
        EmailIs("vanthu@sotc.hanoi.gov.vn").verify(ctx(signer, "vanthu@sotc.hanoi.gov.vn"))
    assert caught.value.message == (
        f"From <vanthu@sotc.hanoi.gov.vn> does not match certificate e-mail <{AGENCY_EMAIL}>; "
        f"re-issue the certificate or send from {AGENCY_EMAIL}"
    )


def test_display_names_and_lists_are_not_a_single_address(signer: ValidatedSigner) -> None:
    for bad in (f"Văn thư <{AGENCY_EMAIL}>", f"{AGENCY_EMAIL}, x@y.vn"):
        with pytest.raises(SenderMismatch, match="single bare address"):
            EmailIs(bad).verify(ctx(signer))


def test_certificate_without_email(pki: Pki) -> None:
    cert = pki.leaf(with_email_san=False).cert
    bare = validate_signer(pki.store(), cert, at=T0)
    with pytest.raises(SenderMismatch, match="carries no e-mail address"):
        EmailIs(AGENCY_EMAIL).verify(ctx(bare))


def test_unknown_sender(signer: ValidatedSigner) -> None:
    with pytest.raises(UnknownAgency, match=r"stranger@x\.vn"):
        SenderIsAgency(DIRECTORY).verify(ctx(signer, "stranger@x.vn"))
    with pytest.raises(UnknownAgency):
        AgencyIs(AGENCY_ORGAN_ID, DIRECTORY).verify(ctx(signer, "stranger@x.vn"))


def test_payload_organ_id_must_be_the_senders_agency(signer: ValidatedSigner) -> None:
    with pytest.raises(AgencyMismatch, match=r"000\.00\.08\.H26 does not match 000\.00\.12\.H26"):
        AgencyIs("000.00.08.H26", DIRECTORY).verify(ctx(signer))


def test_payload_organ_id_must_match_the_certificate(signer: ValidatedSigner) -> None:
    # The From mailbox belongs to 000.00.08.H26 and the payload says so, but the certificate
    # was issued to 000.00.12.H26.
    with pytest.raises(AgencyMismatch, match=r"OrganId 000\.00\.12\.H26 in the signer"):
        AgencyIs("000.00.08.H26", DIRECTORY).verify(ctx(signer, "vanthu@sotc.hanoi.gov.vn"))


def test_all_of_raises_the_first_and_collects_every_failure(signer: ValidatedSigner) -> None:
    stranger = ctx(signer, "stranger@x.vn")
    combined = AllOf(policy("stranger@x.vn", "000.00.08.H26"), UnsafeNoOp())
    with pytest.raises(SenderMismatch):
        combined.verify(stranger)
    kinds = [type(e) for e in combined.failures(stranger)]
    assert kinds == [SenderMismatch, UnknownAgency, UnknownAgency]


def test_all_of_needs_a_policy() -> None:
    with pytest.raises(ValueError, match="UnsafeNoOp"):
        AllOf()


def test_unsafe_no_op_checks_nothing(signer: ValidatedSigner) -> None:
    UnsafeNoOp().verify(ctx(signer, "anyone@anywhere.example"))
