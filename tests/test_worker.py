"""Workers: inbox → pipeline → archive, exactly once; duplicates and transient failures."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database
from archive.records import Transport
from archive.service import Archive
from gateway import intake
from gateway.demo import DemoWorld, tamper
from gateway.pipeline import Context
from gateway.worker import Worker
from keys.trust import TrustStore
from tests.conftest import WORLD_AT


@pytest.fixture
def archive(tmp_path: Path, world: DemoWorld) -> Archive:
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    return Archive(db, BlobStore(os.urandom(32)), "hub@test", (world.hub.cert, key), 1000)


def _receive(archive: Archive, raw: bytes, minutes: int = 0) -> int:
    at = WORLD_AT + timedelta(minutes=minutes)
    transport = Transport(
        at,
        "smtp",
        "127.0.0.1",
        "snv.hanoi.gov.vn",
        "vanthu@snv.hanoi.gov.vn",
        ("hub@exchange.hanoi.gov.vn",),
    )
    return intake.accept(archive.db, raw, transport)


def _worker(archive: Archive, ctx: Context, minutes: int = 5) -> Worker:
    return Worker(archive, lambda: ctx, clock=lambda: WORLD_AT + timedelta(minutes=minutes))


def test_every_message_is_filed_once_with_its_verdict(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    good = world.submission("H26.SNV")
    revoked = world.submission("H26.STP", signer=world.revoked["H26.STP"])
    numbers = [_receive(archive, m) for m in (good, tamper(good), revoked)]
    worker = _worker(archive, world_ctx)
    outcomes = worker.run_once()
    assert [(o.intake_id, o.disposition) for o in outcomes] == list(
        zip(numbers, ["accepted", "quarantined", "quarantined"], strict=True)
    )
    assert worker.run_once() == []  # nothing is processed twice
    with archive.db.session() as s:
        rows = s.query(t.Intake).order_by(t.Intake.id).all()
        assert [(r.state, r.archive_seq) for r in rows] == [("done", 0), ("done", 1), ("done", 2)]
        entry = archive.log.entry(s, 0)
        assert entry.fields["status"] == "accepted"
        assert entry.fields["agency"] == "H26.SNV"
        assert archive.blobs.get(s, entry.blobs["raw"]) == good
        assert entry.fields["transport"]["helo"] == "snv.hanoi.gov.vn"
    report = archive.verify()
    assert report.ok, report.problems


def test_a_duplicate_is_not_filed_again_but_a_forgery_reusing_its_id_is(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    good = world.submission("H26.SNV")
    _receive(archive, good)
    _receive(archive, good, minutes=1)  # the agency's mail client sent it twice
    _receive(archive, tamper(good), minutes=2)  # same Message-ID, not authentic
    outcomes = _worker(archive, world_ctx).run_once()
    assert [(o.disposition, o.archive_seq) for o in outcomes] == [
        ("accepted", 0),
        ("duplicate", 0),
        ("quarantined", 1),
    ]
    with archive.db.session() as s:
        assert archive.log.size(s) == 2


def test_a_transient_failure_is_retried_later_and_not_filed_meanwhile(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    number = _receive(archive, world.submission("H26.SNV"))
    no_crl = dataclasses.replace(world_ctx, trust=TrustStore(anchors=(world.root.cert,)))
    [outcome] = _worker(archive, no_crl).run_once()
    assert outcome.disposition == "retry"
    with archive.db.session() as s:
        row = s.get(t.Intake, number)
        assert row is not None
        assert (row.state, row.attempts, row.archive_seq) == ("retry", 1, None)
        assert archive.log.size(s) == 0
    assert _worker(archive, world_ctx, minutes=5).run_once() == []  # not due yet
    [later] = _worker(archive, world_ctx, minutes=7).run_once()
    assert (later.disposition, later.archive_seq) == ("accepted", 0)
