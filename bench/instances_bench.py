"""Scale-out figures: one versus two ``gateway serve`` instances on one PostgreSQL, next to the
embedded default (SQLite, one instance), measured in the same run with the same messages.

Each configuration gets a fresh home and database (``DemoWorld.install``) and the same N unique
~10 KB submissions (built before any clock starts), sent by C SMTP clients with one persistent
connection each; with two instances the clients are split between their listeners. After a
settled warm-up, the time runs from the first send to the moment every intake row is ``done``
(accepted and archived), then to the moment every receipt and delivery was handed to the relay
(a bare aiosmtpd sink in a process of its own). PostgreSQL is a throw-away server
(tests/pg.py: Debian's binaries, fsync on, on this machine's disk).

Configurations:

- SQLite, one instance with W workers (the baseline: the embedded default);
- PostgreSQL, one instance with W workers;
- PostgreSQL, two instances with W/2 workers each (the same CPU for the pipeline);
- PostgreSQL, two instances with W workers each.

Also printed: the machine's CPU seconds per message (every process, the database server
included) and the machine's idle share during the run. On a 2-core machine a second instance
adds no CPU; what it shows is the cost of sharing the work through the database (leases, SKIP
LOCKED claims, one log sequencer) and that nothing is lost doing it. Nothing asserts a time.

Run:  .venv/bin/python bench/instances_bench.py [--quick] [--messages N] [--workers W]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_bench import (
    KB10,
    PASSPHRASE,
    Sink,
    Wire,
    build,
    load,
    machine_busy,
    settle,
    start_gateway,
    stop_gateway,
)
from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from gateway.demo import DemoWorld
from tests import pg

_QUEUED = re.compile(r": queued as \d+ \(")


@dataclass
class Result:
    label: str
    n: int
    archived: float  # first send → every intake row done, s
    sent: float  # first send → every receipt and delivery handed to the relay, s
    accepted: float  # first send → last 250, s
    cpu: float  # machine CPU seconds during the run
    wall: float
    taken: list[int]  # messages each instance answered 250 to (its log: "queued as N")

    @property
    def rate(self) -> float:
        return self.n / self.archived


def run(
    label: str,
    world: DemoWorld,
    home: Path,
    wires: Sequence[Wire],
    warm: Sequence[Wire],
    *,
    url: str | None,
    instances: int,
    workers: int,
    clients: int,
    relay: Sink,
) -> Result:
    world.install(home, PASSPHRASE, relay_port=relay.port, workers=workers, database_url=url)
    db = Database.open(url or f"sqlite:///{home / 'archive.db'}", migrate=False)
    started = [start_gateway(home, workers, name=f"serve{i}") for i in range(instances)]
    ports = [g.smtp_port for g in started]
    try:
        load(ports, warm, clients)
        settle(db, 0, 0, len(warm), time.perf_counter(), timeout=120)
        with db.session(read_only=True) as s:
            intake0 = s.scalar(select(func.max(t.Intake.id))) or 0
            outbox0 = s.scalar(select(func.max(t.Outbox.id))) or 0
        busy0, wall0 = machine_busy(), time.perf_counter()
        result = load(ports, wires, clients)
        archived, sent = settle(db, intake0, outbox0, len(wires), result.t0, timeout=900)
        busy, wall = machine_busy() - busy0, time.perf_counter() - wall0
        with db.session(read_only=True) as s:
            outbox = dict(
                s.execute(
                    select(t.Outbox.state, func.count())
                    .where(t.Outbox.id > outbox0)
                    .group_by(t.Outbox.state)
                ).all()
            )
        if outbox != {"sent": 2 * len(wires)}:
            print(f"  ! expected {2 * len(wires)} receipts and deliveries sent, got {outbox}")
        taken = [len(_QUEUED.findall(g.log.read_text(errors="replace"))) for g in started]
        return Result(label, len(wires), archived, sent, result.last_reply, busy, wall, taken)
    finally:
        for g in started:
            stop_gateway(g)
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="300 messages")
    parser.add_argument("--messages", type=int, help="10 KB messages per run (1500; --quick 300)")
    parser.add_argument("--workers", type=int, default=2, help="workers of one instance (2)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent SMTP clients (4)")
    args = parser.parse_args()
    n = args.messages or (300 if args.quick else 1500)
    workers, clients = args.workers, args.clients
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, load average "
        f"{os.getloadavg()[0]:.2f} at start; {n} × ~10 KB, {clients} clients",
        flush=True,
    )
    began = time.perf_counter()
    world = DemoWorld.create(datetime.now(UTC))
    wires = build(world, KB10, n, 0)
    warm = build(world, KB10, 2 * clients, 10**6)
    cluster = pg.start()
    sink = Sink()
    results: list[Result] = []
    header = (
        f"\n  {'configuration':<40} {'archived':>11} {'vs SQLite':>9} {'all sent':>9} "
        f"{'250s/s':>8} {'CPU/msg':>8} {'idle':>5}  taken in by each"
    )
    print(header, flush=True)
    configs: list[tuple[str, bool, int, int]] = [
        (f"SQLite, 1 instance × {workers} workers", False, 1, workers),
        (f"PostgreSQL, 1 instance × {workers} workers", True, 1, workers),
        (
            f"PostgreSQL, 2 instances × {max(1, workers // 2)} workers",
            True,
            2,
            max(1, workers // 2),
        ),
        (f"PostgreSQL, 2 instances × {workers} workers", True, 2, workers),
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="instances-bench-") as tmp:
            for i, (label, on_pg, instances, w) in enumerate(configs):
                url = cluster.url(cluster.create_database(f"bench{i}")) if on_pg else None
                r = run(
                    label, world, Path(tmp) / f"c{i}", wires, warm, url=url,
                    instances=instances, workers=w, clients=clients, relay=sink,
                )  # fmt: skip
                results.append(r)
                base = results[0].rate
                cores = os.cpu_count() or 1
                print(
                    f"  {label:<40} {r.rate:>7,.1f} /s {r.rate / base:>9.0%} "
                    f"{r.n / r.sent:>5,.1f} /s {r.n / r.accepted:>8,.0f} "
                    f"{r.cpu / r.n * 1e3:>5,.1f} ms {1 - r.cpu / (r.wall * cores):>5.0%} "
                    f" {' + '.join(map(str, r.taken))}",
                    flush=True,
                )
    finally:
        sink.stop()
        cluster.stop()
    print(
        f"\n  {time.perf_counter() - began:.0f} s in all; load average {os.getloadavg()[0]:.2f} "
        "at the end.\n  archived: accepted-and-archived msgs/s (first send → every intake row "
        "done); all sent: msgs/s until every receipt and delivery was handed to the relay; "
        "250s/s: N / last 250; CPU/msg: CPU seconds of the whole machine (the database "
        "server, the relay sink and the clients included) per message; idle: the share of "
        "the machine's cores left idle; taken in by each: 250s each instance answered "
        "(warm-up included)."
    )


if __name__ == "__main__":
    main()
