"""Receipts, deliveries and alerts: owed when a message is filed, built, filed, sent.

Receipts and deliveries are checked with ``openssl cms`` as the agency would: decrypted with the
agency's own key, the signature verified against the CA.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import email
import email.policy
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
import sqlalchemy
from sqlalchemy import select

from archive import tables as t
from archive.records import Transport
from archive.service import Archive
from formats.limits import Limits
from formats.payload import Organ, Payload, build_payload
from formats.smime import build_message
from formats.vntime import local_day
from gateway import builder as builder_module
from gateway import intake, outbound
from gateway.builder import Builder, Hub
from gateway.claims import release_stale_claims, this_host
from gateway.demo import HUB_ADDRESS, DemoWorld, tamper
from gateway.pipeline import Context
from gateway.sender import Sender
from gateway.worker import Worker, worker_name
from keys import store
from keys.directory import Directory
from tests.conftest import WORLD_AT

pytestmark = pytest.mark.skipif(
    subprocess.run(["openssl", "version"], capture_output=True, check=False).returncode != 0,
    reason="openssl is not installed",
)

LATER = WORLD_AT + timedelta(minutes=5)


def _receive(archive: Archive, raw: bytes) -> int:
    return intake.accept(archive.db, raw, Transport(WORLD_AT, "smtp", "127.0.0.1"))


def _process(archive: Archive, ctx: Context, directory: Directory, hub: Hub) -> int | None:
    """Run the worker and the builder; the archive number of the (last) message filed."""
    outcomes = Worker(archive, lambda: ctx, clock=lambda: LATER, name="w").run_once()
    builder = Builder(archive, hub, lambda: directory, clock=lambda: LATER, name="b")
    while builder.run_once():
        pass
    return outcomes[-1].archive_seq


def _rows(archive: Archive) -> dict[str, t.Outbox]:
    with archive.db.session(read_only=True) as s:
        rows = list(s.query(t.Outbox).order_by(t.Outbox.id))
        s.expunge_all()
    return {r.key: r for r in rows}


def agency_alert(rows: dict[str, t.Outbox], organ_id: str) -> t.Outbox:
    """The one alert of the day about ``organ_id``'s setup (key ``alert:agency:ORGAN:DAY``)."""
    [alert] = [r for k, r in rows.items() if k.startswith(f"alert:agency:{organ_id}:")]
    return alert


def _openssl(*args: str | Path, data: bytes | None = None) -> bytes:
    proc = subprocess.run(
        ["openssl", *map(str, args)], input=data, capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def _open_as(
    message: bytes, world: DemoWorld, organ_id: str, tmp_path: Path
) -> tuple[bytes, bytes]:
    """Decrypt with the agency's key and verify the signature: (signed entity, content)."""
    issued = world.agencies[organ_id]
    (tmp_path / "in.eml").write_bytes(message)
    (tmp_path / "me.pem").write_bytes(issued.cert_pem())
    (tmp_path / "me.key").write_bytes(issued.key_pem())
    (tmp_path / "root.pem").write_bytes(world.root.cert_pem())
    signed = _openssl(
        "cms", "-decrypt", "-in", tmp_path / "in.eml",
        "-recip", tmp_path / "me.pem", "-inkey", tmp_path / "me.key",
    )  # fmt: skip
    (tmp_path / "signed.eml").write_bytes(signed)
    content = _openssl(
        "cms", "-verify", "-in", tmp_path / "signed.eml", "-CAfile", tmp_path / "root.pem",
        "-purpose", "smimesign", "-attime", str(int(LATER.timestamp())),
    )  # fmt: skip
    return signed, content


def _payload(content: bytes) -> Payload:
    return Payload.from_xml(base64.b64decode(content.split(b"\r\n\r\n", 1)[1]))


def test_accepted_message_gets_a_signed_receipt_and_a_delivery_openssl_can_open(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    seq = _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    assert sorted(rows) == [f"delivery:{seq}:H26.CATP", f"receipt:{seq}"]
    receipt = rows[f"receipt:{seq}"]
    assert (receipt.state, receipt.rcpt_to, receipt.mail_from) == (
        "ready",
        ["vanthu@snv.hanoi.gov.vn"],
        hub.address,
    )
    assert receipt.message is not None
    _signed, content = _open_as(receipt.message, world, "H26.SNV", tmp_path)
    status = _payload(content)
    assert status.exchange.category == "status"
    [record] = status.records
    assert record["StatusCode"] == "03"
    assert record["ArchiveSequence"] == seq
    with archive.db.session(read_only=True) as s:
        message = archive.log.entry(s, seq)
        assert record["ReceivedDigest"] == message.fields["payload_sha256"]
        assert str(status.header.response_for) == message.fields["document_id"]
        # the receipt entry follows the bundle convention: kind, for_seq, blob
        entry = archive.log.entry(s, receipt.entry_seq or 0)
        assert (entry.kind, entry.fields["for_seq"]) == ("receipt", seq)
        assert archive.blobs.get(s, entry.blobs["receipt"]) == receipt.message
        signed_entity = archive.blobs.get(s, message.blobs["decrypted"])

    delivery = rows[f"delivery:{seq}:H26.CATP"]
    assert delivery.rcpt_to == ["pa08@congan.hanoi.gov.vn"]
    assert delivery.message is not None
    assert b"Subject:" in delivery.message and raw.split(b"\r\n\r\n")[0] not in delivery.message
    signed, content = _open_as(delivery.message, world, "H26.CATP", tmp_path)
    # the sender's signed entity, byte for byte: the police verify Home Affairs' own signature
    assert signed == signed_entity
    assert _payload(content).header.sender.organ_id == "H26.SNV"
    assert archive.verify().ok
    # RFC 3834: nothing answers them automatically (an agency's auto-responder, a gateway)
    assert b"\r\nAuto-Submitted: auto-replied\r\n" in receipt.message.split(b"\r\n\r\n")[0]
    assert b"\r\nAuto-Submitted: auto-generated\r\n" in delivery.message.split(b"\r\n\r\n")[0]


def test_a_message_taken_in_at_the_size_limit_is_delivered(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """A delivery is the message re-encrypted, a little larger; held to the size limit it was
    taken in under, one accepted near the limit failed for good ("send smaller parts"), and
    a configured limit above 32 MiB was never the builder's."""
    raw = world.submission("H26.SNV")
    limits = Limits(max_message_bytes=len(raw))
    _receive(archive, raw)
    [outcome] = Worker(
        archive, lambda: dataclasses.replace(world_ctx, limits=limits), clock=lambda: LATER,
        name="w",
    ).run_once()  # fmt: skip
    assert outcome.disposition == "accepted"
    built = Builder(archive, hub, lambda: world.directory, clock=lambda: LATER, name="b",
                    limits=builder_module.outbound_limits(limits))  # fmt: skip
    while built.run_once():
        pass
    delivery = _rows(archive)[f"delivery:{outcome.archive_seq}:H26.CATP"]
    assert delivery.state == "ready" and delivery.message is not None
    assert len(delivery.message) > len(raw)


def test_a_status_is_filed_and_delivered_but_never_receipted(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """A receipt is a status: one receipted with another status, two gateways (or an agency
    system that answers as this one does) would send each other receipts for ever."""
    snv, police = world.directory.get("H26.SNV"), world.directory.get("H26.CATP")
    assert snv is not None and police is not None
    status = build_payload(
        "status",
        sender=Organ("H26.SNV", snv.name_vi, "vanthu@snv.hanoi.gov.vn"),
        recipients=[Organ("H26.CATP", police.name_vi, "pa08@congan.hanoi.gov.vn")],
        records=[{"StatusCode": "01", "Description": "Đã nhận", "Timestamp": WORLD_AT,
                  "ReceivedDigest": "a" * 64, "ArchiveSequence": 7}],
        document_number="1/BN", issued_on=WORLD_AT.date(), message_id=uuid.uuid4(),
        subject="Biên nhận",
    ).to_xml()  # fmt: skip
    issued = world.agencies["H26.SNV"]
    raw = build_message(
        status, signer_cert=issued.cert, signer_key=issued.key, recipients=[world.hub.cert],
        from_addr="vanthu@snv.hanoi.gov.vn", to_addrs=[HUB_ADDRESS],
        message_id="<status-1@snv.hanoi.gov.vn>", date=WORLD_AT, subject="Biên nhận",
    )  # fmt: skip
    _receive(archive, raw)
    seq = _process(archive, world_ctx, world.directory, hub)
    assert sorted(_rows(archive)) == [f"delivery:{seq}:H26.CATP"]
    _receive(archive, raw)  # again: a duplicate, resent no receipt (there is none)
    _process(archive, world_ctx, world.directory, hub)
    assert sorted(_rows(archive)) == [f"delivery:{seq}:H26.CATP"]


def test_an_automatic_answer_is_filed_and_delivered_but_never_receipted(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """RFC 3834: a message that says it answers another automatically (a receipt from a
    gateway whose status this hub's schema refuses says so too) gets no receipt; a
    submission an agency's system sends (auto-generated) gets one as any."""
    replied = b"Auto-Submitted: auto-replied\r\n" + world.submission("H26.SNV")
    generated = b"Auto-Submitted: auto-generated\r\n" + world.submission("H26.SNV", number=2)
    _receive(archive, replied)
    first = _process(archive, world_ctx, world.directory, hub)
    _receive(archive, generated)
    second = _process(archive, world_ctx, world.directory, hub)
    assert sorted(_rows(archive)) == [
        f"delivery:{first}:H26.CATP", f"delivery:{second}:H26.CATP", f"receipt:{second}",
    ]  # fmt: skip


def test_rejected_message_gets_reasons_in_vietnamese_and_english(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    _receive(archive, world.submission("H26.SNV", payload_from="H26.STP"))
    seq = _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    assert sorted(rows) == [f"receipt:{seq}"]  # nothing is delivered
    message = rows[f"receipt:{seq}"].message
    assert message is not None
    [record] = _payload(_open_as(message, world, "H26.SNV", tmp_path)[1]).records
    assert record["StatusCode"] == "02"
    text = str(record["Description"])
    assert "Bị từ chối" in text and "Rejected" in text
    assert "[agency-mismatch]" in text
    # never an inbound header in an outbound one
    head = message.split(b"\r\n\r\n", 1)[0]
    assert b"Subject: =?utf-8?" in head and b"vanthu@snv" in head


def test_quarantined_sender_gets_nothing(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    _receive(archive, tamper(world.submission("H26.SNV")))
    _process(archive, world_ctx, world.directory, hub)
    assert _rows(archive) == {}


def test_a_duplicate_gets_the_original_receipt_again(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    seq = _process(archive, world_ctx, world.directory, hub)
    _receive(archive, raw)  # sent again later
    assert _process(archive, world_ctx, world.directory, hub) == seq
    rows = _rows(archive)
    [again] = [r for k, r in rows.items() if k.startswith("resend:")]
    assert again.state == "ready"
    assert again.message == rows[f"receipt:{seq}"].message
    assert again.rcpt_to == rows[f"receipt:{seq}"].rcpt_to
    assert [k for k in rows if k.startswith("delivery:")] == [f"delivery:{seq}:H26.CATP"]


@pytest.mark.parametrize("messages", [1, 6])
def test_a_batch_reads_its_log_entries_in_one_query_whatever_its_size(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, messages: int
) -> None:
    """Each receipt and delivery answers a log entry: the batch reads them all at once, not one
    query per row, so building costs the same few statements for 1 message as for 6."""
    for number in range(messages):
        _receive(archive, world.submission("H26.SNV", number=number + 1))
    Worker(archive, lambda: world_ctx, clock=lambda: LATER, name="w").run_once()
    builder = Builder(archive, hub, lambda: world.directory, clock=lambda: LATER, name="b")
    reads: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "log_entries" in statement:
            reads.append(statement)

    sqlalchemy.event.listen(archive.db.engine, "before_cursor_execute", seen)
    try:
        assert builder.run_once() == 2 * messages  # a receipt and a delivery each
    finally:
        sqlalchemy.event.remove(archive.db.engine, "before_cursor_execute", seen)
    assert len(reads) == 1, reads
    rows = _rows(archive)
    assert sum(r.state == "ready" for r in rows.values()) == 2 * messages


def test_a_delivery_without_a_certificate_fails_and_alerts_the_admin(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    police = world.directory.get("H26.CATP")
    assert police is not None
    with archive.db.session() as s:
        for c in store.certificates(s, role="agency", organ_id="H26.CATP"):
            store.retire_certificate(s, c.sha256, at=WORLD_AT, actor="test")
    _receive(archive, world.submission("H26.SNV"))
    _receive(archive, world.submission("H26.SNV", number=2))
    _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    failed = [r for k, r in rows.items() if k.startswith("delivery:")]
    assert [r.state for r in failed] == ["failed", "failed"]
    assert all("no usable encryption certificate" in (r.last_reply or "") for r in failed)
    # The same cause for every row to the agency until an admin acts: one alert a day.
    alert = agency_alert(rows, "H26.CATP")
    assert [k for k in rows if k.startswith("alert:")] == [alert.key]
    assert f"delivery {failed[0].key}" in alert.detail["text"]
    assert alert.state == "ready" and alert.rcpt_to == [hub.admin]
    assert alert.message is not None
    # Its subject says what it is about (alerts are about many things, not only failures).
    subject = email.message_from_bytes(alert.message, policy=email.policy.default)["Subject"]
    assert subject.startswith("Gateway alert: Mail for H26.CATP cannot be built"), subject
    (tmp_path / "alert.eml").write_bytes(alert.message)
    (tmp_path / "root.pem").write_bytes(world.root.cert_pem())
    text = _openssl(
        "cms", "-verify", "-in", tmp_path / "alert.eml", "-CAfile", tmp_path / "root.pem",
        "-purpose", "smimesign", "-attime", str(int(LATER.timestamp())),
    )  # fmt: skip
    assert b"no usable encryption certificate" in base64.b64decode(text.split(b"\r\n\r\n")[1])


def _build_dying_on(archive: Archive, hub: Hub, directory: Directory, poison: str) -> int:
    """One cycle of a builder (in a forked process) that dies building the row keyed
    ``poison``, as under the OOM killer or a crash in a native library: no exception, no
    clean-up. Its exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            archive.db.engine.dispose(close=False)  # the parent's connections are not ours
            builder = Builder(
                archive, hub, lambda: directory, clock=lambda: LATER, name=worker_name()
            )
            real = builder._build

            def build(s: Any, row: t.Outbox, now: Any, batch: Any) -> Any:
                if row.key == poison:
                    os._exit(137)
                return real(s, row, now, batch)

            builder._build = build  # type: ignore[method-assign]
            builder.run_once()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_row_whose_building_kills_its_worker_fails_and_stops_no_other(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """Each death puts the claim back (the supervisor's sweep). A row claimed to build and never
    built is claimed alone next time, and after MAX_CLAIMS it fails unbuilt, the admin alerted.
    It was claimed again for ever, with the batch claimed with it: none of those was built."""
    _receive(archive, world.submission("H26.SNV"))
    _receive(archive, world.submission("H26.SNV", number=2))
    outcomes = Worker(archive, lambda: world_ctx, clock=lambda: LATER, name="w").run_once()
    first, second = (o.archive_seq for o in outcomes)
    poison = f"receipt:{first}"
    exits = []
    for _ in range(10):
        with archive.db.session(read_only=True) as s:
            if not s.scalar(select(t.Outbox.id).where(t.Outbox.state.in_(("new", "building")))):
                break
        exits.append(_build_dying_on(archive, hub, world.directory, poison))
        release_stale_claims(archive.db, this_host())  # the supervisor's sweep
    # With the batch; alone twice; failed unbuilt; then each row it held up, alone; the alert.
    assert exits == [137] * builder_module.MAX_CLAIMS + [0] * 5
    rows = _rows(archive)
    assert {k: r.state for k, r in rows.items() if not k.startswith("alert:")} == {
        poison: "failed",
        f"delivery:{first}:H26.CATP": "ready",
        f"receipt:{second}": "ready",
        f"delivery:{second}:H26.CATP": "ready",
    }
    assert all(r.claims == 0 for r in rows.values())
    assert "stopped 3 times before finishing it" in (rows[poison].last_reply or "")
    [alert] = [r for k, r in rows.items() if k.startswith("alert:")]
    assert alert.state == "ready" and poison in alert.detail["text"]


def test_a_build_the_database_failed_gives_its_claim_back_uncounted(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database fails as each build is filed, 4 times (locked, then gone while the claims
    are given back): every claim was counted, and after 3 the receipt failed for good ("the
    worker building it stopped 3 times") though no worker ever stopped. A builder that lives on
    gives its claims back uncounted, at once or at its next run."""
    _receive(archive, world.submission("H26.SNV"))
    [filed] = Worker(archive, lambda: world_ctx, clock=lambda: LATER, name="w").run_once()
    builder = Builder(archive, hub, lambda: world.directory, clock=lambda: LATER, name="b")
    locked = sqlalchemy.exc.OperationalError("INSERT …", {}, Exception("database is locked"))
    real_file_in, real_give_back = archive.file_in, builder.unsettled.give_back

    def file_in(*_args: Any, **_kw: Any) -> Any:
        raise locked

    def give_back_fails(*_args: Any, **_kw: Any) -> None:
        if builder.unsettled.held:
            raise locked

    monkeypatch.setattr(archive, "file_in", file_in)
    for _ in range(3):
        with pytest.raises(outbound.ENVIRONMENT):
            builder.run_once()
        assert {r.state for r in _rows(archive).values()} == {"new"}  # given back at once
    monkeypatch.setattr(builder.unsettled, "give_back", give_back_fails)
    with pytest.raises(outbound.ENVIRONMENT):
        builder.run_once()
    assert {r.state for r in _rows(archive).values()} == {"building"}  # kept, to give back
    monkeypatch.setattr(builder.unsettled, "give_back", real_give_back)
    monkeypatch.setattr(archive, "file_in", real_file_in)
    while builder.run_once():  # the database is back: given back first, then built
        pass
    rows = _rows(archive)
    assert {k: r.state for k, r in rows.items()} == {
        f"receipt:{filed.archive_seq}": "ready",
        f"delivery:{filed.archive_seq}:H26.CATP": "ready",
    }
    assert all(r.claims == 0 for r in rows.values())


def test_a_defect_one_row_sets_off_after_its_build_counts_and_stops_no_other(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A defect of ours that one row sets off outside its own build (here: while its build is
    recorded) fails the whole batch's transaction, every time. Such a claim counts and waits
    for its lease: then each row is claimed alone, and that one, after MAX_CLAIMS, fails
    unbuilt; the others are built."""
    _receive(archive, world.submission("H26.SNV"))
    [filed] = Worker(archive, lambda: world_ctx, clock=lambda: LATER, name="w").run_once()
    poison = f"receipt:{filed.archive_seq}"
    real = Builder._settle

    def settle(self: Builder, s: Any, row: t.Outbox, b: Any, now: Any) -> None:
        if row.key == poison and b.failure is None:
            raise KeyError("a defect")
        real(self, s, row, b, now)

    monkeypatch.setattr(Builder, "_settle", settle)
    clock = [LATER]
    builder = Builder(archive, hub, lambda: world.directory, clock=lambda: clock[0], name="b")
    with pytest.raises(KeyError):
        builder.run_once()
    assert {r.state for r in _rows(archive).values()} == {"building"}
    assert builder.run_once() == 0  # the claims wait for their lease: nothing to claim
    failures = 1
    for _ in range(10):
        clock[0] += outbound.LEASE + timedelta(seconds=1)
        try:
            if not builder.run_once():
                break
        except KeyError:
            failures += 1
    assert failures == builder_module.MAX_CLAIMS
    rows = _rows(archive)
    assert {k: r.state for k, r in rows.items() if not k.startswith("alert:")} == {
        poison: "failed",
        f"delivery:{filed.archive_seq}:H26.CATP": "ready",
    }
    assert "stopped 3 times before finishing it" in (rows[poison].last_reply or "")


def test_a_build_the_whole_service_stopped_with_does_not_count_against_the_row(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """At start-up, rows the previous run's workers were building go back to ``new`` without
    counting: kill -9 of the service (or a power cut) is not the rows' doing."""
    _receive(archive, world.submission("H26.SNV"))
    Worker(archive, lambda: world_ctx, clock=lambda: LATER, name="w").run_once()
    with archive.db.session() as s:
        claimed = outbound.claim(s, "host:999999999", LATER, 10, sending=False)  # gone
    assert len(claimed) == 2
    assert {(r.state, r.claims) for r in _rows(archive).values()} == {("building", 1)}
    assert release_stale_claims(archive.db, "host", at_start=True) == 2
    assert {(r.state, r.claims) for r in _rows(archive).values()} == {("new", 0)}


def test_an_agency_missing_from_the_directory_is_a_failed_delivery(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    without_police = Directory.of([a for a in world.directory if a.organ_id != "H26.CATP"])
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, without_police, dataclasses.replace(hub, admin=""))
    rows = _rows(archive)
    assert rows[f"delivery:{seq}:H26.CATP"].state == "failed"
    assert "no e-mail address" in (rows[f"delivery:{seq}:H26.CATP"].last_reply or "")
    assert not any(k.startswith("alert:") for k in rows)  # no admin address: logged only


@dataclasses.dataclass
class _Reply:
    outcome: Literal["sent", "retry", "failed"]
    reply: str
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


class _Relay:
    """Stands in for the relay's answers (the SMTP client is tested against aiosmtpd)."""

    def __init__(self, *answers: _Reply) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[bytes, str, tuple[str, ...]]] = []
        self.sessions = 0
        self.open = False

    @contextlib.contextmanager
    def session(self) -> Iterator[_Relay]:
        """One per batch: the messages of a batch go over one connection."""
        self.sessions += 1
        self.open = True
        try:
            yield self
        finally:
            self.open = False

    def deliver(self, message: bytes, *, mail_from: str, rcpt_to: Sequence[str]) -> _Reply:
        assert self.open
        self.sent.append((message, mail_from, tuple(rcpt_to)))
        return self.answers.pop(0)


def test_sender_retries_4xx_fails_5xx_and_never_records_a_failure_as_sent(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    relay = _Relay(
        _Reply("retry", "451 4.3.0 try later"),
        _Reply("failed", "550 5.1.1 no such user"),
        _Reply("sent", "250 ok"),
        _Reply("sent", "250 ok"),
    )
    clock = [LATER]
    sender = Sender(archive, relay.session, lambda: clock[0], "s", admin=hub.admin)
    assert sorted(sender.run_once()) == [(1, "retry"), (2, "failed")]
    assert (relay.sessions, relay.open) == (1, False)  # one session for the batch, closed
    assert sender.run_once() == []  # the retry is not due yet
    clock[0] = LATER + timedelta(minutes=2)
    Builder(archive, hub, lambda: world.directory, lambda: clock[0], "b").run_once()  # the alert
    states = dict(sender.run_once())
    assert states[1] == "sent"
    rows = _rows(archive)
    assert rows[f"receipt:{seq}"].state == "sent" and rows[f"receipt:{seq}"].attempts == 2
    assert rows[f"delivery:{seq}:H26.CATP"].state == "failed"
    assert rows[f"delivery:{seq}:H26.CATP"].last_reply == "550 5.1.1 no such user"
    refused = f"alert:outbound-refused:{local_day(LATER)}"  # the day's one alert of 5xx
    assert rows[refused].state == "sent"
    assert f"delivery:{seq}:H26.CATP" in rows[refused].detail["text"]
    assert relay.sent[-1][2] == (hub.admin,)
    with archive.db.session(read_only=True) as s:
        outcomes = [
            archive.log.entry(s, seq).fields
            for seq in range(archive.log.size(s))
            if archive.log.entry(s, seq).kind == "outcome"
        ]
    assert sorted((o["outbox"], o["status"]) for o in outcomes) == [
        (refused, "sent"),
        (f"delivery:{seq}:H26.CATP", "failed"),
        (f"receipt:{seq}", "sent"),
    ]


def test_sender_gives_up_after_the_configured_time(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    _receive(archive, world.submission("H26.SNV"))
    _process(archive, world_ctx, world.directory, dataclasses.replace(hub, admin=""))
    relay = _Relay(*[_Reply("retry", "421 4.4.2 timeout")] * 2)
    clock = [LATER + timedelta(hours=49)]
    sender = Sender(
        archive, relay.session, lambda: clock[0], "s", give_up_after=timedelta(hours=48)
    )
    assert sorted(sender.run_once()) == [(1, "failed"), (2, "failed")]


def test_a_row_the_relay_cannot_take_fails_and_the_rest_of_the_batch_is_sent(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """A defect of ours (a bare LF in a built message) fails that row, alerts the admin, and
    neither stops the sender nor holds up the other rows."""
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    with archive.db.session() as s:
        row = s.scalars(select(t.Outbox).where(t.Outbox.key == f"receipt:{seq}")).one()
        row.message = (row.message or b"").replace(b"\r\n", b"\n", 1)

    class Strict(_Relay):
        def deliver(self, message: bytes, *, mail_from: str, rcpt_to: Sequence[str]) -> _Reply:
            if message.count(b"\n") != message.count(b"\r\n"):
                raise ValueError("the message has a bare CR or LF")
            return super().deliver(message, mail_from=mail_from, rcpt_to=rcpt_to)

    relay = Strict(_Reply("sent", "250 ok"), _Reply("sent", "250 ok"))
    sender = Sender(archive, relay.session, lambda: LATER, "s", admin=hub.admin)
    assert sorted(sender.run_once()) == [(1, "failed"), (2, "sent")]
    rows = _rows(archive)
    assert "bare CR or LF" in (rows[f"receipt:{seq}"].last_reply or "")
    assert rows[f"delivery:{seq}:H26.CATP"].state == "sent"
    alert = rows[f"alert:outbound-unsendable:{local_day(LATER)}"]  # the day's one of those
    assert f"receipt:{seq}" in alert.detail["text"] and "bare CR or LF" in alert.detail["text"]


def test_a_run_sends_several_batches_over_one_session_and_leaves_no_row_claimed(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """Each batch's outcome is recorded in the transaction that claims the next; the last batch
    of a run claims nothing more, so no row waits out a lease."""
    for _ in range(3):
        _receive(archive, world.submission("H26.SNV"))
    _process(archive, world_ctx, world.directory, hub)  # a receipt and a delivery each: 6 rows
    relay = _Relay(*[_Reply("sent", "250 ok")] * 6)
    sender = Sender(archive, relay.session, lambda: LATER, "s", admin=hub.admin)
    assert sender.run_once(limit=2, batches=2) == [
        (1, "sent"),
        (2, "sent"),
        (3, "sent"),
        (4, "sent"),
    ]
    assert relay.sessions == 1
    states = {r.id: (r.state, r.worker) for r in _rows(archive).values()}
    assert states[5] == states[6] == ("ready", None)  # not claimed, not leased
    assert sender.run_once(limit=2, batches=2) == [(5, "sent"), (6, "sent")]
    assert relay.sessions == 2 and not relay.answers


def test_the_loops_back_off_doubling_to_their_cap_however_long_the_outage() -> None:
    """The wait of the worker, sender and IMAP loops after ``failures`` in a row: it once
    overflowed (``0.5 * 2**1025``) hours into an outage, ending the loop that waited."""
    waits = [outbound.pause(n, first=1.0, most=30.0) for n in (1, 2, 3, 5, 6, 1025, 10**6)]
    assert waits == [1.0, 2.0, 4.0, 16.0, 30.0, 30.0, 30.0]
