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
