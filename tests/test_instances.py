"""Two ``gateway serve`` instances on one PostgreSQL: they share the work; one is killed with
SIGKILL mid-burst and the other finishes it. No message lost, none filed twice, and the
archive (one Merkle log, one sequencer) verifies."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from archive.db import Database
from gateway.demo import HUB_ADDRESS, DemoWorld
from tests import pg, served

pytestmark = pytest.mark.postgres

SNV = "vanthu@snv.hanoi.gov.vn"
BURST = 300


@pytest.fixture
def pg_home(pg_cluster: pg.PgCluster, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    name = pg_cluster.create_database("instances")
    yield tmp_path / "home", pg_cluster.url(name)
    pg_cluster.drop_database(name)


def test_two_instances_share_a_burst_and_one_finishes_when_the_other_is_killed(
    pg_home: tuple[Path, str],
) -> None:
    home, url = pg_home
    relay = served.Relay()
    controller, relay_port = relay.start()
    world = DemoWorld.create(datetime.now(UTC))
    world.install(home, b"throw-away passphrase", relay_port=relay_port, database_url=url)
    messages = [world.submission("H26.SNV") for _ in range(BURST)]
    first = served.start(home, name="first")
    second = served.start(home, name="second")
    ports = [first.smtp_port, second.smtp_port]
    clients = [
        served.Resender(messages[i::4], ports, mail_from=SNV, to=HUB_ADDRESS) for i in range(4)
    ]
    for c in clients:
        c.start()
    db = Database.open(url, migrate=False)
    try:
        while sum(len(c.acknowledged) for c in clients) < BURST // 3:
            time.sleep(0.01)
        first.kill()
        ports.remove(first.smtp_port)  # clients go on with the survivor
        for c in clients:
            c.join(timeout=300)
            assert not c.is_alive()
        served.wait_until_settled(db, timeout=300)
        digests = served.archived_digests(db)
        acknowledged = [raw for c in clients for raw in c.acknowledged]
        assert len(acknowledged) == BURST
        assert sorted(digests) == sorted(hashlib.sha256(m).hexdigest() for m in acknowledged)
        # both instances took mail in (the killed one before it died)
        assert all(
            sum(c.by_port.get(p, 0) for c in clients) > 0
            for p in (first.smtp_port, second.smtp_port)
        )
        assert len(relay.to(SNV)) >= BURST  # every sender got its receipt
        verify = served.gateway(home, "archive", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        with contextlib.suppress(Exception):
            second.stop()
        db.dispose()
        controller.stop()
