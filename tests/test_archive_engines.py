"""The archive on both engines (SQLite and a real PostgreSQL): appends, proofs, checkpoints,
concurrent writers, and tampering found by `verify` — with dialect-neutral SQL."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import delete, update

from archive import merkle
from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database
from archive.log import Item
from archive.service import Archive
from gateway.demo import DemoWorld
from keys import store
from tests.conftest import WORLD_AT


@pytest.fixture
def opened() -> Iterator[list[Archive]]:
    archives: list[Archive] = []
    yield archives
    for a in archives:
        a.db.dispose()


def _archive(url: str, world: DemoWorld, every: int, opened: list[Archive]) -> Archive:
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    db = Database.open(url)
    with db.session() as s:
        # As `keys hub import` stores it: with its admin event (archive verify checks).
        store.add_certificate(s, world.hub.cert, role="hub", at=WORLD_AT, actor="test")
    archive = Archive(db, BlobStore(os.urandom(32)), "hub@test", (world.hub.cert, key), every)
    opened.append(archive)
    return archive


def _items(n: int, start: int = 0) -> list[Item]:
    return [
        Item(
            "message",
            WORLD_AT + timedelta(seconds=i),
            {"status": "accepted", "agency": "H26.SNV", "n": i, "text": "Sở Nội vụ"},
            {"raw": f"raw {i}".encode() * 30},
        )
        for i in range(start, start + n)
    ]


def test_file_prove_and_verify(database_url: str, world: DemoWorld, opened: list[Archive]) -> None:
    archive = _archive(database_url, world, 10, opened)
    for batch in range(5):
        archive.file(_items(7, batch * 7))
    report = archive.verify()
    assert report.ok, report.problems
    # The hub certificate's admin event, then 35 messages; signed at 15 and 29 (every ≥ 10).
    assert (report.entries, report.checkpoints) == (36, 2)
    with archive.db.session() as s:
        root = archive.log.root(s)
        for seq in (0, 17, 35):
            proof = archive.log.inclusion(s, seq)
            leaf = archive.log.entry(s, seq).leaf_hash
            assert merkle.verify_inclusion(leaf, seq, 36, proof, root)
        assert merkle.verify_consistency(
            10, 36, archive.log.root(s, 10), root, archive.log.consistency(s, 10)
        )


def test_concurrent_writers_get_consecutive_numbers(
    database_url: str, world: DemoWorld, opened: list[Archive]
) -> None:
    archive = _archive(database_url, world, 1000, opened)
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for k in range(10):
                archive.file(_items(3, offset + 3 * k))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(1000 * w,)) for w in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    report = archive.verify()
    assert report.ok, report.problems
    assert report.entries == 91  # the hub certificate's admin event, and 90 messages


def test_tampering_is_named_on_every_engine(
    database_url: str, world: DemoWorld, opened: list[Archive]
) -> None:
    archive = _archive(database_url, world, 5, opened)
    archive.file(_items(12))
    with archive.db.engine.begin() as c:
        c.execute(update(t.LogEntry).where(t.LogEntry.seq == 3).values(status="rejected"))
        c.execute(delete(t.LogEntry).where(t.LogEntry.seq == 8))
    problems = "\n".join(archive.verify().problems)
    assert "entry 3: search column status says 'rejected', the record 'accepted'" in problems
    assert "entry 8 is missing (deleted rows)" in problems
    assert "checkpoint #1 (size 13" in problems  # the certificate's event, 12 messages
