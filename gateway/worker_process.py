"""A pipeline worker process of ``gateway serve``, and what every process of it loads.

A worker claims messages from the durable inbox, decides and files them, and builds the
receipts and deliveries owed (:class:`gateway.worker.Worker`, :class:`gateway.builder.Builder`),
in a loop that never exits on a failure (no crash loop). It stops when the supervisor says so,
when it is sent SIGTERM, or when the supervisor is gone: killed with ``kill -9``, the supervisor
leaves no one to tell it, so the worker asks Linux for a SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``) and its loop also notices the parent gone.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from archive.service import Archive, SigningKey
from formats.errors import ConfigError, GatewayError
from formats.payload import Organ
from gateway import logs, outbound
from gateway import settings as settings_mod
from gateway import worker as worker_mod
from gateway.builder import Builder, Hub, outbound_limits
from gateway.loading import (
    load_context,
    open_archive,
    open_database,
    usable_hub_fingerprints,
)
from gateway.outbound import ENVIRONMENT, pause
from gateway.pipeline import Context
from gateway.settings import Settings
from gateway.worker import Worker, worker_name

log = logging.getLogger("gateway.serve")

IDLE = 0.02  # seconds a worker waits when there is nothing to do
#: While intake is backlogged, receipts and deliveries are built (32 at a time) every Nth
#: cycle of the loop: in a burst of 10 KB messages a cycle files about 60 in ~0.1 s, so every
#: few seconds, enough to keep sending during a long overload; the rest waits for the burst to
#: end, when every cycle builds. Signing receipts is CPU the burst's filing needs: every 64th rather
#: than every 16th cycle archived more in 4 of 4 side-by-side pairs of 10 KB bursts
#: (564 → 616, 644 → 648, 592 → 608, 549 → 604 msgs/s; bench/e2e_bench.py).
BUILD_EVERY = 64
CONTEXT_CHECK = 2.0  # seconds between checks for changed keys, directory or revocation data
#: How much lower the workers' CPU priority is than the supervisor's (``nice``). With the
#: machine's cores busy deciding and filing, the listener's replies and intake commits would
#: otherwise wait for a core behind them, and each client with them: 10 KB bursts, side by
#: side, the listener took 432 → 520–650 msgs/s and the archive 410 → 460–510
#: (bench/e2e_bench.py). The workers still get every core the listener leaves idle (it is one
#: thread of Python, at most one core), so filing keeps up whenever the machine can.
WORKER_NICE = 5
PARENT_CHECK = 0.5  # seconds a worker waits at most before it looks whether its parent is gone
#: Seconds one cycle of a worker's loop may take before the worker is taken for hung and ends
#: itself (:class:`Watchdog`): twice the longest lease, so that work the leases allow is never
#: cut off. Its claims are then given back and counted as a death's are (``MAX_CLAIMS``).
HUNG_AFTER = 2 * max(worker_mod.LEASE, outbound.LEASE).total_seconds()
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
EXIT_START_FAILED = 3  # a worker's exit status when it could not start (logged first)


def hub_signer(ctx: Context, at: datetime) -> SigningKey:
    """The hub key that signs receipts and checkpoints at ``at``: the newest of the context's
    keys — those usable when it was loaded, newest first (:func:`gateway.loading.hub_keys`:
    not retired, inside the admin's window) — whose certificate is valid at ``at``. It is the
    key `gateway archive checkpoint` signs with."""
    for k in ctx.keys:
        if k.cert.not_valid_before_utc <= at <= k.cert.not_valid_after_utc:
            return k.cert, k.key
    raise ConfigError("no hub certificate is valid now: receipts cannot be signed")


class ContextCache:
    """The pipeline context, loaded again when an admin changes keys, agencies or evidence."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings, self.db = settings, db
        self._version: tuple[Any, ...] | None = None
        self._ctx: Context | None = None
        self._checked = 0.0

    def __call__(self) -> Context:
        now = time.monotonic()
        if self._ctx is None or now - self._checked >= CONTEXT_CHECK:
            self._checked = now
            version = self._current_version()
            if version != self._version or self._ctx is None:
                self._ctx = load_context(self.settings, self.db)
                self._version = version
        return self._ctx

    def _current_version(self) -> tuple[Any, ...]:
        with self.db.session(read_only=True) as s:
            return (
                s.scalar(select(func.max(t.AdminEvent.seq))),
                s.scalar(select(func.max(t.RevocationEvidence.id))),
                # A hub key's window or validity starts or ends with no admin event: the keys
                # held must follow the clock too.
                usable_hub_fingerprints(self.settings, s, datetime.now(UTC)),
            )


def hub_identity(settings: Settings, ctx: Context, at: datetime) -> Hub:
    return Hub(
        settings.hub.address,
        Organ(settings.hub.organ_id, settings.hub.organ_name, settings.hub.address),
        hub_signer(ctx, at),
        settings.serve.admin_address,
    )


class Stopping(Protocol):
    """What a worker's loop is told to stop by (a threading or multiprocessing Event, or a
    :class:`WorkerStop`)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class WorkerStop:
    """When a worker process stops: the supervisor says so (``event``), the process is sent
    SIGTERM (:meth:`ask`, safe in a signal handler: it touches no lock), or the supervisor is
    gone (the parent process id is no longer ``parent``; nobody would say so after kill -9)."""

    def __init__(self, event: ProcessEvent, parent: int) -> None:
        self.event, self.parent = event, parent
        self.asked = False

    def ask(self) -> None:
        # Not event.set(): in a signal handler that interrupted event.wait(), a
        # multiprocessing Condition's notify would wait for this very thread (a deadlock).
        self.asked = True

    def orphaned(self) -> bool:
        return os.getppid() != self.parent

    def is_set(self) -> bool:
        return self.asked or self.event.is_set() or self.orphaned()

    def wait(self, timeout: float | None = None) -> bool:
        """Like Event.wait, looking at the parent and SIGTERM every PARENT_CHECK seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = PARENT_CHECK if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self.event.wait(min(left, PARENT_CHECK))
        return True


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent dies, even by
    SIGKILL (prctl(2) PR_SET_PDEATHSIG). False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    return bool(done)


def worker_main(
    home: str,
    index: int,
    stop: ProcessEvent,
    log_format: str,
    log_level: str = "info",
    parent: int | None = None,
) -> None:
    """One pipeline process: claim, process, file, build what is owed; until told to stop, or
    until the supervisor (``parent``, by default the process that started this one) is gone.
    A failure to start is logged (in the log format asked for) and ends the process with
    EXIT_START_FAILED; the supervisor starts it again a little later."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    stopping = WorkerStop(stop, os.getppid() if parent is None else parent)
    signal.signal(signal.SIGTERM, lambda *_: stopping.ask())
    logs.configure(log_format, log_level)
    if not die_with_parent():
        log.debug("worker %d: no parent-death signal here; the loop watches the parent", index)
    # The supervisor may have died before the line above took effect: then no signal comes.
    if stopping.orphaned():
        log.warning("worker %d: the supervisor is gone; not starting", index)
        return
    try:
        settings = settings_mod.load(Path(home))
        db = open_database(settings)
        worker, builder, refresh = _start_worker(settings, db)
    except GatewayError as exc:
        log.error("worker %d could not start: %s", index, exc.message)
        sys.exit(EXIT_START_FAILED)
    except Exception:  # a defect or the environment: a log record, not a bare traceback
        log.exception("worker %d could not start", index)
        sys.exit(EXIT_START_FAILED)
    # Below the supervisor: a peer waits for the listener's 250, nobody for a filing.
    os.nice(WORKER_NICE)
    log.info("worker %d ready", index)
    # What start-up loaded (modules, schemas, keys, the directory) lives as long as the process:
    # kept out of the collector's full passes, which otherwise walk it again and again.
    gc.freeze()
    work(worker, builder, stopping, index, refresh)
    db.dispose()
    if stopping.orphaned():
        log.warning("worker %d: the supervisor is gone; stopped", index)


def _start_worker(settings: Settings, db: Database) -> tuple[Worker, Builder, Callable[[], None]]:
    contexts = ContextCache(settings, db)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731
    name = worker_name()
    archive = open_archive(settings, db, hub_signer(contexts(), clock()))
    worker = Worker(
        archive,
        contexts,
        clock=clock,
        name=name,
        peers=settings.serve.workers,
        admin=settings.serve.admin_address,
    )
    builder = Builder(
        archive,
        hub_identity(settings, contexts(), clock()),
        lambda: contexts().directory,
        clock,
        name,
        limits=outbound_limits(settings.limits),
    )
    return worker, builder, _signing(settings, contexts, archive, builder)


def _signing(
    settings: Settings, contexts: ContextCache, archive: Archive, builder: Builder
) -> Callable[[], None]:
    """What brings the hub's signing key up to date once the context is loaded again (a key
    retired, a window ended, a new key): receipts, deliveries and checkpoints are then signed
    with the key `gateway archive checkpoint` would use, without a restart."""
    held = [contexts()]

    def refresh() -> None:
        ctx = contexts()
        if ctx is held[0]:
            return
        now = datetime.now(UTC)
        builder.hub = hub_identity(settings, ctx, now)
        archive.signer = hub_signer(ctx, now)
        held[0] = ctx
        log.info("hub signing key now %s", builder.hub.signer[0].subject.rfc4514_string())

    return refresh


def work(
    worker: Worker,
    builder: Builder,
    stop: Stopping,
    index: int,
    refresh: Callable[[], None] = lambda: None,
) -> None:
    """A worker's loop: take mail in, file it, build what is owed; until ``stop``. Failures
    back off and are tried again: the process never exits on one (no crash loop). ``refresh``
    brings the signing key up to date with the keys of now (:func:`_signing`)."""
    failures = 0
    cycle = 0
    watchdog = Watchdog(HUNG_AFTER)
    try:
        while not stop.is_set():
            cycle += 1
            watchdog.arm()
            failures, busy = _cycle(worker, builder, stop, index, refresh, cycle, failures)
            if not busy:
                stop.wait(IDLE)
    finally:
        watchdog.cancel()


class Watchdog:
    """This process's watchdog, as Postfix's daemons have one: unless armed again within
    ``seconds``, the tracebacks of its threads go to standard error and the process ends (exit
    status 1). A cycle stuck for good (a loop without end in native code, a read that never
    returns) would otherwise hold a worker, and its core, for ever; the supervisor starts a new
    one. faulthandler's timer is a thread of C: it fires even while the stuck code holds the
    interpreter's lock. Arming starts a new timer thread, so it is armed again only once
    ``seconds / 20`` have passed: a process stuck ends between 95% and 100% of ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed_at: float | None = None

    def arm(self) -> None:
        now = time.monotonic()
        if self.armed_at is None or now - self.armed_at >= self.seconds / 20:
            faulthandler.dump_traceback_later(self.seconds, exit=True, file=sys.__stderr__ or 2)
            self.armed_at = now

    def cancel(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self.armed_at = None


def _cycle(
    worker: Worker,
    builder: Builder,
    stop: Stopping,
    index: int,
    refresh: Callable[[], None],
    cycle: int,
    failures: int,
) -> tuple[int, bool]:
    """One cycle of :func:`work`: (failures in a row now, whether it did anything). A failure
    is logged and waited out here (back-off)."""
    try:
        refresh()
        # Taking mail in comes first: while intake is backlogged (a burst), receipts and
        # deliveries are built every few cycles; otherwise, steady load included, every
        # cycle, so that they keep pace with what is filed.
        filed = worker.run_once()
        built = builder.run_once() if build_now(worker.backlog, cycle) else 0
        return 0, bool(filed) or bool(built)
    except ENVIRONMENT as exc:
        log.warning("worker %d: %s; trying again", index, exc)
    except GatewayError as exc:  # e.g. no hub key usable any more: what to fix, one line
        log.error("worker %d: %s; trying again", index, exc.message)
    except Exception:  # a defect of ours: logged, and the process stays up
        log.exception("worker %d: unexpected failure; trying again", index)
    stop.wait(pause(failures + 1, first=1.0, most=30.0))
    return failures + 1, True


def build_now(backlog: bool, cycle: int) -> bool:
    """Whether a worker builds receipts and deliveries in this cycle of its loop."""
    return not backlog or cycle % BUILD_EVERY == 0
