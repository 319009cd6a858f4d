"""The Postfix hand-off (deploy/postfix/) end to end: a real Postfix MX in front of a real gateway.

smtplib → Postfix's smtpd (tests/postfix.py, a throw-away instance on loopback) → LMTP → a real
``gateway serve`` (tests/served.py, LMTP listener only) → its receipts and deliveries go out
through the same Postfix (``[relay]`` = Postfix's smtpd, plain on loopback) → Postfix relays
them to the final sink (an aiosmtpd server in this process). Nothing leaves the machine.

Postfix's own records tell which gateway intake number each message got: its log line for the
LMTP delivery carries the gateway's reply, ``status=sent (250 2.0.0 queued as N)``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from formats.limits import Limits
from gateway.demo import HUB_ADDRESS, DemoWorld, tamper
from gateway.settings import ListenSettings
from tests import postfix, served, servers

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SNV = "vanthu@snv.hanoi.gov.vn"
POLICE = "pa08@congan.hanoi.gov.vn"
#: Postfix's message_size_limit and the gateway's max_message_bytes, the same number as in
#: deploy/postfix (there 32 MiB; smaller here so that probing the limit stays quick).
LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def live_world() -> DemoWorld:
    """A PKI made now: the gateway judges certificates and CRLs by the real clock."""
    return DemoWorld.create(datetime.now(UTC))


@pytest.fixture(scope="module")
def sink() -> Iterator[served.Relay]:
    relay = served.Relay()
    controller, port = relay.start()
    relay.port = port  # type: ignore[attr-defined]
    yield relay
    controller.stop()


@pytest.fixture(scope="module")
def mx(sink: served.Relay) -> Iterator[postfix.PostfixServer]:
    server = postfix.start_or_skip(
        lmtp_port=servers.free_port(),
        relay_port=sink.port,  # type: ignore[attr-defined]
        message_size_limit=LIMIT,
    )
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Gateway:
    """``gateway serve`` with only an LMTP listener, relaying through the MX; restartable."""

    home: Path
    lmtp_port: int
    db: Database
    process: served.Served | None = None

    def start(self) -> None:
        self.process = served.start(
            self.home, "--smtp", "", "--lmtp", f"{postfix.HOST}:{self.lmtp_port}"
        )

    def stop(self) -> None:
        assert self.process is not None
        assert self.process.stop() == 0, self.process.log.read_text()
        self.process = None


@pytest.fixture(scope="module")
def gateway(
    live_world: DemoWorld, mx: postfix.PostfixServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    home = tmp_path_factory.mktemp("postfix-gateway")
    live_world.install(
        home,
        b"throw-away passphrase",
        relay_port=mx.port,  # receipts and deliveries go out through Postfix
        extra_config=f"\n[limits]\nmax_message_bytes = {LIMIT}\n",
    )
    db = Database.open(f"sqlite:///{home / 'archive.db'}", migrate=False)
    gw = Gateway(home, mx.lmtp_port, db)
    gw.start()
    yield gw
    if gw.process is not None:
        gw.stop()
    db.dispose()


# --- helpers ----------------------------------------------------------------------------------


def _intake_number(mx: postfix.PostfixServer, queue_id: str) -> int:
    """Wait for Postfix's LMTP delivery of ``queue_id``; the gateway's intake number."""
    line = mx.wait_delivered(queue_id)
    assert line["status"] == "sent", line
    assert line["service"] == "lmtp" and line["relay"].endswith(f":{mx.lmtp_port}"), line
    match = re.fullmatch(r"250 2\.0\.0 queued as (\d+)", line["reply"])
    assert match is not None, line
    return int(match.group(1))


def _accepted_by_mx(submitted: postfix.Submitted) -> str:
    assert submitted.code == 250, submitted
    assert submitted.queue_id is not None, submitted
    return submitted.queue_id


def _entry(db: Database, number: int) -> tuple[int, dict[str, object]]:
    """(archive seq, record) of what intake ``number`` was filed as."""
    with db.session(read_only=True) as s:
        row = s.get(t.Intake, number)
        assert row is not None and row.archive_seq is not None
        entry = s.scalar(select(t.LogEntry).where(t.LogEntry.seq == row.archive_seq))
        assert entry is not None
        record: dict[str, object] = json.loads(entry.record)
        return row.archive_seq, record


def _outbox(db: Database, seq: int) -> list[t.Outbox]:
    with db.session(read_only=True) as s:
        rows = list(s.scalars(select(t.Outbox).where(t.Outbox.for_seq == seq)))
        s.expunge_all()
        return rows


def _intake_count(db: Database) -> int:
    with db.session(read_only=True) as s:
        return int(s.scalar(select(func.count()).select_from(t.Intake)) or 0)


def _at_sink(sink: served.Relay, sent: bytes, timeout: float = 60) -> list[bytes]:
    """What reached the sink whose tail is ``sent`` (the gateway's bytes, after Postfix's
    Received header); waits for at least one."""
    deadline = time.monotonic() + timeout
    while True:
        with sink.lock:
            found = [m for _f, _r, m in sink.received if m.endswith(sent)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _only_received_headers(prefix: bytes) -> bool:
    """``prefix`` is one or more ``Received:`` header fields (with folded lines), nothing else."""
    lines = prefix.split(b"\r\n")
    return (
        bool(prefix)
        and prefix.endswith(b"\r\n")
        and lines[-1] == b""
        and all(line.startswith(b"Received: ") or line[:1] in (b" ", b"\t") for line in lines[:-1])
        and lines[0].startswith(b"Received: ")
    )


def _settle(gw: Gateway, mx: postfix.PostfixServer) -> None:
    """The gateway has filed and sent everything, and Postfix has passed it all on."""
    if gw.process is None:  # an earlier test stopped it and failed before starting it again
        gw.start()
        mx.flush()
    for _ in range(2):  # what Postfix relays for the gateway never comes back to it
        served.wait_until_settled(gw.db)
        mx.wait_queue_empty()


# --- the tests --------------------------------------------------------------------------------


def test_postfix_hands_a_submission_to_the_gateway_and_relays_what_it_owes(
    gateway: Gateway, mx: postfix.PostfixServer, sink: served.Relay, live_world: DemoWorld
) -> None:
    good = live_world.submission("H26.SNV")
    queue_id = _accepted_by_mx(postfix.submit(mx.port, good, mail_from=SNV, to=HUB_ADDRESS))
    number = _intake_number(mx, queue_id)
    _settle(gateway, mx)

    seq, record = _entry(gateway.db, number)
    assert record["status"] == "accepted", record
    with gateway.db.session(read_only=True) as s:
        intake = s.get(t.Intake, number)
        assert intake is not None
        transport = intake.transport
    assert transport["protocol"] == "lmtp"
    assert transport["mail_from"] == SNV
    assert transport["helo"] == "mx.test"  # Postfix's LHLO
    assert transport["peer"] == postfix.HOST

    # The gateway's receipt and delivery went to Postfix (the relay) and on to the sink,
    # byte for byte: Postfix only put its Received header in front.
    rows = sorted(_outbox(gateway.db, seq), key=lambda r: r.kind)
    assert [(r.kind, r.state, r.rcpt_to) for r in rows] == [
        ("delivery", "sent", [POLICE]),
        ("receipt", "sent", [SNV]),
    ]
    for row in rows:
        assert row.message is not None
        [arrived] = _at_sink(sink, row.message)
        assert _only_received_headers(arrived[: -len(row.message)]), arrived[:400]
        assert b"by mx.test (Postfix)" in arrived[: -len(row.message)]
    assert sink.to(SNV) and sink.to(POLICE)
    with sink.lock:
        senders = {f for f, rcpt, _m in sink.received if SNV in rcpt or POLICE in rcpt}
    assert senders == {HUB_ADDRESS}


def test_a_tampered_message_is_quarantined_and_nothing_goes_out(
    gateway: Gateway, mx: postfix.PostfixServer, sink: served.Relay, live_world: DemoWorld
) -> None:
    _settle(gateway, mx)
    before = len(sink.received)
    bad = tamper(live_world.submission("H26.SNV"))
    queue_id = _accepted_by_mx(postfix.submit(mx.port, bad, mail_from=SNV, to=HUB_ADDRESS))
    number = _intake_number(mx, queue_id)
    _settle(gateway, mx)
    seq, record = _entry(gateway.db, number)
    assert record["status"] == "quarantined", record
    assert _outbox(gateway.db, seq) == []  # no receipt: the sender is not authenticated
    time.sleep(0.5)
    assert len(sink.received) == before


def test_postfix_accepts_only_the_hub_addresses_of_the_hub_domain(
    gateway: Gateway, mx: postfix.PostfixServer
) -> None:
    refused = postfix.submit(
        mx.port, b"Subject: x\r\n\r\nx\r\n", mail_from=SNV, to="other@exchange.hanoi.gov.vn"
    )
    assert refused.code == 550 and b"5.1.1" in refused.text, refused


def _plain(size: int) -> bytes:
    """A plain message of exactly ``size`` bytes, in 76-character lines (like base64)."""
    head = b"From: probe@snv.hanoi.gov.vn\r\nSubject: size probe\r\n\r\n"
    line = b"A" * 76 + b"\r\n"
    body_size = size - len(head)
    lines, rest = divmod(body_size, len(line))
    if rest == 1:  # one more character on the last line
        body = line * (lines - 1) + b"A" * 77 + b"\r\n"
    else:
        body = line * lines + (b"B" * (rest - 2) + b"\r\n" if rest else b"")
    raw = head + body
    assert len(raw) == size and raw.endswith(b"\r\n")
    return raw


def test_postfix_refuses_what_is_over_the_limit_and_passes_only_what_the_gateway_takes(
    gateway: Gateway, mx: postfix.PostfixServer, sink: served.Relay
) -> None:
    _settle(gateway, mx)
    intake_before = _intake_count(gateway.db)
    sink_before = len(sink.received)
    sender = "probe@snv.hanoi.gov.vn"

    # Over the limit: refused by Postfix at once (the sender's MTA gets 552, no bounce later),
    # declared in MAIL FROM SIZE= or not.
    declared = postfix.submit(mx.port, b"x\r\n", mail_from=sender, to=HUB_ADDRESS, size=LIMIT + 1)
    assert declared.code == 552 and b"5.3.4" in declared.text, declared
    undeclared = postfix.submit(mx.port, _plain(LIMIT + 1), mail_from=sender, to=HUB_ADDRESS)
    assert undeclared.code == 552 and b"5.3.4" in undeclared.text, undeclared

    # The largest message Postfix accepts: Postfix counts its queue file (the envelope, its
    # Received header, a record header per line), so the same number is a stricter limit there
    # than the gateway's count of the bytes LMTP hands over.
    low, high = LIMIT - 16 * 1024, LIMIT + 1  # accepted at low, refused at high
    accepted: list[tuple[int, str]] = []
    while high - low > 1:
        middle = (low + high) // 2
        reply = postfix.submit(mx.port, _plain(middle), mail_from=sender, to=HUB_ADDRESS)
        if reply.code == 250:
            assert reply.queue_id is not None
            accepted.append((middle, reply.queue_id))
            low = middle
        else:
            assert reply.code == 552, reply
            high = middle
    assert accepted and accepted[-1][0] == low < LIMIT
    # Every message Postfix accepted, the gateway took (250 queued as N, never a 552 that
    # would bounce), and each is at most the gateway's limit as the gateway received it.
    for size, queue_id in accepted:
        number = _intake_number(mx, queue_id)
        with gateway.db.session(read_only=True) as s:
            row = s.get(t.Intake, number)
            assert row is not None
            assert size < row.size <= LIMIT  # plus Postfix's Received header
    _settle(gateway, mx)
    assert _intake_count(gateway.db) == intake_before + len(accepted)
    time.sleep(0.5)
    assert len(sink.received) == sink_before  # no bounce, no receipt for unsigned mail


def test_gateway_down_postfix_keeps_the_message_and_delivers_it_once_when_it_is_back(
    gateway: Gateway, mx: postfix.PostfixServer, sink: served.Relay, live_world: DemoWorld
) -> None:
    _settle(gateway, mx)
    intake_before = _intake_count(gateway.db)
    gateway.stop()
    good = live_world.submission("H26.SNV")
    queue_id = _accepted_by_mx(postfix.submit(mx.port, good, mail_from=SNV, to=HUB_ADDRESS))
    deferred = mx.wait_deferred(queue_id)
    assert any("Connection refused" in reason for reason in deferred.reasons), deferred
    assert _intake_count(gateway.db) == intake_before

    gateway.start()
    mx.flush()  # postqueue -f: retry now rather than after the back-off
    number = _intake_number(mx, queue_id)
    _settle(gateway, mx)
    assert _intake_count(gateway.db) == intake_before + 1  # exactly once
    seq, record = _entry(gateway.db, number)
    assert record["status"] == "accepted", record
    rows = _outbox(gateway.db, seq)
    assert sorted(r.kind for r in rows) == ["delivery", "receipt"]
    for row in rows:
        assert row.state == "sent" and row.message is not None
        assert len(_at_sink(sink, row.message)) == 1
    attempts = mx.deliveries(queue_id)
    assert [a["status"] for a in attempts] == ["deferred"] * (len(attempts) - 1) + ["sent"]


def test_a_burst_through_postfix_is_archived_and_answered(
    gateway: Gateway, mx: postfix.PostfixServer, sink: served.Relay, live_world: DemoWorld
) -> None:
    _settle(gateway, mx)
    messages = [live_world.submission("H26.SNV", number=n) for n in range(1, 13)]
    replies = postfix.burst(mx.port, messages, mail_from=SNV, connections=4, per_connection=3)
    queue_ids = [_accepted_by_mx(r) for r in replies]
    assert len(set(queue_ids)) == len(messages)
    numbers = [_intake_number(mx, q) for q in queue_ids]
    assert len(set(numbers)) == len(messages)
    _settle(gateway, mx)
    for number in numbers:
        seq, record = _entry(gateway.db, number)
        assert record["status"] == "accepted", record
        rows = _outbox(gateway.db, seq)
        assert sorted((r.kind, r.state) for r in rows) == [
            ("delivery", "sent"),
            ("receipt", "sent"),
        ]
        for row in rows:
            assert row.message is not None and _at_sink(sink, row.message)


def test_the_deployment_snippet_is_valid_postfix_configuration(tmp_path: Path) -> None:
    """deploy/postfix/main.cf.snippet parses, and every parameter in it is one Postfix knows."""
    sbin = postfix.find_sbin()
    if sbin is None:
        if postfix.required():
            pytest.fail("Postfix is required here (CI): postconf not found", pytrace=False)
        pytest.skip("Postfix not available: postconf not found")
    snippet = served.ROOT / "deploy/postfix/main.cf.snippet"
    (tmp_path / "main.cf").write_text(snippet.read_text())
    (tmp_path / "master.cf").write_text(
        (served.ROOT / "deploy/postfix/master.cf.snippet").read_text()
    )
    proc = subprocess.run(
        [str(sbin / "postconf"), "-c", str(tmp_path), "-n"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    conf = dict(line.split(" = ", 1) for line in proc.stdout.splitlines() if " = " in line)
    # The numbers that must agree with the gateway's defaults, and the test instance's.
    assert int(conf["message_size_limit"]) == Limits().max_message_bytes
    assert int(conf["message_size_limit"]) == postfix.MESSAGE_SIZE_LIMIT
    assert int(conf["lmtp_destination_recipient_limit"]) == ListenSettings().max_recipients
    tested = postfix.settings(
        tmp_path, lmtp_port=2424, relay_port=25, message_size_limit=0, hub_domain="x"
    )
    for key in (
        "lmtp_destination_concurrency_limit",
        "lmtp_destination_recipient_limit",
        "disable_mime_output_conversion",
    ):
        assert conf[key] == tested[key], key
    assert "127.0.0.0/8" in conf["mynetworks"].split()
    entries = [
        line.split()
        for name in ("transport", "relay_recipients")
        for line in (served.ROOT / "deploy/postfix" / name).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert entries == [[HUB_ADDRESS, "lmtp:inet:127.0.0.1:2424"], [HUB_ADDRESS, "OK"]]
    proc = subprocess.run(
        [str(sbin / "postconf"), "-c", str(tmp_path), "-M"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
