"""``gateway serve`` end to end, over real sockets: smtplib in, aiosmtpd relay out.

One gateway process (with its worker processes) for the module; messages made by our builder
and by ``openssl cms`` go in with smtplib; the verdicts are read from the archive, receipts and
deliveries from the relay, and both are opened with ``openssl cms`` as an agency would.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from archive import tables as t
from archive.db import Database
from formats.payload import Payload
from formats.smime import payload_entity
from gateway import pipeline
from gateway.demo import HUB_ADDRESS, DemoWorld, tamper
from tests import served
from tests.hostile import SAMPLES

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

SNV = "vanthu@snv.hanoi.gov.vn"
POLICE = "pa08@congan.hanoi.gov.vn"
ADMIN = "admin@exchange.hanoi.gov.vn"


@pytest.fixture(scope="module")
def live_world() -> DemoWorld:
    """A PKI made now: the gateway judges certificates and CRLs by the real clock."""
    return DemoWorld.create(datetime.now(UTC))


@pytest.fixture(scope="module")
def relay() -> Iterator[served.Relay]:
    r = served.Relay()
    controller, port = r.start()
    r.port = port  # type: ignore[attr-defined]
    yield r
    controller.stop()


@pytest.fixture(scope="module")
def gateway(
    live_world: DemoWorld, relay: served.Relay, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[served.Served, Database]]:
    home = tmp_path_factory.mktemp("serve-home")
    live_world.install(home, b"throw-away passphrase", relay_port=relay.port, admin=ADMIN)  # type: ignore[attr-defined]
    process = served.start(home)
    db = Database.open(f"sqlite:///{home / 'archive.db'}", migrate=False)
    yield process, db
    assert process.stop() == 0, process.log.read_text()
    db.dispose()


def _openssl(*args: str | Path, data: bytes | None = None) -> bytes:
    proc = subprocess.run(
        ["openssl", *map(str, args)], input=data, capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def _open_as(world: DemoWorld, organ_id: str, message: bytes, tmp: Path) -> tuple[bytes, bytes]:
    issued = world.agencies[organ_id]
    (tmp / "m.eml").write_bytes(message)
    (tmp / "me.pem").write_bytes(issued.cert_pem())
    (tmp / "me.key").write_bytes(issued.key_pem())
    (tmp / "root.pem").write_bytes(world.root.cert_pem())
    signed = _openssl(
        "cms", "-decrypt", "-in", tmp / "m.eml", "-recip", tmp / "me.pem", "-inkey", tmp / "me.key"
    )
    (tmp / "s.eml").write_bytes(signed)
    content = _openssl(
        "cms", "-verify", "-in", tmp / "s.eml", "-CAfile", tmp / "root.pem", "-purpose", "smimesign"
    )
    return signed, content


def _status(content: bytes) -> Payload:
    return Payload.from_xml(base64.b64decode(content.split(b"\r\n\r\n", 1)[1]))


def _entry_for(db: Database, number: int) -> dict[str, object]:
    import json

    with db.session(read_only=True) as s:
        row = s.get(t.Intake, number)
        assert row is not None and row.archive_seq is not None
        entry = s.scalar(select(t.LogEntry).where(t.LogEntry.seq == row.archive_seq))
        assert entry is not None
        fields: dict[str, object] = json.loads(entry.record)
        return fields


def _queued(reply: tuple[int, bytes]) -> int:
    code, text = reply
    assert code == 250, reply
    match = re.search(rb"queued as (\d+)", text)
    assert match is not None, text
    return int(match.group(1))


def test_the_main_job_end_to_end(
    gateway: tuple[served.Served, Database],
    live_world: DemoWorld,
    relay: served.Relay,
    tmp_path: Path,
) -> None:
    process, db = gateway
    port = process.smtp_port
    good = live_world.submission("H26.SNV")
    numbers = {
        "good": _queued(served.submit(port, good, mail_from=SNV, to=HUB_ADDRESS)),
        "again": _queued(served.submit(port, good, mail_from=SNV, to=HUB_ADDRESS)),
        "tampered": _queued(served.submit(port, tamper(good), mail_from=SNV, to=HUB_ADDRESS)),
        "revoked": _queued(
            served.submit(
                port,
                live_world.submission("H26.STP", signer=live_world.revoked["H26.STP"]),
                mail_from="vanthu@stp.hanoi.gov.vn",
                to=HUB_ADDRESS,
            )
        ),
        "wrong-agency": _queued(
            served.submit(
                port,
                live_world.submission("H26.SNV", payload_from="H26.STP"),
                mail_from=SNV,
                to=HUB_ADDRESS,
            )
        ),
    }
    served.wait_until_settled(db)
    verdicts = {name: _entry_for(db, n) for name, n in numbers.items()}
    assert verdicts["good"]["status"] == "accepted"
    assert verdicts["again"] == verdicts["good"]  # a duplicate: the same entry, not a new one
    assert verdicts["tampered"]["status"] == "quarantined"
    assert verdicts["revoked"]["status"] == "quarantined"
    assert [r["code"] for r in verdicts["revoked"]["reasons"]] == ["signer-revoked"]  # type: ignore[index]
    assert verdicts["wrong-agency"]["status"] == "rejected"

    # receipts: accepted, the same receipt again for the duplicate, rejected; nothing for the
    # quarantined ones (their senders are not authenticated)
    receipts = relay.to(SNV)
    assert len(receipts) == 3
    statuses = [_status(_open_as(live_world, "H26.SNV", m, tmp_path)[1]) for m in receipts]
    codes = sorted(str(p.records[0]["StatusCode"]) for p in statuses)
    assert codes == ["02", "03", "03"]
    accepted = [
        m for m, p in zip(receipts, statuses, strict=True) if p.records[0]["StatusCode"] == "03"
    ]
    assert accepted[0] == accepted[1]  # the original receipt, byte for byte
    assert not relay.to("vanthu@stp.hanoi.gov.vn")

    # the delivery: the police open it and verify Home Affairs' own signature
    [delivery] = relay.to(POLICE)
    _signed, content = _open_as(live_world, "H26.CATP", delivery, tmp_path)
    assert _status(content).header.sender.organ_id == "H26.SNV"

    metrics_port = process.info["metrics"]
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'gateway_messages_total{verdict="accepted"} 1' in text
    assert 'gateway_smtp_replies_total{code="250"} 5' in text
    assert 'gateway_archive_latency_seconds{quantile="0.99"}' in text

    verify = served.gateway(process.home, "archive", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_message_made_by_openssl_is_accepted(
    gateway: tuple[served.Served, Database], live_world: DemoWorld, tmp_path: Path
) -> None:
    process, db = gateway
    snv = live_world.agencies["H26.SNV"]
    opened = pipeline.process(
        live_world.submission("H26.SNV"), live_world.context(), at=datetime.now(UTC)
    ).opened
    assert opened is not None
    (tmp_path / "entity").write_bytes(payload_entity(opened.payload))
    (tmp_path / "snv.pem").write_bytes(snv.cert_pem())
    (tmp_path / "snv.key").write_bytes(snv.key_pem())
    (tmp_path / "hub.pem").write_bytes(live_world.hub.cert_pem())
    signed = _openssl(
        "cms", "-sign", "-md", "sha256", "-in", tmp_path / "entity",
        "-signer", tmp_path / "snv.pem", "-inkey", tmp_path / "snv.key",
    )  # fmt: skip
    (tmp_path / "signed").write_bytes(signed)
    encrypted = _openssl(
        "cms", "-encrypt", "-in", tmp_path / "signed", "-aes-256-cbc",
        "-from", SNV, "-to", HUB_ADDRESS, "-subject", "openssl", "-recip", tmp_path / "hub.pem",
    )  # fmt: skip
    raw = f"Message-ID: <{os.urandom(8).hex()}@snv.hanoi.gov.vn>\n".encode() + encrypted
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # SMTP lines end in CRLF
    number = _queued(served.submit(process.smtp_port, raw, mail_from=SNV, to=HUB_ADDRESS))
    served.wait_until_settled(db)
    fields = _entry_for(db, number)
    # the same payload as an earlier test's message would be a duplicate: either way, accepted
    assert fields["status"] == "accepted", fields["reasons"]
    assert fields["payload_sha256"] == hashlib.sha256(opened.payload).hexdigest()


#: Samples whose verdict depends on what the hub knows: this hub holds the agency's
#: certificate, so a signature that omits it still verifies (the pure tests use a hub without).
ACCEPTED_HERE = {"signer-cert-omitted"}


@pytest.mark.parametrize(
    "name",
    [n for n, s in SAMPLES.items() if s.limits is None and s.needs is None and s.known_bug is None],
)
def test_hostile_samples_over_smtp_get_their_code_or_verdict(
    name: str, gateway: tuple[served.Served, Database], live_world: DemoWorld
) -> None:
    process, db = gateway
    sample = SAMPLES[name]
    raw = sample.raw(live_world)
    code, text = served.submit(process.smtp_port, raw, mail_from=SNV, to=HUB_ADDRESS)
    if code != 250:  # refused at the door: a specific permanent code, nothing stored
        assert code in (500, 550, 552, 554), (code, text)
        return
    number = _queued((code, text))
    served.wait_until_settled(db)
    fields = _entry_for(db, number)
    if name in ACCEPTED_HERE:
        assert fields["status"] == "accepted", fields["reasons"]
        return
    assert fields["status"] in ("rejected", "quarantined")
    assert fields["reasons"][0]["code"] == sample.error.code, fields["reasons"]  # type: ignore[index]
