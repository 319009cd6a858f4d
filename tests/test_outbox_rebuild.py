"""A row built again (``gateway outbox retry --rebuild``, or a certificate no longer usable)
goes only to the agency's mailboxes of now that did not take an earlier build — and to nobody
when every one of them took it, the mailbox that lacked it having left the agency.

Against a real relay (aiosmtpd on loopback, as in tests/test_outbox_admin.py)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

import pytest

from archive.service import Archive
from formats.errors import InputError
from formats.vntime import local_day
from gateway import outbox_admin
from gateway.builder import Builder, Hub
from gateway.demo import DemoWorld
from gateway.pipeline import Context
from gateway.relay import Relay
from gateway.sender import Sender
from keys.directory import Directory
from tests.test_outbound import LATER, _rows
from tests.test_outbound_recipients import _enrol, _police, _retire_police_certificate
from tests.test_relay import Peer
from tests.test_sender import DUTY, POLICE, _police_with, _refused_by

NEW_DESK = "tiep-nhan@congan.hanoi.gov.vn"


def _requeue(archive: Archive, ids: list[int], at: Any, *, rebuild: bool) -> list[str]:
    with archive.db.session() as s:
        done = outbox_admin.requeue(s, ids, rebuild=rebuild, at=at, actor="admin")
    return [r.state for r in done]


def _build_all(builder: Builder) -> None:
    while builder.run_once():
        pass


def _to_police(handler: Peer) -> list[list[str]]:
    """The recipients of each message the relay took for a police mailbox."""
    police = {POLICE, DUTY, NEW_DESK}
    return [m.rcpt_tos for m in handler.received if police & set(m.rcpt_tos)]


def _outcomes(archive: Archive, key: str) -> list[dict[str, Any]]:
    with archive.db.session(read_only=True) as s:
        entries = [archive.log.entry(s, seq) for seq in range(archive.log.size(s))]
    return [dict(e.fields) for e in entries if e.kind == "outcome" and e.fields["outbox"] == key]


def _statuses(archive: Archive, key: str) -> dict[str, str]:
    recipients = _rows(archive)[key].detail.get("recipients", {})
    return {address: r["status"] for address, r in recipients.items()}


def _waiting_for_the_duty_desk(
    archive: Archive, world: DemoWorld, ctx: Context, hub: Hub, peer: tuple[Peer, Relay]
) -> tuple[str, list[datetime], Sender]:
    """The police's first mailbox took the delivery; the duty desk answered 450: the row waits
    to be retried for it alone. ``(its key, the clock, the sender)``."""
    key, clock, sender = _refused_by(
        archive, world, ctx, hub, peer, {DUTY: "450 4.2.1 mailbox busy"}
    )
    row = _rows(archive)[key]
    assert dict(sender.run_once())[row.id] == "retry"
    assert _rows(archive)[key].rcpt_to == [DUTY]
    return key, clock, sender


def test_a_rebuild_after_the_mailbox_that_lacked_it_left_sends_nobody_a_second_copy(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """The police had two mailboxes: the first took the delivery, the duty desk's refused it
    for good (550). The duty desk then closes: the admin removes its mailbox from the
    directory and runs `outbox retry --rebuild`. The police's one mailbox of now took the
    delivery already, so nothing is left to send: the row ends ``sent``, says why, and the
    first mailbox never gets it twice."""
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive, world, world_ctx, hub, peer, {DUTY: "550 5.1.1 no such user"}
    )
    row = _rows(archive)[key]
    assert dict(sender.run_once())[row.id] == "failed"
    assert _statuses(archive, key) == {POLICE: "sent", DUTY: "failed"}

    clock[0] = later = LATER + timedelta(days=1)
    assert _requeue(archive, [row.id], later, rebuild=True) == ["new"]
    # world.directory: the police with their first mailbox alone (the duty desk has left).
    _build_all(Builder(archive, hub, lambda: world.directory, lambda: clock[0], "b"))
    sender.run_once()
    assert _to_police(handler) == [[POLICE]]  # once, from the first build

    row = _rows(archive)[key]
    assert (row.state, row.message, row.rcpt_to) == ("sent", None, [])
    assert _statuses(archive, key) == {POLICE: "sent"}  # its 250 is kept
    reply = row.last_reply or ""
    assert "nothing left to send" in reply and POLICE in reply, reply
    assert f"{DUTY}, which lacked it, is no longer a mailbox of H26.CATP" in reply, reply
    assert row.detail["left_agency"] == [DUTY]
    first, last = _outcomes(archive, key)
    assert (first["status"], last["status"], last["reply"]) == ("failed", "sent", reply)
    with pytest.raises(InputError, match="is sent, not failed"):  # final: nothing to retry
        _requeue(archive, [row.id], later, rebuild=True)


def test_a_stale_build_whose_lacking_mailbox_left_is_not_sent_again_to_the_others(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """The same through the builder's own rebuild: the delivery waits to be retried for the
    duty desk (450) when the duty desk closes and the police roll their certificate over.
    Built again for the new certificate, it has nobody left to go to."""
    handler = peer[0]
    key, clock, sender = _waiting_for_the_duty_desk(archive, world, world_ctx, hub, peer)
    row = _rows(archive)[key]

    _enrol(archive, _police(world, "Police (2027)"))
    _retire_police_certificate(archive, world)
    clock[0] = LATER + timedelta(hours=2)  # past the retry's backoff
    builder = Builder(archive, hub, lambda: world.directory, lambda: clock[0], "b")
    assert builder.rebuild_stale() == [row.id]
    _build_all(builder)
    sender.run_once()
    assert _to_police(handler) == [[POLICE]]
    row = _rows(archive)[key]
    assert row.state == "sent" and "nothing left to send" in (row.last_reply or "")
    assert row.detail["left_agency"] == [DUTY]


def test_a_rebuild_goes_to_a_mailbox_that_joined_and_not_to_those_that_took_it(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """The duty desk closed and a new desk opened: the rebuild goes to the new desk alone."""
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive, world, world_ctx, hub, peer, {DUTY: "550 5.1.1 no such user"}
    )
    row = _rows(archive)[key]
    assert dict(sender.run_once())[row.id] == "failed"

    clock[0] = later = LATER + timedelta(days=1)
    assert _requeue(archive, [row.id], later, rebuild=True) == ["new"]
    now = _police_with(world, NEW_DESK)
    _build_all(Builder(archive, hub, lambda: now, lambda: clock[0], "b"))
    row = _rows(archive)[key]
    assert (row.state, row.rcpt_to) == ("ready", [NEW_DESK])
    assert "left_agency" not in row.detail
    assert dict(sender.run_once())[row.id] == "sent"
    assert _to_police(handler) == [[POLICE], [NEW_DESK]]
    assert _statuses(archive, key) == {POLICE: "sent", NEW_DESK: "sent"}


def test_a_delivery_waiting_for_a_mailbox_that_left_the_agency_is_not_sent_it(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """The delivery waits to be retried for the duty desk (450) when the duty desk closes (its
    mailbox removed from the directory; it may be someone else's by now). The builder's check
    takes the row back before the sender's next try: built again, it has nobody left to go
    to, and the old bytes never reach the duty desk."""
    handler = peer[0]
    key, clock, sender = _waiting_for_the_duty_desk(archive, world, world_ctx, hub, peer)
    row = _rows(archive)[key]

    clock[0] = LATER + timedelta(hours=2)  # past the retry's backoff
    # world.directory: the police with their first mailbox alone (the duty desk has left).
    builder = Builder(archive, hub, lambda: world.directory, lambda: clock[0], "b")
    assert builder.rebuild_stale() == [row.id]
    assert f"{DUTY}, no longer a mailbox of H26.CATP" in (_rows(archive)[key].last_reply or "")
    _build_all(builder)
    sender.run_once()
    assert _to_police(handler) == [[POLICE]]  # the first build only
    row = _rows(archive)[key]
    assert row.state == "sent" and "nothing left to send" in (row.last_reply or "")
    assert row.detail["left_agency"] == [DUTY]


def test_a_delivery_waiting_for_an_agency_no_longer_active_is_taken_back_and_fails(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """The police's directory entry ends (a merger: their mailboxes may be a successor's) while
    their delivery waits for a retry: it is not sent; built again, it fails saying why."""
    handler = peer[0]
    key, clock, sender = _waiting_for_the_duty_desk(archive, world, world_ctx, hub, peer)
    row = _rows(archive)[key]
    clock[0] = LATER + timedelta(days=2)
    ended = Directory.of(
        dataclasses.replace(a, valid_to=local_day(LATER)) if a.organ_id == "H26.CATP" else a
        for a in _police_with(world, DUTY)
    )
    builder = Builder(archive, hub, lambda: ended, lambda: clock[0], "b")
    assert builder.rebuild_stale() == [row.id]
    _build_all(builder)
    sender.run_once()
    assert _to_police(handler) == [[POLICE]]
    row = _rows(archive)[key]
    assert (row.state, row.message) == ("failed", None)
    assert "is not active on" in (row.last_reply or "")
