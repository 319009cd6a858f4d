"""keys.directory: the agency directory value."""

from __future__ import annotations

import re
from datetime import date

import pytest

from formats.errors import InputError
from keys.directory import Agency, Directory, normalize_email

TU_PHAP = Agency(
    organ_id="000.00.12.H26",
    name_vi="Sở Tư pháp",
    name_en="Department of Justice",
    emails=frozenset({"vanthu@SoTuPhap.Hanoi.gov.vn"}),
    supervisor="000.00.00.H26",
)
OLD_KHDT = Agency(
    organ_id="000.00.07.H26",
    name_vi="Sở Kế hoạch và Đầu tư",
    name_en="Department of Planning and Investment",
    emails=frozenset({"vanthu@sokhdt.hanoi.gov.vn"}),
    valid_to=date(2025, 2, 28),
)
TAI_CHINH = Agency(  # merged successor: takes over the old mailbox from 1 March 2025
    organ_id="000.00.08.H26",
    name_vi="Sở Tài chính",
    name_en="Department of Finance",
    emails=frozenset({"vanthu@sotc.hanoi.gov.vn", "vanthu@sokhdt.hanoi.gov.vn"}),
    valid_from=date(2025, 3, 1),
)


def test_lookup_by_email_and_code() -> None:
    directory = Directory.of([TU_PHAP, OLD_KHDT, TAI_CHINH])
    assert len(directory) == 3
    assert directory.get("000.00.12.H26") is TU_PHAP
    assert directory.get("nope") is None
    assert directory.by_email("vanthu@sotuphap.hanoi.gov.vn", date(2026, 1, 1)) is TU_PHAP
    assert directory.by_email("VanThu@sotuphap.hanoi.gov.vn", date(2026, 1, 1)) is None
    assert directory.by_email("not an address", date(2026, 1, 1)) is None


def test_mailbox_moves_to_the_successor_on_the_merger_date() -> None:
    directory = Directory.of([TU_PHAP, OLD_KHDT, TAI_CHINH])
    addr = "vanthu@sokhdt.hanoi.gov.vn"
    assert directory.by_email(addr, date(2025, 2, 28)) is OLD_KHDT  # valid_to is inclusive
    assert directory.by_email(addr, date(2025, 3, 1)) is TAI_CHINH


def test_duplicate_codes_are_refused() -> None:
    with pytest.raises(InputError, match=r"000\.00\.12\.H26 appears twice"):
        Directory.of([TU_PHAP, TU_PHAP])


def test_mailbox_claimed_twice_at_once_is_refused() -> None:
    clash = Agency("000.00.99.H26", "Sở Khác", "Other", frozenset({"vanthu@sotuphap.hanoi.gov.vn"}))
    with pytest.raises(InputError, match=r"vanthu@sotuphap.hanoi.gov.vn is claimed by both"):
        Directory.of([TU_PHAP, clash])


def test_agency_checks_itself() -> None:
    with pytest.raises(InputError, match="before valid_from"):
        Agency("X", "X", "X", frozenset(), valid_from=date(2025, 2, 1), valid_to=date(2025, 1, 1))
    with pytest.raises(InputError, match="not a bare e-mail"):
        Agency("X", "X", "X", frozenset({"Văn thư <a@b.vn>"}))
    with pytest.raises(InputError, match="empty OrganId"):
        Agency(" ", "X", "X", frozenset())


def test_normalize_email() -> None:
    assert normalize_email(" Local.Part@Example.VN ") == "Local.Part@example.vn"
    for bad in ("", "@x.vn", "a@", "a b@x.vn", "a@x.vn, b@x.vn"):
        with pytest.raises(ValueError, match="bare e-mail"):
            normalize_email(bad)


@pytest.mark.parametrize(
    ("address", "fix"),
    [
        ("nguyễn.vanthu@snv.hanoi.gov.vn", "give an ASCII mailbox instead"),
        (
            "vanthu@sở.hanoi.gov.vn",
            "write the domain in its ASCII (xn--) form: vanthu@xn--s-lym.hanoi.gov.vn",
        ),
    ],
)
def test_a_non_ascii_mailbox_is_refused_naming_it_and_the_fix(address: str, fix: str) -> None:
    """RFC 6531: such a mailbox is reached only over SMTPUTF8, which the gateway does not send
    (the relay's To header is never an encoded-word either: tests/test_outbound_headers.py)."""
    said = f"{address!r} is not an ASCII e-mail address: the gateway sends mail without SMTPUTF8"
    with pytest.raises(ValueError, match=re.escape(said)) as caught:
        normalize_email(address)
    assert str(caught.value).endswith(fix)
    with pytest.raises(InputError) as refused:
        Agency("H26.SNV", "Sở Nội vụ", "Home Affairs", frozenset({"a@snv.vn", address}))
    assert refused.value.message.startswith(f"agency H26.SNV: {said}")
    assert Directory.of([TU_PHAP]).by_email(address, date(2026, 1, 1)) is None
