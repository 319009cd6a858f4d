"""``gateway serve``: the running gateway.

One supervisor process holds what waits on the network — the SMTP and LMTP listeners (each
answers ``250`` only once the message is durably in the intake table), the IMAP poller, the
sender that hands outbound mail to the relay, and the metrics endpoint. The CPU work —
decrypting, verifying, parsing, filing, signing receipts, re-encrypting deliveries — runs in
``[serve] workers`` separate processes, so it never stalls a listener's event loop and uses
every core. Workers claim work with leases in the database, so several processes (and, on
PostgreSQL, several machines) share the queue without a coordinator.

Start-up resumes whatever a crash left half done: claims held by processes of this host that
no longer run are released at once (:mod:`gateway.claims`; others expire with their lease).
Stopping (SIGTERM or SIGINT) closes the listeners first, then lets the workers finish the batch
in hand; the sender stops between two messages: the one in flight is answered (within
:data:`STOP_GRACE`), what the relay answered is recorded, and the rows it did not try are given
back as they were, so that nothing is sent twice after a graceful stop. The listeners and the
metrics endpoint are bound before any worker starts: an address in use stops
start-up with one line naming the setting. Workers never outlive the supervisor: killed with
``kill -9``, it leaves no one to tell them to stop, so each worker asks Linux for a SIGTERM when
its parent dies (``PR_SET_PDEATHSIG``) and its loop also notices the parent gone.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import multiprocessing as mp
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from multiprocessing.synchronize import Event as ProcessEvent
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from archive.db import Database
from archive.service import Archive
from formats.errors import ConfigError, GatewayError
from formats.vntime import VN_TZ
from gateway import settings as settings_mod
from gateway.claims import (
    RECLAIM_EVERY,
    give_back_sending,
    release_stale_claims,
    sweep_stale_claims,
    this_host,
)
from gateway.loading import (
    load_context,
    load_directory_merged,
    open_archive,
    open_database,
    secret,
)
from gateway.metrics import MetricsServer, Tally, render
from gateway.outbound import ENVIRONMENT, pause
from gateway.pipeline import Context
from gateway.sender import Sender
from gateway.settings import Settings, host_port
from gateway.workdays import Calendar
from gateway.worker import worker_name
from gateway.worker_process import hub_signer, worker_main

if TYPE_CHECKING:
    from gateway.relay import Relay

log = logging.getLogger("gateway.serve")


#: Seconds a stop waits for the sender after the workers (up to 30 s), within the service
#: manager's stop timeout (deploy/systemd/gateway.service: TimeoutStopSec=60). The message in
#: flight is waited for rather than cut off: once its data has gone, the relay may have taken
#: it, and a message cut off then would be recorded ``retry`` and sent again. One still in
#: flight after this is sent again after the next start, as after a crash (at least once,
#: never lost).
STOP_GRACE = 20.0


#: Seconds between two starts of one of the supervisor's threads that keeps ending.
THREAD_RESTART = 5.0


class Threads:
    """The supervisor's threads (the sender, the scheduler, the IMAP poller). Each loop logs
    its failures and goes on; should one end all the same while the service runs (an exception
    no loop catches, ``SystemExit`` from a library), :meth:`revive` starts it again, with an
    ERROR line, at most once every :data:`THREAD_RESTART` seconds: without it, nothing would be
    sent, reminded or polled until the next restart, and nothing would say so. ``again``, run
    before a thread is started again, gives back what the ended one held."""

    def __init__(self) -> None:
        self._targets: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        self._again: dict[str, Callable[[], object]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._started: dict[str, float] = {}

    def start(
        self,
        name: str,
        target: Callable[..., None],
        *args: Any,
        again: Callable[[], object] | None = None,
    ) -> threading.Thread:
        self._targets[name] = (target, args)
        if again is not None:
            self._again[name] = again
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads[name], self._started[name] = thread, time.monotonic()
        return thread

    def get(self, name: str) -> threading.Thread | None:
        return self._threads.get(name)

    def revive(self, stop: threading.Event) -> list[str]:
        """Start again each thread that has ended (none should while the service runs; all
        do once ``stop`` is set: then none is)."""
        again = []
        for name, thread in list(self._threads.items()):
            if thread.is_alive() or time.monotonic() - self._started[name] < THREAD_RESTART:
                continue
            if stop.is_set():
                break
            log.error("the %s thread ended; starting it again", name)
            if (before := self._again.get(name)) is not None:
                try:
                    before()
                except ENVIRONMENT as exc:  # what it held waits for its lease instead
                    log.warning("the %s thread's work in hand is not given back yet: %s", name, exc)
            target, args = self._targets[name]
            self.start(name, target, *args)
            again.append(name)
        return again

    def join(self, name: str, timeout: float) -> bool:
        """Wait up to ``timeout`` for thread ``name`` to end; whether it has (or never ran)."""
        thread = self._threads.get(name)
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()


@dataclass
class Supervisor:
    settings: Settings
    stop: threading.Event = field(default_factory=threading.Event)
    log_format: str = "json"
    log_level: str = "info"
    on_ready: Callable[[dict[str, Any]], None] = lambda _info: None
    #: Set by :meth:`ask_to_stop` (a signal handler); the main loop then sets ``stop``.
    asked: bool = False

    def ask_to_stop(self, *_signal: Any) -> None:
        """SIGTERM and SIGINT: stop. Not ``stop.set()`` here: a handler runs in the main thread
        between two of its bytecodes, maybe while that thread holds the Event's lock (in
        ``stop.wait``), and the Event's lock is not reentrant: a deadlock. The main loop looks
        at this flag every half second."""
        self.asked = True

    def run(self) -> None:
        settings = self.settings
        descriptors(settings)
        db = open_database(settings)
        ctx = load_context(settings, db)  # fails here, clearly, if keys or trust are missing
        from gateway.relay import Relay  # (the workers never load the relay client)

        relay = Relay.from_settings(settings)  # so does a [relay] the sender could not use
        now = datetime.now(UTC)
        signer = hub_signer(ctx, now)
        archive = open_archive(settings, db, signer)  # creates the master key once, here
        released = release_stale_claims(db, this_host(), at_start=True)
        if released:
            log.info("resumed %d items left claimed by stopped processes", released)
        spawn = mp.get_context("spawn")
        workers_stop = spawn.Event()
        processes: list[Any] = []  # the same list throughout: metrics counts the live ones

        def start_worker(index: int) -> Any:
            p = spawn.Process(
                target=worker_main,
                args=(
                    str(settings.home),
                    index,
                    workers_stop,
                    self.log_format,
                    self.log_level,
                    os.getpid(),
                ),
                name=f"gateway-worker-{index}",
                daemon=True,
            )
            p.start()
            return p

        listeners: dict[str, Any] = {}
        metrics: MetricsServer | None = None
        threads = Threads()
        try:
            # Addresses first: one in use (or not ours to bind) ends start-up here, with one
            # line naming the setting, before any worker process or thread has started.
            listeners = self._listeners(db, ctx)
            metrics = self._metrics(db, listeners, processes)
            self._imap(db, threads)
            processes.extend(start_worker(i) for i in range(settings.serve.workers))
        except BaseException:
            self.stop.set()
            for lst in listeners.values():
                lst.stop()
            if metrics is not None:
                metrics.stop()
            threads.join("imap", timeout=30)
            _stop_workers(workers_stop, processes, timeout=5)
            db.dispose()
            raise
        threads.start(
            "sender",
            self._send_loop,
            archive,
            relay,
            # Its rows in flight are this process's: no sweep would give them back before
            # their lease ran out.
            again=lambda: give_back_sending(db, worker_name()),
        )
        if settings.compliance.remind_at != settings_mod.REMIND_OFF:
            threads.start("scheduler", self._schedule, db)
        info = {
            "listeners": {name: lst.port for name, lst in listeners.items()},
            "metrics": metrics.port if metrics else None,
            "workers": len(processes),
            "pid": os.getpid(),
        }
        log.info("gateway serving", extra={"fields": info})
        gc.freeze()  # as in the workers: start-up's objects stay; full passes skip them
        failed: Exception | None = None
        try:
            self.on_ready(info)
        except Exception as exc:  # (the ready file cannot be written) stop as on SIGTERM
            log.error("start-up could not be announced; stopping")
            failed = exc
            self.stop.set()
        restarts: dict[int, float] = {}
        last_sweep = time.monotonic()
        while not self.stop.wait(0.5):
            if self.asked:
                self.stop.set()
                break
            threads.revive(self.stop)
            if time.monotonic() - last_sweep > RECLAIM_EVERY:
                # Another instance on this host may have died: its claims resume here now
                # rather than when their leases run out.
                last_sweep = time.monotonic()
                sweep_stale_claims(db, this_host())
            for i, p in enumerate(processes):
                if not p.is_alive() and time.monotonic() - restarts.get(i, 0.0) > 5.0:
                    log.error("worker %d exited (code %s); starting it again", i, p.exitcode)
                    restarts[i] = time.monotonic()
                    processes[i] = start_worker(i)
        log.info("stopping: no new mail accepted; finishing work in hand")
        for lst in listeners.values():
            lst.stop()
        _stop_workers(workers_stop, processes, timeout=30)
        if not threads.join("sender", timeout=1):  # (the thread of now, started again or not)
            log.info(
                "stopping: waiting for the message in flight to the relay (up to %g s)",
                STOP_GRACE,
            )
            if not threads.join("sender", timeout=STOP_GRACE):
                log.error("stopping: the sender did not finish; its rows resume at the next start")
        threads.join("imap", timeout=30)
        if not threads.join("scheduler", timeout=10):  # a reminder run under way
            log.warning(
                "stopping: the reminder run did not finish; it runs again at the next start"
            )
        if metrics is not None:
            metrics.stop()
        db.dispose()
        log.info("stopped")
        if failed is not None:
            raise failed

    def _metrics(
        self, db: Database, listeners: dict[str, Any], processes: list[Any]
    ) -> MetricsServer | None:
        address = self.settings.serve.metrics
        if not address:
            return None
        host, port = host_port(address, "[serve] metrics")
        tally = Tally()  # each scrape counts what changed since the one before
        try:
            server = MetricsServer(
                host,
                port,
                lambda: render(
                    db,
                    _merged_replies(listeners),
                    sum(1 for p in processes if p.is_alive()),
                    tally,
                ),
            )
        except OSError as exc:
            raise _bind_error("[serve] metrics", address, exc) from None
        return server.start()

    def _listeners(self, db: Database, ctx: Context) -> dict[str, Any]:
        s = self.settings
        tls = _tls_context(s)
        authenticator = None
        if s.listen.auth_file is not None:
            from gateway.submitters import Authenticator, read_file

            authenticator = Authenticator(read_file(s.path(s.listen.auth_file)))
        out: dict[str, Any] = {}
        for name, address in (("smtp", s.listen.smtp), ("lmtp", s.listen.lmtp)):
            if not address:
                continue
            host, port = host_port(address, f"[listen] {name}")
            try:
                out[name] = self._listen(db, name, host, port, tls, authenticator)
            except BaseException as exc:
                for started in out.values():
                    started.stop()
                if isinstance(exc, OSError):
                    raise _bind_error(f"[listen] {name}", address, exc) from None
                raise
        return out

    def _listen(
        self, db: Database, name: str, host: str, port: int, tls: Any, authenticator: Any
    ) -> Any:
        from gateway import smtp  # aiosmtpd is needed only when listening

        s = self.settings
        return smtp.start(
            db,
            host=host,
            port=port,
            hub_addresses=[s.hub.address],
            limits=s.limits,
            tls_context=tls if name == "smtp" else None,
            require_tls=s.listen.require_tls and name == "smtp",
            lmtp=name == "lmtp",
            max_recipients=s.listen.max_recipients,
            timeout=s.listen.timeout,
            max_sessions=s.listen.max_sessions,
            max_sessions_per_ip=s.listen.max_sessions_per_ip,
            authenticator=authenticator if name == "smtp" else None,
            require_auth=s.listen.require_auth and name == "smtp",
        )

    def _send_loop(self, archive: Archive, relay: Relay) -> None:
        from gateway.relay import RelaySession

        sender = Sender(
            archive,
            lambda: RelaySession(relay),  # one connection per batch
            lambda: datetime.now(UTC),
            worker_name(),
            admin=self.settings.serve.admin_address,
            give_up_after=timedelta(hours=self.settings.serve.give_up_after_hours),
            relay_deadline=relay.deadline,
            stop=self.stop,  # between two messages: recorded, and the rest given back
        )
        failures = 0
        while not self.stop.is_set():
            try:
                busy = bool(sender.run_once())
                failures = 0
            except ENVIRONMENT as exc:
                failures += 1
                log.warning("sender: %s; trying again", exc)
                self.stop.wait(pause(failures, first=1.0, most=30.0))
                continue
            except Exception:  # a defect of ours: logged; the thread goes on (it alone sends)
                failures += 1
                log.exception("sender: unexpected failure; trying again")
                self.stop.wait(pause(failures, first=1.0, most=30.0))
                continue
            if not busy:
                self.stop.wait(0.2)

    def _schedule(self, db: Database) -> None:
        """Each working day at [compliance] remind_at (local time): the reminder run. Missed
        while stopped? It runs at start-up on a working day after that hour. Idempotent, and
        on PostgreSQL serialised across instances (gateway.remind)."""
        from gateway import remind

        settings = self.settings
        hour, minute = (int(x) for x in settings.compliance.remind_at.split(":"))
        calendar: Calendar | None = None
        last: date | None = None
        while not self.stop.is_set():
            now = datetime.now(UTC)
            local = now.astimezone(VN_TZ)
            today = local.date()
            try:
                calendar = calendar or remind.calendar_of(settings)
                due = (local.hour, local.minute) >= (hour, minute)
                if last != today and due and calendar.is_working_day(today):
                    with db.session(read_only=True) as s:
                        directory = load_directory_merged(settings, s)
                    result = remind.run(
                        db,
                        calendar=calendar,
                        directory=directory,
                        templates=remind.templates_of(settings),
                        policy=remind.policy_of(settings),
                        hub=settings.hub.address,
                        now=now,
                        admin=settings.serve.admin_address,
                    )
                    consents = remind.record_consents(db, calendar=calendar, now=now)
                    last = today
                    log.info(
                        "reminders: %d owed, %d queued; %d new deemed consent(s) recorded",
                        len(result.planned),
                        len(result.queued),
                        consents,
                    )
            except (GatewayError, SQLAlchemyError, OSError) as exc:
                log.error("reminder run failed (tried again in a minute): %s", exc)
            except Exception:  # a defect of ours: logged; the schedule goes on
                log.exception("reminder run failed unexpectedly (tried again in a minute)")
            self.stop.wait(60)

    def _imap(self, db: Database, threads: Threads) -> None:
        if not self.settings.imap.host:
            return
        from gateway.imap import ImapPoller

        imap = self.settings.imap
        context = None
        if imap.ca_file is not None:
            import ssl

            context = ssl.create_default_context(cafile=str(self.settings.path(imap.ca_file)))
        poller = ImapPoller(
            db,
            host=imap.host,
            port=imap.port,
            security=imap.security,
            username=imap.username,
            password=_imap_password(self.settings),
            mailbox=imap.mailbox,
            done_mailbox=imap.done_mailbox,
            oversize_mailbox=imap.done_mailbox.rsplit("/", 1)[0] + "/Oversize"
            if "/" in imap.done_mailbox
            else "Oversize",
            poll_seconds=imap.poll_seconds,
            ssl_context=context,
            limits=self.settings.limits,
        )
        threads.start("imap", poller.run, self.stop)


#: File descriptors the supervisor needs besides one per session: the database, the workers'
#: pipes, the relay, IMAP, the metrics endpoint, logs, TLS files.
DESCRIPTOR_MARGIN = 128


def descriptors(settings: Settings) -> int:
    """Raise this process's open-file limit to its hard limit, and refuse settings whose
    sessions could not all be open at once: out of descriptors, ``accept`` fails in a loop
    (one error a try, no reply to anyone) instead of answering 421. Returns the limit."""
    listeners = sum(1 for address in (settings.listen.smtp, settings.listen.lmtp) if address)
    want = listeners * settings.listen.max_sessions + DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and want > soft:
        raise ConfigError(
            f"[listen] max_sessions = {settings.listen.max_sessions} on {listeners} listener(s) "
            f"needs about {want} open files, and this process may open {soft}: lower it, or "
            "raise the limit (systemd: LimitNOFILE=; a shell: ulimit -n)"
        )
    return int(soft)


def _bind_error(where: str, address: str, exc: OSError) -> ConfigError:
    """One line for a listening address that cannot be bound, naming the setting."""
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"{where}: {address} is already in use")
    if exc.errno == errno.EACCES:
        return ConfigError(
            f"{where}: {address} cannot be bound: permission denied (ports below 1024 need "
            "CAP_NET_BIND_SERVICE)"
        )
    return ConfigError(f"{where}: cannot listen on {address} ({exc.strerror or exc})")


def _stop_workers(stop: ProcessEvent, processes: list[Any], *, timeout: float) -> None:
    """Tell the worker processes to stop, wait up to ``timeout`` each, then terminate them."""
    stop.set()
    for p in processes:
        p.join(timeout=timeout)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def _imap_password(settings: Settings) -> str:
    imap = settings.imap
    value = secret(settings, imap.password_file, imap.password_env, "IMAP password")
    if not value:
        raise ConfigError(
            f"[imap]: set the password in ${imap.password_env} or name a password_file"
        )
    return value


def _merged_replies(listeners: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for lst in listeners.values():
        for code, n in lst.handler.replies.items():
            out[code] = out.get(code, 0) + n
    return out


def _tls_context(s: Settings) -> Any:
    if s.listen.tls_certificate is None:
        return None
    import ssl

    if s.listen.tls_key is None:
        raise ConfigError("[listen] tls_certificate needs tls_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(s.path(s.listen.tls_certificate), s.path(s.listen.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[listen] TLS certificate or key is not usable: {exc}") from None
    return context
