"""``gateway outbox retry``'s core: a failed row goes back, and only to those who lack it.

Against a real relay (aiosmtpd on loopback, as in tests/test_sender.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from archive import tables as t
from archive.service import Archive
from formats.errors import InputError
from gateway import outbox_admin
from gateway.demo import DemoWorld
from gateway.outbound import Builder, Hub
from gateway.pipeline import Context
from gateway.relay import Relay
from keys import store
from keys.issuing import issue_agency
from tests.conftest import WORLD_AT
from tests.test_outbound import LATER, _process, _receive, _rows
from tests.test_relay import Peer
from tests.test_sender import DUTY, POLICE, _delivery_to_police, _sender

ADMIN = "admin@cli"


def _requeue(archive: Archive, ids: list[int], at: Any, *, rebuild: bool = False) -> list[str]:
    with archive.db.session() as s:
        return [
            state
            for _row, state in outbox_admin.requeue(s, ids, rebuild=rebuild, at=at, actor=ADMIN)
        ]


def test_a_row_refused_by_one_mailbox_goes_again_to_that_mailbox_alone(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    handler, relay = peer
    key = _delivery_to_police(archive, world, world_ctx, hub, DUTY)
    handler.rcpt_replies[DUTY] = "550 5.1.1 no such user"
    clock = [LATER]
    sender = _sender(archive, relay, clock, hub)
    assert dict(sender.run_once())[2] == "failed"
    row = _rows(archive)[key]
    message = row.message

    # Days later (longer than the sender tries anything), the duty desk's mailbox exists.
    del handler.rcpt_replies[DUTY]
    clock[0] = later = LATER + timedelta(days=3)
    assert _requeue(archive, [row.id], later) == ["retry"]
    row = _rows(archive)[key]
    assert (row.state, row.rcpt_to, row.attempts, row.message) == ("retry", [DUTY], 0, message)
    handler.data_reply = "451 4.3.0 try later"  # counted from the requeue: not given up on
    assert sender.run_once() == [(row.id, "retry")]
    handler.data_reply = "250 2.0.0 queued"
    clock[0] = later + timedelta(minutes=1)
    assert sender.run_once() == [(row.id, "sent")]
    got = [m for m in handler.received if m.content == message]
    # refused at RCPT the first time; then 451 at DATA; then taken. The police only once.
    assert [m.rcpt_tos for m in got] == [[POLICE], [DUTY], [DUTY]]
    with archive.db.session(read_only=True) as s:
        [event] = s.scalars(select(t.AdminEvent).where(t.AdminEvent.action == "outbox-requeue"))
    assert (event.subject, event.actor, event.detail["state"]) == (key, ADMIN, "retry")


def test_a_row_never_built_is_built_again_once_the_agency_has_a_certificate(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    with archive.db.session() as s:
        for c in store.certificates(s, role="agency", organ_id="H26.CATP"):
            store.retire_certificate(s, c.sha256, at=WORLD_AT, actor="test")
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    key = f"delivery:{seq}:H26.CATP"
    row = _rows(archive)[key]
    assert (row.state, row.message) == ("failed", None)
    with pytest.raises(InputError, match="only a failed row"):
        _requeue(archive, [row.id, _rows(archive)[f"receipt:{seq}"].id], LATER)
    assert _rows(archive)[key].state == "failed"  # nothing changed

    renewed = issue_agency(
        world.root, email=POLICE, organ_id="H26.CATP", common_name="Police (new key)",
        at=WORLD_AT,
    )  # fmt: skip
    with archive.db.session() as s:  # the agency enrols a new certificate
        store.add_certificate(
            s, renewed.cert, role="agency", organ_id="H26.CATP", at=LATER, actor="test"
        )
    assert _requeue(archive, [row.id], LATER) == ["new"]
    Builder(archive, hub, lambda: world.directory, lambda: LATER, "b").run_once()
    row = _rows(archive)[key]
    assert row.state == "ready" and row.message is not None and row.rcpt_to == [POLICE]


def test_listing_shows_what_is_owed_newest_last(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, world_ctx, world.directory, hub)
    with archive.db.session(read_only=True) as s:
        pending = outbox_admin.listing(s)
        police = outbox_admin.listing(s, states=("ready",), kind="delivery", agency="H26.CATP")
        newest = outbox_admin.listing(s, limit=1)
    assert [(r.key, r.state) for r in pending] == [
        (f"receipt:{seq}", "ready"),
        (f"delivery:{seq}:H26.CATP", "ready"),
    ]
    assert [r.key for r in police] == [f"delivery:{seq}:H26.CATP"]
    assert [r.key for r in newest] == [f"delivery:{seq}:H26.CATP"]
    assert pending[1].as_dict()["rcpt_to"] == [POLICE]
