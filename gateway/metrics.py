"""The Prometheus text endpoint of ``gateway serve`` (``GET /metrics``).

Everything that matters across processes is read from the database at scrape time, so the
figures are the same whichever instance is asked and survive restarts: messages by verdict,
the intake and outbox queues by state, the archive size, and the time from ``250`` to archived
(its quantiles over the last messages filed; its count and sum, counters, over every one). The
listener's SMTP replies are counted in this process.

A scrape costs what changed since the last, not the archive's size (:class:`Tally`): the log
only grows, and a row filed (``done``) or sent stays so; what one scrape counted of them, the
next adds to. With 200,000 messages filed, a scrape took 0.24–0.29 s counted afresh
(growing with the archive) and takes 8 ms so, on SQLite.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import product
from typing import Any, TypeVar

from sqlalchemy import BigInteger, ColumnElement, cast, extract, func, literal_column, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from archive import tables as t
from archive.db import Database
from archive.log import Log
from formats.errors import TransientError
from gateway import intake as intake_mod
from gateway.outbound import KINDS
from gateway.outbox_admin import PENDING, STATES
from gateway.verdict import FILED

log = logging.getLogger("gateway.metrics")

#: How many of the most recently filed messages the latency quantiles are taken over.
LATENCY_WINDOW = 1000


def render(
    db: Database, replies: Mapping[str, int], workers_alive: int, tally: Tally | None = None
) -> str:
    """The exposition text (Prometheus text format 0.0.4); ``tally``: what this process's
    earlier scrapes counted (none: everything is counted)."""
    tally = Tally() if tally is None else tally
    with tally.lock, tally.kept():  # one at a time: each takes up where the last left off
        return _render(db, replies, workers_alive, tally)


def _render(db: Database, replies: Mapping[str, int], workers_alive: int, tally: Tally) -> str:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    now = tally.clock()
    with db.session(read_only=True) as s:
        size = Log().size(s)  # the log head, not a count over every entry
        verdicts = tally.verdicts(s, size)
        intake: list[tuple[str, int]] = [
            (state, n)
            for state, n in s.execute(
                select(t.Intake.state, func.count())
                .where(t.Intake.state.in_(_UNFILED))
                .group_by(t.Intake.state)
            )
        ]
        filed, total_ms = tally.filed.totals(s, now, db.dialect)
        passed = tally.sent.advance(s, now)
        below = (t.Outbox.id < passed).label("below")
        outbox: Counter[tuple[str, str]] = Counter()
        unsent_below: Counter[str] = Counter()
        for kind, state, is_below, n in s.execute(
            select(_KIND, t.Outbox.state, below, func.count())
            .where(t.Outbox.state.in_(PENDING))
            .group_by(_KIND, t.Outbox.state, below)
        ):
            outbox[kind, state] += n
            if is_below:
                unsent_below[kind] += n
        for kind, n in tally.sent.totals(s, unsent_below).items():
            outbox[kind, "sent"] = n
        recent = s.execute(
            select(t.Intake.received_at, t.Intake.updated_at)
            .where(t.Intake.state == "done")
            .order_by(t.Intake.id.desc())
            .limit(LATENCY_WINDOW)
        ).all()
    intake.append(("done", filed))
    family(
        "gateway_messages_total",
        "counter",
        "Messages filed in the archive, by verdict.",
        [(f'{{verdict="{v}"}}', n) for v, n in _every(FILED, verdicts)],
    )
    family(
        "gateway_intake_queue",
        "gauge",
        "Received messages by intake state (new, working, retry, done).",
        [(f'{{state="{st}"}}', n) for st, n in _every(intake_mod.STATES, intake)],
    )
    family(
        "gateway_outbox_queue",
        "gauge",
        "Outbound messages (receipts, deliveries, alerts) by kind and state.",
        [
            (f'{{kind="{k}",state="{st}"}}', n)
            for (k, st), n in _every(product(KINDS, STATES), outbox.items())
        ],
    )
    family("gateway_archive_entries", "gauge", "Entries in the archive log.", [("", size)])
    family(
        "gateway_smtp_replies_total",
        "counter",
        "Replies to DATA by this process's listeners, by code.",
        [(f'{{code="{c}"}}', n) for c, n in sorted(replies.items())],
    )
    family(
        "gateway_workers_alive",
        "gauge",
        "Pipeline worker processes running.",
        [("", workers_alive)],
    )
    family(
        "gateway_archive_latency_seconds",
        "summary",
        f"Time from 250 to archived: quantiles over the last {LATENCY_WINDOW} messages "
        "filed, count and sum over every message filed.",
        [
            *_quantiles([(done - got).total_seconds() for got, done in recent]),
            ("_count", filed),
            ("_sum", int(total_ms) / 1000),
        ],
    )
    return "\n".join(out) + "\n"


K = TypeVar("K", bound=Hashable)


def _every(known: Iterable[K], counted: Iterable[tuple[K, int]]) -> list[tuple[K, int]]:
    """Every known label value with its count, 0 when none was counted (then any other value
    counted, in order). A series must exist before its first event: one that appears when its
    count becomes 1 has no earlier sample, so ``delta(...) > 0`` (docs/deploy.md's alert on
    ``gateway_outbox_queue{state="failed"}``) never fires for the first failure."""
    found = dict(counted)
    return [(k, found.pop(k, 0)) for k in known] + sorted(found.items(), key=str)


def _number(value: float) -> str:
    """A sample value as the text format writes it: an integer in full (``{:g}`` keeps six
    digits: 1234567 replies became 1.23457e+06, a counter that stands still, then jumps), a
    float as ``repr`` does (the shortest text that reads back as the same float)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _quantiles(values: list[float]) -> list[tuple[str, float]]:
    """The quantiles of a summary, taken over a window (as a client library's summary takes
    them over its last minutes); nothing while the window is empty."""
    if not values:
        return []
    ordered = sorted(values)
    pick = [(q, ordered[min(len(ordered) - 1, int(q * len(ordered)))]) for q in (0.5, 0.9, 0.99)]
    return [(f'{{quantile="{q}"}}', v) for q, v in pick]


def _latency_ms(dialect: str) -> ColumnElement[Any]:
    """An intake row's time from 250 to archived, in whole milliseconds, in SQL.

    A summary's ``_count`` and ``_sum`` are counters (Prometheus text format): they must never
    go down, so they are taken over every filed row (a row stays ``done``), not over the window
    of the quantiles, whose sum fell as slow messages left it. Whole numbers, so that the sum is
    exact whatever order the database adds them in: a float sum may differ in its last digit
    from one scrape to the next, which Prometheus reads as a counter reset."""
    got, done = t.Intake.received_at, t.Intake.updated_at
    if dialect == "postgresql":
        seconds: ColumnElement[Any] = extract("epoch", done - got)
    else:  # SQLite keeps the times as text, which julianday() reads
        seconds = (func.julianday(done) - func.julianday(got)) * 86400
    return cast(func.round(seconds * 1000), BigInteger)


#: Intake states short of filed.
_UNFILED = tuple(st for st in intake_mod.STATES if st != "done")
#: Seconds after which the rows numbered below the next free number a scrape saw are all
#: there to read: one still being written then (PostgreSQL numbers rows as they are inserted,
#: not as they commit) has committed since. Until then rows are counted afresh at each scrape.
SETTLED_AFTER = 300.0
#: Seconds between two scrapes whose next free numbers are kept (a client scraping in a loop
#: does not grow the list).
NOTE_EVERY = 10.0
#: An outbox row's kind as the scrapes group by it: an expression, so that SQLite (once
#: ANALYZE has run) does not read the whole table along the kind's index to group by it
#: (66 ms instead of 1 ms a query at 200,000 rows).
_KIND = t.Outbox.kind.concat(literal_column("''")).label("kind")


@dataclass
class _Ripening:
    """The next free row numbers scrapes saw, each kept :data:`SETTLED_AFTER` seconds."""

    seen: list[tuple[float, int]] = field(default_factory=list)

    def ripe(self, now: float, top: int) -> int:
        """The newest number seen :data:`SETTLED_AFTER` ago or more (0: none yet)."""
        if not self.seen or now - self.seen[-1][0] >= NOTE_EVERY:
            self.seen.append((now, top + 1))
        ripe = [number for at, number in self.seen if now - at >= SETTLED_AFTER]
        self.seen = [(at, number) for at, number in self.seen if now - at < SETTLED_AFTER]
        return min(ripe[-1], top + 1) if ripe else 0  # (seen before a restore: no further)


@dataclass
class _Filed:
    """Intake rows filed (``done``, which a row never leaves) and their time from 250 to
    archived, in ms. Each row numbered below ``passed`` was counted when passed, or was still
    in the queue then (``waiting``) and is counted once it is filed."""

    passed: int = 0
    count: int = 0
    total_ms: int = 0
    waiting: set[int] = field(default_factory=set)
    ripening: _Ripening = field(default_factory=_Ripening)

    def totals(self, s: Session, now: float, dialect: str) -> tuple[int, int]:
        i = t.Intake
        figures = (func.count(), func.coalesce(func.sum(_latency_ms(dialect)), 0))
        top = s.scalar(select(func.max(i.id))) or 0
        if top + 1 < self.passed:  # fewer rows than were passed: a database restored
            self.passed, self.count, self.total_ms, self.waiting = 0, 0, 0, set()
        to = self.ripening.ripe(now, top)
        if to > self.passed:
            between = (i.id >= self.passed) & (i.id < to)
            n, ms = s.execute(select(*figures).where(between, i.state == "done")).one()
            self.count, self.total_ms = self.count + n, self.total_ms + int(ms)
            self.waiting.update(s.scalars(select(i.id).where(between, i.state != "done")))
            self.passed = to
        waiting = sorted(self.waiting)
        for k in range(0, len(waiting), 500):
            for number, ms in s.execute(
                select(i.id, _latency_ms(dialect)).where(
                    i.id.in_(waiting[k : k + 500]), i.state == "done"
                )
            ):
                self.count, self.total_ms = self.count + 1, self.total_ms + int(ms or 0)
                self.waiting.discard(number)
        n, ms = s.execute(select(*figures).where(i.id >= self.passed, i.state == "done")).one()
        return self.count + n, self.total_ms + int(ms)


@dataclass
class _Sent:
    """Outbox rows sent (``sent``, which a row never leaves), by kind. The rows numbered below
    ``passed`` are counted by kind when passed (``below``); of those, the ones sent are all but
    the ones in another state now, which the queue's gauge reads anyway (the state's index
    holds them: the queue, and rows failed until an admin requeues them)."""

    passed: int = 0
    below: Counter[str] = field(default_factory=Counter)
    ripening: _Ripening = field(default_factory=_Ripening)

    def advance(self, s: Session, now: float) -> int:
        """``passed`` of this scrape."""
        o = t.Outbox
        top = s.scalar(select(func.max(o.id))) or 0
        if top + 1 < self.passed:  # fewer rows than were passed: a database restored
            self.passed, self.below = 0, Counter()
        to = self.ripening.ripe(now, top)
        if to > self.passed:
            query = select(_KIND, func.count()).where(o.id >= self.passed, o.id < to)
            self.below.update({kind: n for kind, n in s.execute(query.group_by(_KIND))})
            self.passed = to
        return self.passed

    def totals(self, s: Session, unsent_below: Mapping[str, int]) -> dict[str, int]:
        o = t.Outbox
        query = select(_KIND, func.count()).where(o.id >= self.passed, o.state == "sent")
        sent = Counter({kind: n for kind, n in s.execute(query.group_by(_KIND))})
        for kind, n in self.below.items():
            sent[kind] += n - unsent_below.get(kind, 0)
        return dict(sent)


@dataclass
class Tally:
    """What one process's scrapes have counted of what only grows: message entries of the log
    by verdict (up to ``entries``), intake rows filed with their time to archived, outbox rows
    sent by kind. A log shorter than what was counted, or fewer rows than were passed (a
    database restored from a backup), is counted again from the start. A scrape that fails
    leaves the tally as it found it (:meth:`kept`)."""

    clock: Callable[[], float] = field(default=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    entries: int = 0
    by_verdict: Counter[str] = field(default_factory=Counter)
    filed: _Filed = field(default_factory=_Filed)
    sent: _Sent = field(default_factory=_Sent)

    def verdicts(self, s: Session, size: int) -> list[tuple[str, int]]:
        if size < self.entries:
            self.entries, self.by_verdict = 0, Counter()
        # Grouped by kind rather than filtered: given kind = 'message', SQLite reads every
        # message entry through the kind's index instead of the new ones by sequence number.
        rows = s.execute(
            select(t.LogEntry.kind, t.LogEntry.status, func.count())
            .where(t.LogEntry.seq >= self.entries, t.LogEntry.seq < size)
            .group_by(t.LogEntry.kind, t.LogEntry.status)
        )
        self.by_verdict.update({status or "": n for kind, status, n in rows if kind == "message"})
        self.entries = size
        return list(self.by_verdict.items())

    @contextmanager
    def kept(self) -> Iterator[None]:
        """Its counts as they were if the block fails (a scrape half done must not count twice
        what it counted before it failed)."""
        saved = copy.deepcopy(
            (self.entries, self.by_verdict, self.filed, self.sent.passed, self.sent.below,
             self.sent.ripening)
        )  # fmt: skip
        try:
            yield
        except BaseException:
            (self.entries, self.by_verdict, self.filed, self.sent.passed, self.sent.below,
             self.sent.ripening) = saved  # fmt: skip
            raise


#: Scrapes served at once; a connection beyond them is closed at once. Each holds a thread and
#: a descriptor of the supervisor, which the SMTP listener and the database need too.
MAX_CONNECTIONS = 16
#: Seconds a scrape may take to send its request (a client that sends nothing is dropped).
REQUEST_TIMEOUT = 10.0


class _BoundedServer(ThreadingHTTPServer):
    """At most ``limit`` requests at once; failures logged as one line, not a traceback."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, limit: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(limit)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)  # refused: socketserver closes it

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # a thread of its own
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("metrics: a request from %s failed: %r", client_address[0], sys.exc_info()[1])


class MetricsServer:
    """``GET /metrics`` on ``host:port`` in a thread; ``port=0`` picks a free port. At most
    ``max_connections`` at once, each with ``timeout`` seconds to send its request."""

    def __init__(
        self,
        host: str,
        port: int,
        text: Callable[[], str],
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = text().encode()
                except (SQLAlchemyError, TransientError) as exc:
                    log.warning("metrics unavailable: %s", exc)
                    self.send_error(503, "the database is not reachable")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        Handler.timeout = timeout  # socketserver sets it on the connection
        self._server = _BoundedServer((host, port), Handler, max_connections)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
