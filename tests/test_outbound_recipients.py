"""Who the builder encrypts to and delivers to: only certificates the hub can encrypt to and no
stored evidence says are revoked, only agencies active today; and a row it cannot build fails
alone, with an alert, while the rest of the batch goes on.

Deliveries are opened with ``openssl cms`` as the agency would (:func:`tests.test_outbound._open_as`).
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from sqlalchemy import select

from archive import tables as t
from archive.service import Archive
from gateway import builder as builder_mod
from gateway.builder import Builder, Hub
from gateway.demo import DemoWorld
from gateway.outbound import ENCRYPTED_TO
from gateway.outbox_admin import requeue
from gateway.pipeline import Context
from gateway.sender import Sender
from gateway.worker import Worker
from keys import evidence, store
from keys.directory import Agency, Directory
from keys.issuing import Issued, issue_agency, make_crl
from tests import pg
from tests.conftest import WORLD_AT
from tests.outbox_world import make_archive, make_hub
from tests.test_outbound import (
    LATER,
    _open_as,
    _process,
    _receive,
    _Relay,
    _Reply,
    _rows,
    agency_alert,
)

pytestmark = pytest.mark.skipif(
    subprocess.run(["openssl", "version"], capture_output=True, check=False).returncode != 0,
    reason="openssl is not installed",
)

POLICE = "pa08@congan.hanoi.gov.vn"


def _police(world: DemoWorld, name: str, **options: object) -> Issued:
    """Another certificate for the police (a rollover), from the demo's CA."""
    return issue_agency(
        world.root, email=POLICE, organ_id="H26.CATP", common_name=name,
        at=WORLD_AT - timedelta(days=10), **options,  # type: ignore[arg-type]
    )  # fmt: skip


def _enrol(archive: Archive, *issued: Issued) -> None:
    with archive.db.session() as s:
        for one in issued:
            store.add_certificate(
                s, one.cert, role="agency", organ_id="H26.CATP", at=WORLD_AT, actor="test"
            )


def _retire_police_certificate(archive: Archive, world: DemoWorld) -> None:
    with archive.db.session() as s:
        store.retire_certificate(
            s, store.fingerprint(world.agencies["H26.CATP"].cert), at=WORLD_AT, actor="test"
        )


def _openssl_opens(message: bytes, issued: Issued, tmp_path: Path) -> bool:
    (tmp_path / "m.eml").write_bytes(message)
    (tmp_path / "c.pem").write_bytes(issued.cert_pem())
    (tmp_path / "k.pem").write_bytes(issued.key_pem())
    done = subprocess.run(
        ["openssl", "cms", "-decrypt", "-in", tmp_path / "m.eml", "-recip", tmp_path / "c.pem",
         "-inkey", tmp_path / "k.pem"], capture_output=True, check=False,
    )  # fmt: skip
    return done.returncode == 0


# --- certificates the hub can encrypt to --------------------------------------------------------


def test_an_ec_certificate_next_to_an_rsa_one_gets_the_delivery_too(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """The police enrolled an EC-P256 certificate next to their RSA one: the delivery is
    encrypted to both (ECDH key agreement for the EC one), and openssl opens it with either
    key."""
    ec_police = _police(world, "Police (EC)", key_kind="ec-p256")
    _enrol(archive, ec_police)
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    assert {k: r.state for k, r in rows.items()} == {
        f"receipt:{seq}": "ready",
        f"delivery:{seq}:H26.CATP": "ready",
    }
    message = rows[f"delivery:{seq}:H26.CATP"].message
    assert message is not None
    _open_as(message, world, "H26.CATP", tmp_path)
    assert _openssl_opens(message, ec_police, tmp_path)


@pytest.mark.parametrize("key_kind", ["ec-p256", "ec-p384"])
def test_an_agency_with_only_an_ec_certificate_gets_its_delivery(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    tmp_path: Path,
    key_kind: Literal["ec-p256", "ec-p384"],
) -> None:
    """An agency whose only encryption certificate is EC got nothing: its deliveries failed
    ("the hub encrypts to RSA keys only"). openssl opens it with the EC key, not with the
    retired RSA one."""
    ec_police = _police(world, "Police (EC)", key_kind=key_kind)
    _enrol(archive, ec_police)
    _retire_police_certificate(archive, world)
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    delivery = rows[f"delivery:{seq}:H26.CATP"]
    assert delivery.state == "ready" and delivery.message is not None, delivery.last_reply
    assert not any(k.startswith("alert:") for k in rows)
    assert _openssl_opens(delivery.message, ec_police, tmp_path)
    assert not _openssl_opens(delivery.message, world.agencies["H26.CATP"], tmp_path)


def test_a_signing_only_ec_certificate_is_left_out(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """RFC 8550 §4.4.2: key agreement needs keyAgreement in the keyUsage."""
    _enrol(archive, _police(world, "Police (EC, sign)", key_kind="ec-p256", key_usage="sign"))
    _retire_police_certificate(archive, world)
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    assert rows[f"receipt:{seq}"].state == "ready"  # the sender is not held up
    failed = rows[f"delivery:{seq}:H26.CATP"]
    assert failed.state == "failed"
    assert "does not allow keyAgreement" in (failed.last_reply or "")
    assert agency_alert(rows, "H26.CATP").state == "ready"


# --- revoked certificates -----------------------------------------------------------------------


def test_a_certificate_a_stored_crl_revokes_is_never_encrypted_to(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """The police's new certificate was revoked (a stolen laptop) and the admin imported the
    CRL: deliveries go to their other certificate only, and with none left they fail."""
    lost = _police(world, "Police (stolen laptop)")
    crl = make_crl(
        world.root, revoked=[(lost.cert.serial_number, WORLD_AT - timedelta(days=1))],
        this_update=WORLD_AT - timedelta(hours=1), next_update=WORLD_AT + timedelta(days=7),
        number=2,
    )  # fmt: skip
    _enrol(archive, lost)
    with archive.db.session() as s:
        store.add_certificate(s, world.root.cert, role="anchor", at=WORLD_AT, actor="test")
        evidence.add_crl(s, crl, source="test", at=WORLD_AT, actor="test")
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    delivery = _rows(archive)[f"delivery:{seq}:H26.CATP"]
    assert delivery.state == "ready" and delivery.message is not None
    assert _openssl_opens(delivery.message, world.agencies["H26.CATP"], tmp_path)
    assert not _openssl_opens(delivery.message, lost, tmp_path)

    _retire_police_certificate(archive, world)  # only the revoked one is left
    _receive(archive, world.submission("H26.SNV", number=2))
    seq = _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    failed = rows[f"delivery:{seq}:H26.CATP"]
    assert failed.state == "failed" and failed.message is None
    assert "was revoked on" in (failed.last_reply or "")
    assert "was revoked on" in agency_alert(rows, "H26.CATP").detail["text"]


def test_a_revoked_certificate_stays_out_once_its_crl_is_past_its_next_update(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """No newer CRL was imported and the one that revokes the police's certificate is past
    its next update: it no longer says what is current, but still proves the revocation. A
    failed delivery sent again by hand a week later fails again; it is not encrypted to the
    revoked key."""
    _revoke_on_a_crl(archive, world, world.agencies["H26.CATP"])  # next update WORLD_AT + 7 d
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    key = f"delivery:{seq}:H26.CATP"
    row = _rows(archive)[key]
    assert row.state == "failed" and "was revoked on" in (row.last_reply or "")
    stale = WORLD_AT + timedelta(days=8)
    with archive.db.session() as s:
        requeue(s, [row.id], rebuild=False, at=stale, actor="admin")
    builder = Builder(archive, hub, lambda: world.directory, lambda: stale, "b")
    while builder.run_once():
        pass
    row = _rows(archive)[key]
    assert row.state == "failed" and row.message is None
    assert "was revoked on" in (row.last_reply or "")
    with archive.db.session(read_only=True) as s:
        trust = evidence.trust_store(s, revocation_mode="soft-fail")
        police = store.encryption_certificates(s, "H26.CATP", stale, trust=trust)
    assert police.usable == () and "was revoked on" in police.left_out[0]


def test_a_message_waiting_for_the_relay_is_built_again_when_its_certificate_is_retired(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """The relay was down while the police rolled their certificate over and the admin retired
    the old one: the delivery waiting for a retry is not sent encrypted to the retired
    certificate, but built again for the new one. The receipt to Home Affairs, whose
    certificate did not change, waits as it was."""
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    old = world.agencies["H26.CATP"]
    rows = _rows(archive)
    assert rows[f"delivery:{seq}:H26.CATP"].detail[ENCRYPTED_TO] == [store.fingerprint(old.cert)]
    down = _Relay(_Reply("retry", "451 4.3.0 try later"), _Reply("retry", "451 4.3.0 try later"))
    assert sorted(Sender(archive, down.session, lambda: LATER, "s").run_once()) == [
        (1, "retry"),
        (2, "retry"),
    ]
    receipt_before = _rows(archive)[f"receipt:{seq}"].message

    new = _police(world, "Police (2027)")
    _enrol(archive, new)
    _retire_police_certificate(archive, world)
    later = LATER + timedelta(minutes=10)
    builder = Builder(archive, hub, lambda: world.directory, lambda: later, "b")
    assert builder.run_once() == 1  # the delivery, built again
    rows = _rows(archive)
    delivery = rows[f"delivery:{seq}:H26.CATP"]
    assert delivery.state == "ready" and delivery.message is not None
    assert delivery.detail[ENCRYPTED_TO] == [store.fingerprint(new.cert)]
    assert "no longer usable" in (delivery.last_reply or "")
    assert _openssl_opens(delivery.message, new, tmp_path)
    assert not _openssl_opens(delivery.message, old, tmp_path)
    receipt = rows[f"receipt:{seq}"]
    assert (receipt.state, receipt.message) == ("retry", receipt_before)
    assert builder.rebuild_stale() == []  # built for what is usable now: nothing more to do


def test_a_delivery_built_again_goes_only_to_the_mailboxes_that_did_not_take_it(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """The police have two mailboxes: one took the delivery, the other answered 451. The
    certificate is then retired: the delivery is built again for the new one and goes to the
    second mailbox only; the first one's 250 is kept."""
    police = world.directory.get("H26.CATP")
    assert police is not None
    second = "so2@catp.hanoi.gov.vn"
    two = dataclasses.replace(police, emails=frozenset({*police.emails, second}))
    directory = Directory.of([two if a.organ_id == "H26.CATP" else a for a in world.directory])
    ctx = dataclasses.replace(world_ctx, directory=directory)
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, ctx, directory, hub)
    key = f"delivery:{seq}:H26.CATP"
    relay = _Relay(
        _Reply("sent", "250 ok"), _Reply("sent", "250 ok", refused={second: "451 4.2.1 later"})
    )
    Sender(archive, relay.session, lambda: LATER, "s").run_once()
    assert _rows(archive)[key].rcpt_to == [second]
    _enrol(archive, _police(world, "Police (2027)"))
    _retire_police_certificate(archive, world)
    later = LATER + timedelta(minutes=10)
    assert Builder(archive, hub, lambda: directory, lambda: later, "b").run_once() == 1
    row = _rows(archive)[key]
    assert (row.state, row.rcpt_to) == ("ready", [second])
    assert row.detail["recipients"][POLICE]["status"] == "sent"
    done = _Relay(_Reply("sent", "250 ok"))
    assert Sender(archive, done.session, lambda: later, "s").run_once() == [(row.id, "sent")]
    assert [to for _, _, to in done.sent] == [(second,)]


def test_a_failed_delivery_sent_again_by_hand_is_built_again_if_its_certificate_went(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """`gateway outbox retry` (without --rebuild) sends the same bytes again, unless a
    certificate they are encrypted to is no longer usable: then the row is built again, and
    the old bytes never reach the relay."""
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    key = f"delivery:{seq}:H26.CATP"
    relay = _Relay(_Reply("sent", "250 ok"), _Reply("failed", "550 5.2.2 mailbox full"))
    Sender(archive, relay.session, lambda: LATER, "s").run_once()
    new = _police(world, "Police (2027)")
    _enrol(archive, new)
    _retire_police_certificate(archive, world)
    later = LATER + timedelta(hours=1)
    row = _rows(archive)[key]
    with archive.db.session() as s:
        assert [r.state for r in requeue(s, [row.id], rebuild=False, at=later, actor="a")] == [
            "new"
        ]
    assert Sender(archive, _Relay().session, lambda: later, "s").run_once() == []  # nothing ready
    assert Builder(archive, hub, lambda: world.directory, lambda: later, "b").run_once() >= 1
    again = _Relay(_Reply("sent", "250 ok"))
    Sender(archive, again.session, lambda: later, "s").run_once()
    [(message, _, _)] = again.sent
    assert _openssl_opens(message, new, tmp_path)
    assert not _openssl_opens(message, world.agencies["H26.CATP"], tmp_path)


def test_a_row_the_stale_check_fails_on_does_not_stop_the_others(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for n in (1, 2):
        _receive(archive, world.submission("H26.SNV", number=n))
    _process(archive, world_ctx, world.directory, hub)
    _enrol(archive, _police(world, "Police (2027)"))
    _retire_police_certificate(archive, world)
    real, calls = Builder._targets, []

    def first_fails(self: Builder, s: Any, kind: str, *args: Any) -> set[str]:
        if kind == "delivery" and not calls:  # the first delivery looked at
            calls.append(1)
            raise RuntimeError("a defect")
        return real(self, s, kind, *args)

    monkeypatch.setattr(Builder, "_targets", first_fails)
    later = LATER + timedelta(minutes=10)
    builder = Builder(archive, hub, lambda: world.directory, lambda: later, "b")
    rebuilt = builder.rebuild_stale()
    deliveries = [r for k, r in _rows(archive).items() if k.startswith("delivery:")]
    assert len(deliveries) == 2 and len(rebuilt) == 1
    assert "cannot tell what it would be encrypted to" in caplog.text


def _revoke_on_a_crl(archive: Archive, world: DemoWorld, issued: Issued) -> None:
    """The demo CA revokes ``issued`` (two hours before the world's moment); the admin imports
    the CRL."""
    crl = make_crl(
        world.root, revoked=[(issued.cert.serial_number, WORLD_AT - timedelta(hours=2))],
        this_update=WORLD_AT - timedelta(hours=1), next_update=WORLD_AT + timedelta(days=7),
        number=2,
    )  # fmt: skip
    with archive.db.session() as s:
        store.add_certificate(s, world.root.cert, role="anchor", at=WORLD_AT, actor="test")
        evidence.add_crl(s, crl, source="test", at=WORLD_AT, actor="test")


def test_a_receipt_to_the_signers_certificate_is_not_sent_once_that_is_revoked(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """Home Affairs has no enrolled certificate, so its receipt is encrypted to the one that
    signed the message. That certificate is revoked before the relay took the receipt: the
    receipt is taken back and, with no certificate left to encrypt to, fails with an alert."""
    snv = world.agencies["H26.SNV"]
    with archive.db.session() as s:
        store.retire_certificate(s, store.fingerprint(snv.cert), at=WORLD_AT, actor="test")
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    receipt = _rows(archive)[f"receipt:{seq}"]
    assert receipt.detail[ENCRYPTED_TO] == [store.fingerprint(snv.cert)]
    later = LATER + timedelta(minutes=10)
    builder = Builder(archive, hub, lambda: world.directory, lambda: later, "b")
    assert builder.rebuild_stale() == []  # still the certificate it would use now
    _revoke_on_a_crl(archive, world, snv)
    builder = Builder(archive, hub, lambda: world.directory, lambda: later, "b")
    assert builder.rebuild_stale() == [receipt.id]
    while builder.run_once():
        pass
    receipt = _rows(archive)[f"receipt:{seq}"]
    assert (receipt.state, receipt.message) == ("failed", None)
    assert "no usable encryption certificate" in (receipt.last_reply or "")


def test_a_receipt_waiting_for_the_relay_is_built_again_once_its_certificate_expires(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """The relay is down past the expiry of Home Affairs' certificate. Its enrolled
    certificate is then no longer current, and the one that signed the message (a receipt's
    fallback) is that same expired certificate: the waiting receipt is taken back, like the
    delivery to the police, and fails, naming the expiry."""
    snv = world.agencies["H26.SNV"]
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    relay = _Relay(_Reply("retry", "451 4.3.0 later"), _Reply("retry", "451 4.3.0 later"))
    Sender(archive, relay.session, lambda: LATER, "s").run_once()
    rows = _rows(archive)
    receipt = rows[f"receipt:{seq}"]
    assert receipt.state == "retry"
    after = snv.cert.not_valid_after_utc + timedelta(hours=1)
    builder = Builder(archive, hub, lambda: world.directory, lambda: after, "b")
    assert receipt.id in builder.rebuild_stale()
    while builder.run_once():
        pass
    receipt = _rows(archive)[f"receipt:{seq}"]
    assert (receipt.state, receipt.message) == ("failed", None)
    assert "expired on" in (receipt.last_reply or "")


def test_a_duplicate_after_a_revocation_does_not_get_the_receipt_encrypted_to_it(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """A duplicate gets the original receipt again, the same bytes, unless a certificate those
    bytes are encrypted to is no longer usable: then the receipt is built anew, and here, with
    no certificate left, the resend fails instead of going out to the revoked key."""
    snv = world.agencies["H26.SNV"]
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    seq = _process(archive, world_ctx, world.directory, hub)
    _revoke_on_a_crl(archive, world, snv)
    _receive(archive, raw)
    _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    [again] = [r for k, r in rows.items() if k.startswith("resend:")]
    assert (again.state, again.message) == ("failed", None)
    # The waiting receipt was taken back too (its key revoked) and could not be built again.
    assert rows[f"receipt:{seq}"].state == "failed"
    assert f"the receipt for entry {seq} could not be built" in (again.last_reply or "")


def test_a_duplicate_after_a_receipt_sent_again_by_hand_failed_to_build_gets_no_old_bytes(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """The relay refused the receipt; Home Affairs' certificate is then revoked, and the admin
    sends the receipt again: it is built again and fails (no certificate left). A duplicate
    arriving next must not get the first build's bytes, encrypted to the revoked key."""
    snv = world.agencies["H26.SNV"]
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    seq = _process(archive, world_ctx, world.directory, hub)
    relay = _Relay(_Reply("failed", "550 5.7.1 refused"), _Reply("sent", "250 ok"))
    Sender(archive, relay.session, lambda: LATER, "s").run_once()
    receipt = _rows(archive)[f"receipt:{seq}"]
    assert receipt.state == "failed" and receipt.entry_seq is not None
    _revoke_on_a_crl(archive, world, snv)
    later = LATER + timedelta(minutes=10)
    with archive.db.session() as s:
        [done] = requeue(s, [receipt.id], rebuild=False, at=later, actor="admin")
    assert done.state == "new"  # its certificate is revoked: built again, not resent
    assert _rows(archive)[f"receipt:{seq}"].entry_seq is None
    builder = Builder(archive, hub, lambda: world.directory, lambda: later, "b")
    while builder.run_once():
        pass
    assert _rows(archive)[f"receipt:{seq}"].state == "failed"
    _receive(archive, raw)
    _process(archive, world_ctx, world.directory, hub)
    [again] = [r for k, r in _rows(archive).items() if k.startswith("resend:")]
    assert (again.state, again.message) == ("failed", None)
    assert "no usable encryption certificate" in (again.last_reply or "")


def test_duplicates_of_a_message_whose_receipt_failed_are_one_alert_a_day(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """Home Affairs' mail client sends the same message again and again, and its receipt
    cannot be built (its certificate revoked): the admin gets the agency's alert of the day,
    not one more alert for each duplicate."""
    snv = world.agencies["H26.SNV"]
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    Worker(archive, lambda: world_ctx, clock=lambda: LATER, name="w").run_once()
    _revoke_on_a_crl(archive, world, snv)  # before the receipt is built
    builder = Builder(archive, hub, lambda: world.directory, lambda: LATER, "b")
    while builder.run_once():
        pass
    for _ in range(3):
        _receive(archive, raw)
        _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    resends = [r for k, r in rows.items() if k.startswith("resend:")]
    assert [r.state for r in resends] == ["failed"] * 3
    assert all("could not be built: agency H26.SNV" in (r.last_reply or "") for r in resends)
    assert [k for k in rows if k.startswith("alert:")] == [agency_alert(rows, "H26.SNV").key]


def test_a_duplicate_gets_a_receipt_built_anew_for_the_new_certificate(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, tmp_path: Path
) -> None:
    """The same, after a rollover: the resend is a receipt built anew for the certificate of
    now, kept in the archive with the resend."""
    police_like = issue_agency(
        world.root, email="vanthu@snv.hanoi.gov.vn", organ_id="H26.SNV",
        common_name="Home Affairs (2027)", at=WORLD_AT - timedelta(days=10),
    )  # fmt: skip
    snv = world.agencies["H26.SNV"]
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    seq = _process(archive, world_ctx, world.directory, hub)
    relay = _Relay(_Reply("sent", "250 ok"), _Reply("sent", "250 ok"))
    assert dict(Sender(archive, relay.session, lambda: LATER, "s").run_once()) == {
        1: "sent",
        2: "sent",
    }
    with archive.db.session() as s:
        store.add_certificate(
            s, police_like.cert, role="agency", organ_id="H26.SNV", at=WORLD_AT, actor="test"
        )
        store.retire_certificate(s, store.fingerprint(snv.cert), at=WORLD_AT, actor="test")
    _receive(archive, raw)
    _process(archive, world_ctx, world.directory, hub)
    rows = _rows(archive)
    [again] = [r for k, r in rows.items() if k.startswith("resend:")]
    assert again.state == "ready" and again.message is not None
    assert again.message != rows[f"receipt:{seq}"].message
    assert again.detail[ENCRYPTED_TO] == [store.fingerprint(police_like.cert)]
    assert _openssl_opens(again.message, police_like, tmp_path)
    assert not _openssl_opens(again.message, snv, tmp_path)
    with archive.db.session(read_only=True) as s:
        entry = archive.log.entry(s, again.entry_seq or 0)
        assert (entry.kind, entry.fields["for_seq"]) == ("resend", seq)
        assert archive.blobs.get(s, entry.blobs["receipt"]) == again.message


@pytest.mark.postgres
def test_a_rebuild_never_takes_a_row_the_sender_is_claiming_on_postgresql(
    pg_cluster: pg.PgCluster,
    world: DemoWorld,
    world_ctx: Context,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On PostgreSQL the sender claims while the builder takes stale rows back. The sender's
    claim comes in the middle of the builder's transaction (here: when it logs its first
    rebuild). The builder holds the rows it takes, so the sender passes over them and sends
    nothing encrypted to the retired key. The row ends as the builder left it (``new``), not
    half the sender's."""
    name = pg_cluster.create_database("rebuild_race")
    archive = make_archive(pg_cluster.url(name), world)
    hub = make_hub(world)
    try:
        _receive(archive, world.submission("H26.SNV"))
        seq = _process(archive, world_ctx, world.directory, hub)
        _enrol(archive, _police(world, "Police (2027)"))
        _retire_police_certificate(archive, world)
        now = LATER + timedelta(minutes=10)
        relay = _Relay(_Reply("sent", "250 ok"), _Reply("sent", "250 ok"))
        sender = Sender(archive, relay.session, lambda: now, "sender")
        recorded: list[tuple[int, str]] = []
        warning = builder_mod.log.warning

        def sender_claims_now(*args: Any, **kwargs: Any) -> None:
            if not recorded:
                recorded.extend(sender.run_once())
            warning(*args, **kwargs)

        monkeypatch.setattr(builder_mod.log, "warning", sender_claims_now)
        builder = Builder(archive, hub, lambda: world.directory, lambda: now, "b")
        assert len(builder.rebuild_stale()) == 1
        old = world.agencies["H26.CATP"]
        assert recorded == [(1, "sent")]  # the receipt only
        assert not any(_openssl_opens(m, old, tmp_path) for m, _, _ in relay.sent)
        delivery = _rows(archive)[f"delivery:{seq}:H26.CATP"]
        assert (delivery.state, delivery.worker, delivery.message) == ("new", None, None)
    finally:
        archive.db.dispose()
        pg_cluster.drop_database(name)


# --- agencies no longer active ------------------------------------------------------------------


def test_a_delivery_to_an_agency_no_longer_active_fails_and_alerts_the_admin(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """The police were merged away (30 days before the build) and their mailbox handed on to
    the successor after the payload to them was accepted: their delivery is not sent to that
    mailbox. (A payload addressed to an agency not active when it arrives is rejected:
    tests/test_pipeline.py.)"""
    police = world.directory.get("H26.CATP")
    assert police is not None
    gone = dataclasses.replace(police, valid_to=WORLD_AT.date() - timedelta(days=30))
    successor = Agency(
        "H26.CAHN2", "Công an thành phố (mới)", "City Police (successor)", police.emails,
        valid_from=WORLD_AT.date() - timedelta(days=29),
    )  # fmt: skip
    directory = Directory.of(
        [gone if a.organ_id == "H26.CATP" else a for a in world.directory] + [successor]
    )
    _receive(archive, world.submission("H26.SNV"))  # addressed to H26.CATP
    seq = _process(archive, world_ctx, directory, hub)  # accepted; then the merger is entered
    rows = _rows(archive)
    failed = rows[f"delivery:{seq}:H26.CATP"]
    assert (failed.state, failed.message, failed.rcpt_to) == ("failed", None, None)
    assert f"ended on {gone.valid_to}" in (failed.last_reply or "")
    assert "not active" in agency_alert(rows, "H26.CATP").detail["text"]
    assert rows[f"receipt:{seq}"].state == "ready"


# --- one row that cannot be built ---------------------------------------------------------------


def test_a_row_the_builder_fails_on_fails_alone_and_the_batch_goes_on(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A defect (here: a delivery row pointing at a log entry that is not a message, so its
    signed entity is missing) fails that row with an alert; the rows around it are built."""
    _receive(archive, world.submission("H26.SNV"))
    [filed] = Worker(archive, lambda: world_ctx, clock=lambda: LATER, name="w").run_once()
    seq = filed.archive_seq
    poison = {"key": "delivery:0:H26.CATP", "kind": "delivery", "for_seq": 0, "detail": {}}
    with archive.db.session() as s:
        s.add(
            t.Outbox(**poison, organ_id="H26.CATP", state="new", created_at=LATER, updated_at=LATER)
        )
    with caplog.at_level(logging.ERROR, logger="gateway.outbound"):
        Builder(archive, hub, lambda: world.directory, lambda: LATER, "b").run_once()
    rows = _rows(archive)
    bad = rows["delivery:0:H26.CATP"]
    assert bad.state == "failed" and "KeyError" in (bad.last_reply or "")
    assert rows["alert:delivery:0:H26.CATP"].state == "new"  # built in the next run
    assert rows[f"receipt:{seq}"].state == rows[f"delivery:{seq}:H26.CATP"].state == "ready"
    [logged] = [r for r in caplog.records if r.exc_info]
    assert logged.exc_info is not None and logged.exc_info[0] is KeyError
    with archive.db.session(read_only=True) as s:
        assert not s.scalars(select(t.Outbox).where(t.Outbox.state == "building")).all()
