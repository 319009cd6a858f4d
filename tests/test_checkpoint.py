"""Checkpoint bodies (archive.checkpoint): the text round-trips, and a body whose time names
no instant is refused when parsed, whoever signed it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from archive import checkpoint as cp
from tests.conftest import WORLD_AT

CHECKPOINT = cp.Checkpoint("hub@exchange.hanoi.gov.vn", 1024, bytes(range(32)), WORLD_AT)
TIME = b"time: 2026-11-02T03:00:00.000000Z\r\n"


def test_a_body_round_trips() -> None:
    body = CHECKPOINT.body()
    assert TIME in body
    assert cp.Checkpoint.parse(body) == CHECKPOINT


def test_a_time_with_another_offset_is_the_same_instant() -> None:
    body = CHECKPOINT.body().replace(TIME, b"time: 2026-11-02T10:00:00+07:00\r\n")
    at = cp.Checkpoint.parse(body).at
    assert at == WORLD_AT and at.utcoffset() == timedelta(hours=7)


@pytest.mark.parametrize(
    "time", [b"2026-11-02T03:00:00.000000", b"2026-11-02T03:00", b"2026-11-02"]
)
def test_a_time_without_offset_is_refused(time: bytes) -> None:
    """Such a time cannot be compared with a certificate's validity (verify-bundle --ca
    raised TypeError on it): it is no checkpoint."""
    body = CHECKPOINT.body().replace(TIME, b"time: " + time + b"\r\n")
    with pytest.raises(cp.CheckpointError, match="has no offset"):
        cp.Checkpoint.parse(body)
