"""Fixtures of the outbound tests (receipts, deliveries, the sender, the outbox by hand): an
archive whose directory and certificates are the demo world's, the hub, and a relay that answers
as told. Loaded for every test module by ``pytest_plugins`` in conftest.py; a module that
defines a fixture of the same name uses its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from archive.blobs import BlobStore
from archive.db import Database
from archive.service import Archive
from formats.payload import Organ
from gateway.builder import Hub
from gateway.demo import DemoWorld
from gateway.relay import Relay
from keys import store
from tests.conftest import WORLD_AT
from tests.test_relay import LoopbackController, Peer


def archive_on(db: Database, world: DemoWorld) -> Archive:
    """An archive on ``db`` that signs with the demo world's hub key (a throw-away blob key)."""
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    return Archive(db, BlobStore(os.urandom(32)), "hub@test", (world.hub.cert, key), 1000)


def make_archive(url: str, world: DemoWorld) -> Archive:
    """An archive whose directory and certificates are the demo world's."""
    db = Database.open(url)
    with db.session() as s:
        for agency in world.directory:
            store.add_agency(s, agency, at=WORLD_AT, actor="test")
        for organ_id, issued in world.agencies.items():
            store.add_certificate(
                s, issued.cert, role="agency", organ_id=organ_id, at=WORLD_AT, actor="test"
            )
    return archive_on(db, world)


def make_hub(world: DemoWorld) -> Hub:
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    return Hub(
        "hub@exchange.hanoi.gov.vn",
        Organ("GATEWAY", "Cổng trao đổi"),
        (world.hub.cert, key),
        admin="admin@exchange.hanoi.gov.vn",
    )


def record_sessions(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """From now on, ``read_only`` of each transaction opened on ``db``, in order: whether a
    poll only looked or took the write lock."""
    sessions: list[bool] = []
    opened = db.session

    def session(*, read_only: bool = False, priority: bool = False) -> Any:
        sessions.append(read_only)
        return opened(read_only=read_only, priority=priority)

    monkeypatch.setattr(db, "session", session)
    return sessions


@pytest.fixture
def archive(tmp_path: Path, world: DemoWorld) -> Iterator[Archive]:
    made = make_archive(f"sqlite:///{tmp_path}/a.db", world)
    yield made
    made.db.dispose()


@pytest.fixture
def hub(world: DemoWorld) -> Hub:
    return make_hub(world)


@pytest.fixture
def peer() -> Iterator[tuple[Peer, Relay]]:
    """The relay: aiosmtpd answering as its :class:`Peer` is told."""
    handler = Peer()
    controller = LoopbackController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    try:
        yield handler, Relay("127.0.0.1", controller.port, security="none", timeout=10, helo="gw")
    finally:
        controller.stop()
