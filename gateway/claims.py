"""Claims held by processes that are gone: given back, so that their work resumes.

Workers claim inbox rows (``working``) and outbox rows (``building``), and the sender outbox
rows (``sending``), under the name ``host:pid`` and a lease. When a process of this host is
gone (killed, crashed), the supervisor gives its claims back at once rather than when their
leases run out: at start-up (the previous run's), and every :data:`RECLAIM_EVERY` seconds
(a worker that died, another instance on this host).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sqlalchemy import case, or_, select, update

from archive import tables as t
from archive.db import Database
from gateway.outbound import ENVIRONMENT

log = logging.getLogger("gateway.serve")

RECLAIM_EVERY = 5.0  # seconds between looks for claims held by dead processes of this host


def release_stale_claims(db: Database, host: str, *, at_start: bool = False) -> int:
    """Release claims held by processes of ``host`` that are gone (their work resumes now).

    A message's claim, or a claim to build, that ended this way counts against it
    (:data:`gateway.worker.MAX_CLAIMS`, :data:`gateway.builder.MAX_CLAIMS`), unless
    ``at_start``: then the whole service stopped (killed, the machine lost power), not one
    worker on one message."""
    released = 0
    with db.session() as s:
        for table, busy, back in (
            (t.Intake, ("working",), "new"),
            (t.Outbox, ("building",), "new"),
            (t.Outbox, ("sending",), "ready"),
        ):
            holders = s.scalars(select(table.worker).where(table.state.in_(busy)).distinct()).all()
            dead = [w for w in holders if w and _gone(w, host)]
            if dead:
                values: dict[str, Any] = {"state": back, "worker": None, "lease_until": None}
                if at_start:
                    values["claims"] = case((table.claims > 0, table.claims - 1), else_=0)
                result = s.execute(
                    update(table)
                    .where(table.state.in_(busy), or_(*(table.worker == w for w in dead)))
                    .values(values)
                )
                released += result.rowcount  # type: ignore[attr-defined]
    return released


def sweep_stale_claims(db: Database, host: str) -> None:
    """:func:`release_stale_claims`, saying what it resumed; the database's trouble (locked,
    unreachable, damaged) is a warning and the next sweep tries again, never the end of the
    supervisor."""
    try:
        if released := release_stale_claims(db, host):
            log.warning("resumed %d items held by a stopped process", released)
    except ENVIRONMENT as exc:
        log.warning("could not look for stale claims: %s", exc)


def _gone(worker: str, host: str) -> bool:
    name, _, pid = worker.rpartition(":")
    if worker == "waiting":
        return False
    if name != host or not (pid.isascii() and pid.isdigit()):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
