"""``gateway outbox retry``'s core: a failed row goes back, and only to those who lack it.

Against a real relay (aiosmtpd on loopback, as in tests/test_sender.py)."""

from __future__ import annotations

import sqlite3
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select

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
from tests.test_sender import DUTY, NIGHT, POLICE, _refused_by

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
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive, world, world_ctx, hub, peer, {DUTY: "550 5.1.1 no such user"}
    )
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


def test_a_mailbox_refused_for_good_while_another_was_retried_is_sent_it_again_too(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """Three police mailboxes: the first takes it, the duty desk is busy (450), the night desk
    does not exist yet (550). The row is retried for the duty desk alone, then given up on.
    Once both are fixed, a retry goes to both — and a retry after that (the night desk
    refusing again), and one with --rebuild, never to those that took it."""
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive,
        world,
        world_ctx,
        hub,
        peer,
        {DUTY: "450 4.2.1 mailbox busy", NIGHT: "550 5.1.1 no such user"},
        give_up_after=timedelta(hours=1),
    )
    row = _rows(archive)[key]
    assert dict(sender.run_once())[row.id] == "retry"  # (the receipt is sent too)
    assert _rows(archive)[key].rcpt_to == [DUTY]
    clock[0] = LATER + timedelta(hours=2)
    assert sender.run_once() == [(row.id, "failed")]

    handler.rcpt_replies.clear()
    handler.rcpt_replies[NIGHT] = "550 5.1.1 still no such user"
    clock[0] = later = LATER + timedelta(days=1)
    assert _requeue(archive, [row.id], later) == ["retry"]
    assert _rows(archive)[key].rcpt_to == [DUTY, NIGHT]
    assert sender.run_once() == [(row.id, "failed")]  # the night desk, again
    status = {a: r["status"] for a, r in _rows(archive)[key].detail["recipients"].items()}
    assert status == {POLICE: "sent", DUTY: "sent", NIGHT: "failed"}

    del handler.rcpt_replies[NIGHT]
    assert _requeue(archive, [row.id], later) == ["retry"]
    assert _rows(archive)[key].rcpt_to == [NIGHT]
    assert sender.run_once() == [(row.id, "sent")]
    taken = Counter(a for m in handler.received if m.content == row.message for a in m.rcpt_tos)
    assert taken == {POLICE: 1, DUTY: 1, NIGHT: 1}

    # Rebuilt by hand after all that: nobody is left to send it to, so nobody gets it twice.
    with archive.db.session() as s:
        s.get(t.Outbox, row.id).state = "failed"  # as if it had failed at the end
    assert _requeue(archive, [row.id], later, rebuild=True) == ["new"]
    kept = _rows(archive)[key].detail["recipients"]
    assert {a: r["status"] for a, r in kept.items()} == {
        POLICE: "sent",
        DUTY: "sent",
        NIGHT: "sent",
    }


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


def test_a_receipt_sent_again_to_a_duplicate_is_listed_under_its_agency(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """A duplicate arriving later, and one arriving in the same batch as its original: each
    resend row names the agency it goes to (`outbox list --agency`, `retry --failed
    --agency` find it)."""
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    seq = _process(archive, world_ctx, world.directory, hub)
    _receive(archive, raw)  # later
    twin = world.submission("H26.SNV", number=2)
    _receive(archive, twin)
    _receive(archive, twin)  # in the same batch as its original
    _process(archive, world_ctx, world.directory, hub)
    with archive.db.session(read_only=True) as s:
        snv = outbox_admin.listing(s, states=outbox_admin.STATES, agency="H26.SNV")
    resends = [r for r in snv if r.kind == "resend"]
    assert len(resends) == 2, [(r.key, r.organ_id) for r in snv]
    assert {r.organ_id for r in resends} == {"H26.SNV"}
    assert {r.key.split(":")[0] for r in snv} == {"receipt", "resend"}
    assert f"receipt:{seq}" in {r.key for r in snv}


def test_more_failed_rows_than_the_database_takes_parameters_are_requeued(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`outbox retry --failed` after a long outage: more ids than SQLite's smallest bound on
    parameters (999, set here on the connection) are read in chunks, not one IN (…)."""
    n = 1200
    with archive.db.session() as s:
        s.execute(
            insert(t.Outbox),
            [
                {"key": f"alert:test-{i}", "kind": "alert", "state": "failed",
                 "created_at": LATER, "updated_at": LATER, "next_attempt_at": LATER,
                 "attempts": 3, "detail": {"text": "x"}}
                for i in range(n)
            ],
        )  # fmt: skip

    @event.listens_for(archive.db.engine, "connect")
    def few_parameters(dbapi: sqlite3.Connection, _record: object) -> None:
        dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    archive.db.engine.dispose()  # new connections, with the bound
    with archive.db.session(read_only=True) as s:
        ids = outbox_admin.failed_ids(s)
    assert len(ids) == n
    assert set(_requeue(archive, ids, LATER)) == {"new"}
    with archive.db.session(read_only=True) as s:
        assert s.scalar(select(func.count()).where(t.Outbox.state == "new")) == n
