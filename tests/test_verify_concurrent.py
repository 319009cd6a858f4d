"""`archive verify` while the gateway files, on both engines.

Verify reads the log in several statements (entries, then every tree level, the head, the
checkpoints, the blobs). A writer that commits between them must not make an untouched archive
look tampered with ("tree node beyond the log", "the log head says …", "signed N entries but
only M remain"): verify sees one snapshot, the log as it was when it began. The writer commits
from verify's own progress callback, so the interleaving is the same on every run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from archive.blobs import BlobStore
from archive.db import Database
from archive.log import Entry, Item
from archive.service import Archive
from gateway.demo import DemoWorld
from keys import store
from tests.conftest import WORLD_AT


@pytest.fixture
def archive(database_url: str, world: DemoWorld) -> Iterator[Archive]:
    """An archive that signs a checkpoint every 5 entries, with the hub certificate stored."""
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    db = Database.open(database_url)
    try:
        with db.session() as s:
            # As `keys hub import` stores it: with its admin event (archive verify checks).
            store.add_certificate(s, world.hub.cert, role="hub", at=WORLD_AT, actor="test")
        yield Archive(db, BlobStore(os.urandom(32)), "hub@test", (world.hub.cert, key), 5)
    finally:
        db.dispose()


def _items(n: int, start: int = 0) -> list[Item]:
    return [
        Item(
            "message",
            WORLD_AT + timedelta(seconds=i),
            {"status": "accepted", "agency": "H26.SNV", "n": i},
            {"raw": f"raw {i}".encode() * 30},
        )
        for i in range(start, start + n)
    ]


def test_verify_sees_one_snapshot_while_the_gateway_files(archive: Archive) -> None:
    archive.file(_items(12))
    meanwhile: list[Entry] = []

    def progress(_stage: str, _done: int, _total: int) -> None:
        if not meanwhile:  # the gateway files 6 messages (and signs a checkpoint) meanwhile
            meanwhile.extend(archive.file(_items(6, 100)))

    report = archive.verify(progress=progress)
    assert len(meanwhile) == 6  # committed while verify was under way
    assert report.problems == []
    # The log as it was when verify began: the hub certificate's admin event, 12 messages.
    assert report.entries == 13
    after = archive.verify()
    assert after.ok and after.entries == 19
