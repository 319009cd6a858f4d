"""End-to-end figures of ``gateway serve``: throughput, latency and memory under SMTP load.

Each figure is printed next to its target (the issue) and a baseline measured in the same run:

- accepted-and-archived msgs/s and MB/s (10^6 bytes) for ~10 KB and ~1 MB submissions. N unique
  messages, all built and dot-stuffed before the clock starts, are sent by C client threads, each
  with one persistent SMTP connection; the time runs from the first send to the moment every
  intake row is ``done`` (polled read-only from the gateway's SQLite database). Baseline: a bare
  aiosmtpd sink that only answers ``250 OK``, under the same client load. Both servers run in
  processes of their own, so the clients' interpreter does not share a GIL with either.
  Each size is measured in rounds (3; ``--rounds``): the sink, then the gateway at once. The
  machine's speed drifts by tens of percent over minutes, so one sink run measured long before
  its gateway run says little; the round with the median share is shown, every share listed.
- latency 250→archived: ``updated_at - received_at`` of the intake rows (``received_at`` is set
  when DATA ends, just before the durable commit; ``updated_at`` when the row is filed), p50 and
  p99. In the runs above it is mostly queueing; the target applies to an open-loop run paced at
  half the measured 10 KB rate, spread over the clients.
- peak RSS of the gateway (supervisor and workers summed, sampled every 100 ms) in each run.
- informative, not targets: the listener's own rate (N / last 250), the time until every receipt
  and delivery was handed to the relay (the sink again) and the end-to-end rate that makes, CPU
  per message by process (supervisor, workers, relay, clients) and how busy the machine was. The
  CPU is counted until every receipt and delivery was sent, so it is the whole cost of a
  message: times the archived rate, it is more than the machine has, because in a burst the
  workers file first and build the receipts and deliveries later. "not ours" is CPU that other
  processes used during the run (someone's tests): when it is large, the figures are low; run
  again.
- a calibration line before the runs: the RSA-3072 private-key operation and a pure-Python
  loop, timed on this machine. Hosts differ by 2× and more (the same code archived 620 and
  180 msgs/s on two of them); compare figures between runs only when these agree. A change to
  the workers' CPU per message is judged better by ``bench/worker_cost.py --instructions``,
  which counts it exactly.

Each gateway run gets a fresh home (``DemoWorld.install``, SQLite) and a warm-up of a few
messages that is settled before the clock starts. Nothing asserts a time.

Run:  .venv/bin/python bench/e2e_bench.py [--quick] [--rounds R] [--workers N] [--clients C]
"""

from __future__ import annotations

import argparse
import os
import re
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import padding, rsa
from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from formats.categories import Value
from formats.payload import Organ, Signer, build_payload
from formats.smime import build_message
from gateway.demo import HUB_ADDRESS, WORK_PERMITS, DemoWorld
from tests import served

ROOT = Path(__file__).resolve().parent.parent
SENDER = "H26.SNV"
MAIL_FROM = "vanthu@snv.hanoi.gov.vn"  # H26.SNV's address in the demo directory
PASSPHRASE = b"bench-passphrase"
MB = 1e6
KB10, MB1 = 10 * 1024, 1024 * 1024

#: The sink: aiosmtpd's Controller and a handler that answers 250 to every DATA. It prints its
#: port and runs until its stdin is closed. (The Controller cannot bind port 0: probe first.)
SINK = """
import socket, sys
from aiosmtpd.controller import Controller

class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
controller = Controller(Sink(), hostname="127.0.0.1", port=port)
controller.start()
print(port, flush=True)
sys.stdin.read()
controller.stop()
"""


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """A message as the client puts it on the wire after DATA: dot-stuffed, ending CRLF.CRLF."""

    size: int  # bytes of the message itself
    data: bytes


def wire(raw: bytes) -> Wire:
    stuffed = re.sub(rb"(?m)^\.", b"..", raw)  # RFC 5321 §4.5.2 transparency
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return Wire(len(raw), stuffed + b".\r\n")


def submission(world: DemoWorld, records: int, serial: int) -> bytes:
    """A valid, unique work-permit submission from H26.SNV to the police with ``records`` rows:
    a fresh payload MessageId and Message-ID each time, so no two are replays."""
    agency = world.directory.get(SENDER)
    police = world.directory.get("H26.CATP")
    assert agency is not None and police is not None
    address = sorted(agency.emails)[0]
    payload = build_payload(
        "work-permit",
        sender=Organ(SENDER, agency.name_vi, address),
        recipients=[Organ(police.organ_id, police.name_vi, sorted(police.emails)[0])],
        records=[_distinct(WORK_PERMITS[i % len(WORK_PERMITS)], i) for i in range(records)],
        document_number=f"{serial}/SNV-VLATLĐ",
        issued_on=world.at.date(),
        message_id=uuid.uuid4(),
        period="2026-10",
        subject="benchmark",
        signer=Signer("Trần Văn Minh", "Phó Giám đốc"),
    )
    signer = world.agencies[SENDER]
    return build_message(
        payload.to_xml(),
        signer_cert=signer.cert,
        signer_key=signer.key,
        recipients=[world.hub.cert],
        from_addr=address,
        to_addrs=[HUB_ADDRESS],
        message_id=f"<bench-{serial}-{uuid.uuid4()}@snv.hanoi.gov.vn>",
        date=world.at,
        subject="benchmark",
    )


def _distinct(record: dict[str, Value], i: int) -> dict[str, Value]:
    return {
        **record,
        "FullName": f"{record['FullName']} {i}",
        "PassportNumber": f"P{i:08d}",
        "PermitNumber": f"HN-2026-{i:07d}",
    }


def records_for(world: DemoWorld, target: int) -> int:
    """How many records make a submission of about ``target`` bytes on the wire."""
    two, four = len(submission(world, 2, 0)), len(submission(world, 4, 0))
    per_record = (four - two) / 2
    return max(1, round(2 + (target - two) / per_record))


def build(world: DemoWorld, target: int, count: int, first: int) -> list[Wire]:
    n = records_for(world, target)
    return [wire(submission(world, n, first + i)) for i in range(count)]


# --- the load --------------------------------------------------------------------------------


@dataclass
class Load:
    """What the clients saw: the start, and (sent, 250) times of each message, in seconds."""

    t0: float
    sends: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def last_reply(self) -> float:
        return max(r for _s, r in self.sends) - self.t0


def load(
    port: int | Sequence[int], wires: Sequence[Wire], clients: int, rate: float | None = None
) -> Load:
    """Send ``wires`` over ``clients`` connections: as fast as they are answered, or, with
    ``rate``, message i at t0 + i/rate (open loop; a client that is behind sends at once).
    Several ports (gateway instances): client k connects to ``port[k % len(port)]``."""
    ports = [port] if isinstance(port, int) else list(port)
    result = Load(time.perf_counter() + 0.2)  # a moment for the threads to connect
    lock = threading.Lock()

    def client(k: int) -> None:
        mine = range(k, len(wires), clients)
        try:
            with smtplib.SMTP("127.0.0.1", ports[k % len(ports)], timeout=600) as c:
                c.ehlo("bench.example")
                _sleep_until(result.t0)
                for i in mine:
                    if rate is not None:
                        _sleep_until(result.t0 + i / rate)
                    began = time.perf_counter()
                    _expect(c.mail(MAIL_FROM), 250)
                    _expect(c.rcpt(HUB_ADDRESS), 250)
                    _expect(c.docmd("DATA"), 354)
                    c.send(wires[i].data)
                    _expect(c.getreply(), 250)
                    with lock:
                        result.sends.append((began, time.perf_counter()))
        except Exception as exc:
            with lock:
                result.errors.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if result.errors:
        raise RuntimeError("; ".join(result.errors[:3]))
    return result


def _expect(reply: tuple[int, bytes], code: int) -> None:
    if reply[0] != code:
        raise RuntimeError(f"expected {code}, got {reply[0]} {reply[1]!r}")


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# --- the servers -----------------------------------------------------------------------------


class Sink:
    """The bare aiosmtpd sink, in a process of its own (also the gateway's relay)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SINK], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def start_gateway(home: Path, workers: int, name: str = "serve") -> served.Served:
    """``gateway serve`` on ``home`` with ``workers``, as the tests start it (tests/served.py);
    ``name``: of its ready file, for several instances on one home."""
    return served.start(home, "--workers", str(workers), name=name)


def stop_gateway(gateway: served.Served) -> None:
    try:
        gateway.stop(60)
    except subprocess.TimeoutExpired:
        gateway.kill()


# --- watching the gateway's processes --------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (the supervisor and its workers)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and int(stat[2]) == pgid:
                out.append(int(entry.name))
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # [0] state, [2] pgrp, [11] utime, [12] stime


def rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu(pid: int) -> float:
    stat = _stat(pid)
    return 0.0 if stat is None else (int(stat[11]) + int(stat[12])) / _TICK


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle (``/proc/stat``), all cores."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK  # minus idle and iowait


class Watch(threading.Thread):
    """Samples the summed RSS of a process group every 100 ms; CPU seconds by process, of the
    group, the relay (the sink), this process (the clients) and the whole machine."""

    def __init__(self, pgid: int, relay: int) -> None:
        super().__init__(daemon=True)
        self.pgid, self.relay = pgid, relay
        self.pids = group(pgid)
        self.idle = sum(rss(p) for p in self.pids)
        self.peak = self.idle
        self.cpu0 = {p: cpu(p) for p in self.pids}
        self.relay0 = cpu(relay)
        self.proc0 = time.process_time()
        self.machine0, self.wall0 = machine_busy(), time.perf_counter()
        self._halt = threading.Event()

    def run(self) -> None:
        # The group is looked for once a second (a worker the supervisor starts anew counts from
        # then): scanning /proc every 100 ms took 3% of a core from the gateway under test.
        pids, tick = self.pids, 0
        while not self._halt.wait(0.1):
            tick += 1
            if tick % 10 == 0:
                pids = group(self.pgid)
            self.peak = max(self.peak, sum(rss(p) for p in pids))

    def finish(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        used = {p: cpu(p) - c for p, c in self.cpu0.items()}
        return {
            "supervisor": used.get(self.pgid, 0.0),
            "workers": sum(c for p, c in used.items() if p != self.pgid),
            "clients": time.process_time() - self.proc0,
            "relay": cpu(self.relay) - self.relay0,
            "machine": machine_busy() - self.machine0,  # CPU seconds, every process
            "wall": time.perf_counter() - self.wall0,
        }


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    size: int  # bytes of all messages
    accepted: float  # first send → last 250, s
    archived: float  # first send → every intake row done, s
    sent: float  # first send → every outbox row sent, s
    latencies: list[float]  # 250→archived, s
    replies: list[float]  # client: start of MAIL → 250 to DATA, s
    idle_rss: int
    peak_rss: int
    cpu: dict[str, float]
    late: float = 0.0  # paced runs: the largest delay of a send behind its schedule, s


def sink_run(port: int, wires: Sequence[Wire], clients: int) -> Run:
    result = load(port, wires, clients)
    elapsed = result.last_reply
    replies = [r - s for s, r in result.sends]
    size = sum(w.size for w in wires)
    return Run(len(wires), size, elapsed, elapsed, elapsed, [], replies, 0, 0, {})


def gateway_run(
    world: DemoWorld,
    home: Path,
    wires: Sequence[Wire],
    warm: Sequence[Wire],
    *,
    clients: int,
    workers: int,
    relay: Sink,
    rate: float | None = None,
) -> Run:
    world.install(home, PASSPHRASE, relay_port=relay.port, workers=workers)
    gateway = start_gateway(home, workers)
    port = gateway.smtp_port
    db = Database.open(f"sqlite:///{home / 'archive.db'}", migrate=False)
    try:
        load(port, warm, clients)
        settle(db, 0, 0, len(warm), time.perf_counter(), timeout=120)
        with db.session(read_only=True) as s:
            intake0 = s.scalar(select(func.max(t.Intake.id))) or 0
            outbox0 = s.scalar(select(func.max(t.Outbox.id))) or 0
        watch = Watch(gateway.process.pid, relay.process.pid)
        watch.start()
        result = load(port, wires, clients, rate)
        archived, sent = settle(db, intake0, outbox0, len(wires), result.t0, timeout=600)
        used = watch.finish()
        with db.session(read_only=True) as s:
            rows = s.execute(
                select(t.Intake.received_at, t.Intake.updated_at).where(t.Intake.id > intake0)
            ).all()
            outbox = dict(
                s.execute(
                    select(t.Outbox.state, func.count())
                    .where(t.Outbox.id > outbox0)
                    .group_by(t.Outbox.state)
                ).all()
            )
        if outbox != {"sent": 2 * len(wires)}:  # a receipt and a delivery for each accepted one
            print(f"  ! expected {2 * len(wires)} receipts and deliveries sent, got {outbox}")
        late = 0.0
        if rate is not None:
            late = max(s - (result.t0 + i / rate) for i, (s, _r) in enumerate(sorted(result.sends)))
        return Run(
            n=len(wires),
            size=sum(w.size for w in wires),
            accepted=result.last_reply,
            archived=archived,
            sent=sent,
            latencies=[(u - r).total_seconds() for r, u in rows],
            replies=[r - s for s, r in result.sends],
            idle_rss=watch.idle,
            peak_rss=watch.peak,
            cpu=used,
            late=late,
        )
    finally:
        db.dispose()
        stop_gateway(gateway)


def settle(
    db: Database, intake0: int, outbox0: int, n: int, t0: float, *, timeout: float
) -> tuple[float, float]:
    """Poll until the ``n`` intake rows after ``intake0`` are done, then until every outbox row
    after ``outbox0`` is sent or failed; the seconds from ``t0`` to each.

    Every 20 ms, and each poll reads only the ``state`` indexes (the newest row still waiting):
    counting the rows read every row's page, ~10 KB each while a message waits, which took
    about 5 ms of CPU a poll — a quarter of a core taken from the gateway while it filed the
    last of a burst."""
    deadline = time.perf_counter() + timeout
    intake_waits = select(func.max(t.Intake.id)).where(t.Intake.state.in_(_WAITING))
    outbox_waits = select(func.max(t.Outbox.id)).where(t.Outbox.state.in_(_UNSENT))
    archived = None
    while True:
        with db.session(read_only=True) as s:
            if archived is None and (s.scalar(intake_waits) or 0) <= intake0:
                done = s.scalar(
                    select(func.count()).where(t.Intake.id > intake0, t.Intake.state == "done")
                )
                if done != n:  # (every row was committed before its 250: load() is over)
                    raise RuntimeError(f"{done} of {n} messages were archived")
                archived = time.perf_counter() - t0
            if archived is not None and (s.scalar(outbox_waits) or 0) <= outbox0:
                return archived, time.perf_counter() - t0
        if time.perf_counter() > deadline:
            raise RuntimeError(f"not settled after {timeout} s (archived: {archived})")
        time.sleep(0.02)


#: Intake rows not yet filed, and outbox rows not yet sent or failed.
_WAITING = ("new", "working", "retry")
_UNSENT = ("new", "building", "ready", "sending", "retry")


# --- the table -------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    verdict: str = ""
    baseline: str = ""

    def line(self) -> str:
        return (
            f"  {self.name:<42} {self.value:>19}   {self.target:<14} {self.verdict:<7} "
            f"{self.baseline}"
        )


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "met" if ok else "NOT met"


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def secs(seconds: float) -> str:
    return f"{seconds:,.2f} s" if seconds >= 1 else f"{seconds * 1e3:,.0f} ms"


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def share_of(ours: Run, sink: Run, *, large: bool) -> float:
    """The gateway's archived rate over the sink's: MB/s for 1 MB messages, msgs/s for 10 KB."""
    if large:
        return (ours.size / ours.archived) / (sink.size / sink.archived)
    return (ours.n / ours.archived) / (sink.n / sink.archived)


def median_round(rounds: Sequence[tuple[Run, Run]], *, large: bool) -> tuple[Run, Run]:
    """Of (gateway, sink) rounds, the one whose share is the median (the upper one of an even
    number): its figures are shown, each from that one round."""
    ordered = sorted(rounds, key=lambda r: share_of(*r, large=large))
    return ordered[len(ordered) // 2]


def throughput(
    label: str, rounds: Sequence[tuple[Run, Run]], *, large: bool
) -> tuple[Run, list[Figure]]:
    ours, sink = median_round(rounds, large=large)
    rate, sink_rate = ours.n / ours.archived, sink.n / sink.archived
    mbs, sink_mbs = ours.size / MB / ours.archived, sink.size / MB / sink.archived
    share, floor = share_of(ours, sink, large=large), 0.60 if large else 0.25
    each = [share_of(o, k, large=large) for o, k in rounds]
    return ours, [
        Figure(
            f"{label}: archived msgs/s",
            f"{rate:,.1f} /s",
            "" if large else "≥ 300 /s",
            "" if large else verdict(rate >= 300),
            f"sink {sink_rate:,.0f} /s",
        ),
        Figure(f"{label}: archived MB/s", f"{mbs:,.2f} MB/s", "", "", f"sink {sink_mbs:,.1f} MB/s"),
        Figure(
            f"{label}: share of the sink's " + ("MB/s" if large else "msgs/s"),
            f"{share:.1%}",
            f"≥ {floor:.0%}",
            verdict(share >= floor),
            f"{ours.n} msgs in {secs(ours.archived)}",
        ),
        Figure(
            f"{label}: share, each round",
            ", ".join(f"{x:.1%}" for x in each),
            "(info)",
            "",
            f"{len(each)} rounds: sink, then gateway; the median's figures shown"
            if len(each) > 1
            else "1 round",
        ),
        Figure(
            f"{label}: 250→archived p50 / p99",
            f"{secs(pct(ours.latencies, 50))} / {secs(pct(ours.latencies, 99))}",
            "(saturated)",
            "",
            "mostly queueing",
        ),
        Figure(
            f"{label}: listener 250s/s (N / last 250)",
            f"{ours.n / ours.accepted:,.1f} /s",
            "(info)",
            "",
            f"sink {sink_rate:,.0f} /s",
        ),
        Figure(
            f"{label}: client MAIL→250 p50 / p99",
            f"{secs(pct(ours.replies, 50))} / {secs(pct(ours.replies, 99))}",
            "(info)",
            "",
            f"sink {secs(pct(sink.replies, 50))} / {secs(pct(sink.replies, 99))}",
        ),
        *common(label, ours),
    ]


def paced(ours: Run, rate: float) -> list[Figure]:
    p99 = pct(ours.latencies, 99)
    return [
        Figure(
            "paced: 250→archived p99",
            secs(p99),
            "< 1 s",
            verdict(p99 < 1.0),
            f"p50 {secs(pct(ours.latencies, 50))}, max {secs(max(ours.latencies))}",
        ),
        Figure(
            "paced: offered / archived",
            f"{rate:,.1f} / {ours.n / ours.archived:,.1f} /s",
            "(50 % of max)",
            "",
            f"{ours.n} msgs; sends ≤ {secs(max(ours.late, 0.0))} late",
        ),
        *common("paced", ours),
    ]


def common(label: str, ours: Run) -> list[Figure]:
    per = {k: v / ours.n * 1e3 for k, v in ours.cpu.items()}
    cores = {k: v / ours.cpu["wall"] for k, v in ours.cpu.items()}
    others = cores["machine"] - sum(cores[k] for k in ("supervisor", "workers", "clients", "relay"))
    return [
        Figure(
            f"{label}: every receipt+delivery sent",
            secs(ours.sent),
            "(info)",
            "",
            f"lag {secs(ours.sent - ours.archived)} after archived; "
            f"{ours.n / ours.sent:,.1f} msgs/s end to end",
        ),
        Figure(
            f"{label}: peak RSS (supervisor+workers)",
            mib(ours.peak_rss),
            "(bounded)",
            "",
            f"idle {mib(ours.idle_rss)}",
        ),
        Figure(
            f"{label}: CPU/msg sup/workers/relay/client",
            f"{per['supervisor']:.1f}/{per['workers']:.1f}/{per['relay']:.1f}/{per['clients']:.1f} ms",
            "(info)",
            "",
            f"busy cores {cores['machine']:.2f} of {os.cpu_count()}, not ours {others:.2f}",
        ),
    ]


def calibration(world: DemoWorld) -> str:
    """How fast this machine is at the two things a message costs most, timed here: the hub's
    RSA-3072 private-key operation (one per message taken in, one per receipt signed) and a
    pure-Python loop. Hosts differ by 2× and more; these say whether a figure moved with the
    code or with the machine."""
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    sealed = key.public_key().encrypt(bytes(32), padding.PKCS1v15())
    began = time.process_time()
    for _ in range(50):
        key.decrypt(sealed, padding.PKCS1v15())
    rsa_ms = (time.process_time() - began) / 50 * 1e3
    began = time.process_time()
    total = 0
    for i in range(2_000_000):
        total += i
    loop_s = (time.process_time() - began) * 5
    return (
        f"calibration: RSA-3072 private-key operation {rsa_ms:.2f} ms; "
        f"Python loop of 10^7 additions {loop_s:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few hundred messages, short runs")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes (2)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent SMTP clients (4)")
    parser.add_argument("--small", type=int, help="10 KB messages (2000; --quick 300)")
    parser.add_argument("--large", type=int, help="1 MB messages (100; --quick 20)")
    parser.add_argument("--paced-seconds", type=float, help="paced run length (20 s; --quick 5)")
    parser.add_argument(
        "--rounds", type=int, help="sink-then-gateway rounds per size, median shown (3; --quick 1)"
    )
    args = parser.parse_args()
    n_small = args.small or (300 if args.quick else 2000)
    n_large = args.large or (20 if args.quick else 100)
    paced_seconds = args.paced_seconds or (5.0 if args.quick else 20.0)
    n_rounds = max(1, args.rounds or (1 if args.quick else 3))
    clients, workers = args.clients, args.workers

    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"load average {os.getloadavg()[0]:.2f} at start; {clients} clients, "
        f"{workers} workers, SQLite",
        flush=True,
    )
    began = time.perf_counter()
    world = DemoWorld.create(datetime.now(UTC))
    print(calibration(world), flush=True)
    small = build(world, KB10, n_small, 0)
    large = build(world, MB1, n_large, n_small)
    warm = build(world, KB10, 2 * clients, 10**6)
    print(
        f"built {n_small} × {small[0].size:,} B and {n_large} × {large[0].size:,} B "
        f"messages in {time.perf_counter() - began:.1f} s",
        flush=True,
    )
    print(f"\n  {'figure':<42} {'value':>19}   {'target':<14} {'verdict':<7} baseline / note")
    sink = Sink()
    out: list[Figure] = []

    def show(figures: list[Figure]) -> None:
        print("\n".join(f.line() for f in figures), flush=True)
        out.extend(figures)

    try:
        with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
            d = Path(tmp)

            def run(name: str, wires: Sequence[Wire], rate: float | None = None) -> Run:
                return gateway_run(
                    world, d / name, wires, warm, clients=clients, workers=workers,
                    relay=sink, rate=rate,
                )  # fmt: skip

            def rounds(name: str, wires: Sequence[Wire]) -> list[tuple[Run, Run]]:
                # Each gateway run right after its own sink run: the machine's speed drifts
                # over a minute, and a share is only as good as its two runs are alike.
                out = []
                for i in range(1, n_rounds + 1):
                    baseline = sink_run(sink.port, wires, clients)
                    out.append((run(f"{name}-{i}", wires), baseline))
                return out

            ours_small, figures = throughput("10 KB", rounds("small", small), large=False)
            show(figures)
            show(throughput("1 MB", rounds("large", large), large=True)[1])
            rate = 0.5 * ours_small.n / ours_small.archived
            steady = build(world, KB10, max(clients, round(rate * paced_seconds)), 2 * 10**6)
            show(paced(run("paced", steady, rate), rate))
    finally:
        sink.stop()

    met = [f for f in out if f.verdict]
    print(
        f"\n  targets met: {sum(f.verdict == 'met' for f in met)} of {len(met)}; "
        f"{time.perf_counter() - began:.0f} s in all; load average {os.getloadavg()[0]:.2f} "
        "at the end.\n  MB = 10^6 bytes. CPU/msg: CPU seconds each side used from the first "
        "send until every receipt and delivery was sent, over the messages (relay: the sink "
        "taking receipts and deliveries; client: this process, polling included): the whole "
        "cost of a message, building and sending included, not only up to archived; 'not "
        "ours': other load on the machine during the run."
    )


if __name__ == "__main__":
    main()
