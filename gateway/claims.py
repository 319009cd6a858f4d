"""Claims given back, so that their work resumes.

Workers claim inbox rows (``working``) and outbox rows (``building``), and the sender outbox
rows (``sending``), under a name (:func:`claimant`) and a lease. A claim to decide or to build is
counted on its row (``claims``) and settling the row resets the count: a row claimed again and
again and never settled is what stops its workers (``MAX_CLAIMS``).

- When a process of this host is gone (killed, crashed), the supervisor gives its claims back
  at once rather than when their leases run out: at start-up (the previous run's, without
  counting them: the whole service stopped, not one worker on one row), and every
  :data:`RECLAIM_EVERY` seconds (a worker that died, another instance on this host).
- A worker whose cycle fails on the database's or the disk's trouble (locked, gone, full), and
  lives on, gives its claims back itself, uncounted (:class:`Unsettled`): that is not the
  rows' doing, and an outage of a few leases would otherwise set them aside.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, or_, select, update

from archive import tables as t
from archive.db import Database
from gateway.outbound import ENVIRONMENT, environmental

log = logging.getLogger("gateway.serve")

RECLAIM_EVERY = 5.0  # seconds between looks for claims held by dead processes of this host
#: The longest host name a claimant's name keeps (claims' ``worker`` columns hold 100).
HOST_NAME_KEPT = 64


@functools.cache
def this_host() -> str:
    """Who can judge a claimant alive by its PID: this host's name and, where Linux says, its
    PID namespace. Two containers given one host name (a compose file's ``hostname:``) each
    number their processes from 1: one's supervisor must not judge the other's workers by its
    own process table, and give their claims back while they work."""
    host = socket.gethostname()[:HOST_NAME_KEPT]
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return host
    return f"{host}/{namespace.removeprefix('pid:[').removesuffix(']')}"


def claimant(pid: int | None = None) -> str:
    """The name a process claims under: ``host:pid@started`` (:func:`this_host`; ``started``,
    the process's start in clock ticks after boot, where Linux says): a PID used again, by a
    process started later, is not the claimant that held it."""
    return _named(os.getpid() if pid is None else pid)


@functools.cache
def _named(pid: int) -> str:
    """Once per PID: a name read again could come out otherwise (``/proc`` unreadable for a
    moment, out of descriptors), and the rows claimed under the first would not be its own."""
    started = _started(pid)
    return f"{this_host()}:{pid}" + (f"@{started}" if started else "")


def _started(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks after boot (``/proc/PID/stat``, field 22:
    counted after the name, which may hold spaces and parentheses); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 1 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def release_stale_claims(db: Database, host: str, *, at_start: bool = False) -> int:
    """Release claims held by processes of ``host`` (:func:`this_host`) that are gone (their
    work resumes now).

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
                    values["claims"] = _uncounted(table)
                result = s.execute(
                    update(table)
                    .where(table.state.in_(busy), or_(*(table.worker == w for w in dead)))
                    .values(values)
                )
                released += result.rowcount  # type: ignore[attr-defined]
    return released


def _uncounted(table: type[t.Intake] | type[t.Outbox]) -> Any:
    """A row's claim count with its last claim taken back (never below 0)."""
    return case((table.claims > 0, table.claims - 1), else_=0)


def give_back_sending(db: Database, worker: str) -> int:
    """Rows ``worker`` holds to send (``sending``) back to ``ready``: its sender thread ended
    and another starts in the same process, whose claims no sweep gives back (the process is
    alive). A message that was in flight may go twice: at least once, never lost."""
    with db.session() as s:
        result = s.execute(
            update(t.Outbox)
            .where(t.Outbox.state == "sending", t.Outbox.worker == worker)
            .values(state="ready", worker=None, lease_until=None)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


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
    """Whether the claimant ``worker`` (:func:`claimant`) was a process of ``host`` that has
    ended; a name of another host or PID namespace, or not a claimant's, is never judged."""
    name, _, process = worker.rpartition(":")
    pid, _, started = process.partition("@")
    # A name given before names told PID namespaces apart (``host:pid``), by this host: the
    # claims of the run before an upgrade are given back at its start, as they were.
    before = not started and "/" not in name and name == socket.gethostname()[:HOST_NAME_KEPT]
    if (name != host and not before) or not (pid.isascii() and pid.isdigit()):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process of another user: it is there
    # The PID is in use: by the claimant, or by a process started after it ended.
    return bool(started) and _started(int(pid)) not in (started, None)


@dataclass
class Unsettled:
    """Claims of this worker that a cycle failed on the database's or the disk's trouble
    (:func:`gateway.outbound.environmental`: not a row the database refused) given back
    uncounted: that is not the rows' doing. At once if the database lets it, else at
    the start of the next cycle (:meth:`give_back` raises the database's trouble, and the
    worker's loop backs off). ``table`` rows in state ``busy`` go back to ``back``; only those
    still this worker's: a claim taken over meanwhile (its lease ran out) stays the other's.

    Any other failure (a defect of ours that one row may set off, every time) leaves the claim
    as it is, counted, until its lease runs out: then each row is claimed alone, and one that
    fails every time is set aside after ``MAX_CLAIMS``, while the rows behind it go on."""

    table: type[t.Intake] | type[t.Outbox]
    busy: str
    back: str
    held: list[int] = field(default_factory=list)

    def keep(self, db: Database, worker: str, ids: Sequence[int], failure: BaseException) -> None:
        """After a cycle failed with ``failure``: give ``ids`` back uncounted if the database
        or the disk failed (or keep them to give back next cycle); else leave them claimed."""
        if not environmental(failure):
            return
        self.held = sorted({*self.held, *ids})
        try:
            self.give_back(db, worker)
        except ENVIRONMENT as exc:
            log.warning("%d claims to give back when the database allows (%s)", len(self.held), exc)

    def give_back(self, db: Database, worker: str) -> None:
        if not self.held:
            return
        table = self.table
        with db.session() as s:
            s.execute(
                update(table)
                .where(table.id.in_(self.held), table.state == self.busy, table.worker == worker)
                .values(
                    state=self.back,
                    worker=None,
                    lease_until=None,
                    claims=_uncounted(table),
                )
            )
        self.held = []
