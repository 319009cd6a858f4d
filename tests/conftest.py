"""Shared pytest fixtures.

Keep each group clearly marked; other groups may be added below.
"""

from __future__ import annotations

import pytest

# --- PKI (keys/ trust layer) ------------------------------------------------------------------
# Keys are generated once per session (tests.pki.key caches them); certificates and CRLs for
# the standard root → intermediate → agency chain are made once here. Tests that need a variant
# issue it from `pki.inter` with `pki.leaf(...)`.
from tests.pki import Pki, build_pki

#: Fixtures shared by the outbound and the listener tests (a module may define its own of the
#: same name).
pytest_plugins = ["tests.outbox_world", "tests.smtp_world"]


@pytest.fixture(scope="session")
def pki() -> Pki:
    return build_pki()


# --- end of PKI fixtures ----------------------------------------------------------------------


# --- the demo world (gateway pipeline) --------------------------------------------------------
# A root CA, the hub, three Hanoi agencies and a revoked certificate, made once per session at
# the fixed instant WORLD_AT; `world.context()` is a ready pipeline Context.
from datetime import UTC, datetime  # noqa: E402

from gateway.demo import DemoWorld  # noqa: E402

WORLD_AT = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def world() -> DemoWorld:
    return DemoWorld.create(WORLD_AT)


@pytest.fixture(scope="session")
def world_ctx(world: DemoWorld):  # type: ignore[no-untyped-def]
    return world.context()


@pytest.fixture(scope="module")
def relay_port() -> Iterator[int]:
    """A real aiosmtpd relay on loopback for homes `world.install` makes (tests.served)."""
    from tests import served

    controller, port = served.Relay().start()
    yield port
    controller.stop()


# --- databases (archive/ storage module) ------------------------------------------------------
# `database_url` runs a test once on SQLite (a file in tmp_path) and once on PostgreSQL (a fresh
# database in a throw-away cluster started once per session by tests.pg, dropped after the test).
# Without PostgreSQL server binaries the postgresql runs are skipped, except under CI (or with
# TESTS_REQUIRE_POSTGRES set), where they fail: CI must never skip them silently.
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

from tests import pg, servers  # noqa: E402


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.PgCluster]:
    cluster = servers.start_or_skip(
        pg.start, pg.PgUnavailable, "PostgreSQL", "TESTS_REQUIRE_POSTGRES"
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/archive.db"
        return
    cluster: pg.PgCluster = request.getfixturevalue("pg_cluster")
    name = cluster.create_database(request.node.name)
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


# --- Hypothesis ---------------------------------------------------------------------------
# No test depends on how fast this machine is: no per-example deadline, and no health check
# that fails a test because generating its inputs was slow while the machine was busy (seen in
# CI: one draw of 0.97 s under load). Tests still set their own max_examples.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("gateway", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gateway")
