"""``gateway outbox retry``'s core: a failed row goes back, and only to those who lack it —
of an agency's mailboxes, only to those it still has.

Against a real relay (aiosmtpd on loopback, as in tests/test_sender.py)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select

from archive import tables as t
from archive.db import Database
from archive.service import Archive
from formats.errors import InputError
from gateway import outbox_admin
from gateway.builder import Builder, Hub
from gateway.demo import DemoWorld
from gateway.pipeline import Context
from gateway.relay import Relay
from keys import store
from keys.directory import Directory
from keys.issuing import issue_agency
from tests.conftest import WORLD_AT
from tests.test_cli import gateway
from tests.test_outbound import LATER, _process, _receive, _rows
from tests.test_outbox_rebuild import _statuses
from tests.test_relay import Peer
from tests.test_sender import (
    DUTY,
    NIGHT,
    POLICE,
    _police_with,
    _refused_by,
    refused_alert,
)

ADMIN = "admin@cli"


def _requeue(
    archive: Archive,
    ids: list[int],
    at: Any,
    *,
    rebuild: bool = False,
    directory: Directory | None = None,
) -> list[str]:
    """Requeue ``ids``; ``directory``: the agencies of now (default: those stored)."""
    return [r.state for r in _requeued(archive, ids, at, rebuild=rebuild, directory=directory)]


def _requeued(
    archive: Archive,
    ids: list[int],
    at: Any,
    *,
    rebuild: bool = False,
    directory: Directory | None = None,
) -> list[outbox_admin.Requeued]:
    with archive.db.session() as s:
        return outbox_admin.requeue(
            s, ids, rebuild=rebuild, at=at, actor=ADMIN, directory=directory
        )


def _events(archive: Archive) -> list[t.AdminEvent]:
    with archive.db.session(read_only=True) as s:
        events = list(
            s.scalars(select(t.AdminEvent).where(t.AdminEvent.action == "outbox-requeue"))
        )
        s.expunge_all()
    return events


def _outcomes(archive: Archive, key: str) -> list[dict[str, Any]]:
    with archive.db.session(read_only=True) as s:
        entries = [archive.log.entry(s, seq) for seq in range(archive.log.size(s))]
    return [dict(e.fields) for e in entries if e.kind == "outcome" and e.fields["outbox"] == key]


def _to_police(handler: Peer) -> list[list[str]]:
    """The recipients of each message the relay took for a police mailbox."""
    police = {POLICE, DUTY, NIGHT}
    return [m.rcpt_tos for m in handler.received if police & set(m.rcpt_tos)]


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
    assert _requeue(archive, [row.id], later, directory=_police_with(world, DUTY)) == ["retry"]
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
    both = _police_with(world, DUTY, NIGHT)
    assert _requeue(archive, [row.id], later, directory=both) == ["retry"]
    assert _rows(archive)[key].rcpt_to == [DUTY, NIGHT]
    assert sender.run_once() == [(row.id, "failed")]  # the night desk, again
    status = {a: r["status"] for a, r in _rows(archive)[key].detail["recipients"].items()}
    assert status == {POLICE: "sent", DUTY: "sent", NIGHT: "failed"}

    del handler.rcpt_replies[NIGHT]
    assert _requeue(archive, [row.id], later, directory=both) == ["retry"]
    assert _rows(archive)[key].rcpt_to == [NIGHT]
    assert sender.run_once() == [(row.id, "sent")]
    taken = Counter(a for m in handler.received if m.content == row.message for a in m.rcpt_tos)
    assert taken == {POLICE: 1, DUTY: 1, NIGHT: 1}

    # Rebuilt by hand after all that: nobody is left to send it to, so nobody gets it twice.
    with archive.db.session() as s:
        s.get(t.Outbox, row.id).state = "failed"  # as if it had failed at the end
    assert _requeue(archive, [row.id], later, rebuild=True, directory=both) == ["new"]
    kept = _rows(archive)[key].detail["recipients"]
    assert {a: r["status"] for a, r in kept.items()} == {
        POLICE: "sent",
        DUTY: "sent",
        NIGHT: "sent",
    }


def test_a_retry_goes_only_to_the_mailboxes_the_agency_still_has(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """Three police mailboxes: the first takes the delivery, the duty and night desks refuse it
    for good (550). The night desk then closes (its mailbox removed from the directory) and
    the duty desk's opens: `outbox retry` sends the same bytes to the duty desk alone, never
    to the night desk's mailbox, which may be someone else's by now."""
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive,
        world,
        world_ctx,
        hub,
        peer,
        {DUTY: "550 5.1.1 no such user", NIGHT: "550 5.1.1 no such user"},
    )
    row = _rows(archive)[key]
    assert dict(sender.run_once())[row.id] == "failed"
    message = _rows(archive)[key].message

    handler.rcpt_replies.clear()  # the relay would take the night desk's too
    clock[0] = later = LATER + timedelta(days=1)
    duty_left = _police_with(world, DUTY)  # the night desk has left the police
    [done] = _requeued(archive, [row.id], later, directory=duty_left)
    assert (done.state, done.left_agency) == ("retry", (NIGHT,))
    assert (done.was.id, done.was.state) == (row.id, "failed")
    assert _rows(archive)[key].rcpt_to == [DUTY]
    assert sender.run_once() == [(row.id, "sent")]
    assert [m.rcpt_tos for m in handler.received if m.content == message] == [[POLICE], [DUTY]]

    row = _rows(archive)[key]
    assert row.detail["left_agency"] == [NIGHT]
    # The night desk's 550 no longer decides the row's fate: sent, to each mailbox of now.
    assert _statuses(archive, key) == {POLICE: "sent", DUTY: "sent"}
    assert [o["status"] for o in _outcomes(archive, key)] == ["failed", "sent"]
    [event] = _events(archive)
    assert (event.subject, event.detail["state"]) == (key, "retry")
    assert event.detail["left_agency"] == [NIGHT]


def test_a_retry_whose_lacking_mailboxes_all_left_sends_nothing_and_says_why(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """The duty desk refused the delivery for good, then closed. `outbox retry` (without
    --rebuild) has nobody left to send those bytes to: the row is built again for the police's
    mailboxes of now, the one of them took it already, and the builder ends the row ``sent``
    with an outcome entry saying why — as `outbox retry --rebuild` would have."""
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive, world, world_ctx, hub, peer, {DUTY: "550 5.1.1 no such user"}
    )
    row = _rows(archive)[key]
    assert dict(sender.run_once())[row.id] == "failed"

    handler.rcpt_replies.clear()  # the relay would take the duty desk's
    clock[0] = later = LATER + timedelta(days=1)
    # world.directory: the police with their first mailbox alone (the duty desk has left).
    [done] = _requeued(archive, [row.id], later, directory=world.directory)
    assert (done.state, done.left_agency) == ("new", (DUTY,))
    assert _rows(archive)[key].detail["not_taken"] == [DUTY]
    builder = Builder(archive, hub, lambda: world.directory, lambda: clock[0], "b")
    while builder.run_once():
        pass
    sender.run_once()
    assert _to_police(handler) == [[POLICE]]  # once, from the first build; nothing since

    row = _rows(archive)[key]
    assert (row.state, row.message, row.rcpt_to) == ("sent", None, [])
    assert row.detail["left_agency"] == [DUTY]
    reply = row.last_reply or ""
    assert "nothing left to send" in reply, reply
    assert f"{DUTY}, which lacked it, is no longer a mailbox of H26.CATP" in reply, reply
    first, last = _outcomes(archive, key)
    assert (first["status"], last["status"], last["reply"]) == ("failed", "sent", reply)
    [event] = _events(archive)
    assert (event.detail["state"], event.detail["left_agency"]) == ("new", [DUTY])


def test_an_alert_to_the_admin_is_sent_again_as_before(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """The admin address is no agency's mailbox: an alert the relay refused goes again, the
    same bytes, to the admin, whatever the directory says; its delivery's mailbox that left
    is dropped in the same requeue."""
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive, world, world_ctx, hub, peer, {DUTY: "550 5.1.1 no such user"}
    )
    assert dict(sender.run_once())[_rows(archive)[key].id] == "failed"
    clock[0] = LATER + timedelta(minutes=6)  # the day's alert is built after a minute
    Builder(archive, hub, lambda: world.directory, lambda: clock[0], "b").run_once()
    assert hub.admin is not None
    handler.rcpt_replies[hub.admin] = "550 5.1.1 no such user"
    alert = refused_alert(archive)
    assert sender.run_once() == [(alert.id, "failed")]
    alert = refused_alert(archive)

    del handler.rcpt_replies[hub.admin]
    clock[0] = later = LATER + timedelta(days=1)
    police = _rows(archive)[key].id
    done = _requeued(archive, [alert.id, police], later, directory=world.directory)
    assert [(r.was.key, r.state, r.left_agency) for r in done] == [
        (alert.key, "retry", ()),
        (key, "new", (DUTY,)),
    ]
    assert _rows(archive)[alert.key].rcpt_to == [hub.admin]
    assert "left_agency" not in _events(archive)[0].detail
    assert dict(sender.run_once())[alert.id] == "sent"
    sent = [m.rcpt_tos for m in handler.received if m.content == alert.message]
    assert sent == [[hub.admin]]


def test_a_retry_to_an_agency_no_longer_active_is_built_again_and_fails_saying_so(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    """The police's directory entry has ended (stored, as `gateway agencies update
    --valid-to` does) since the duty desk refused the delivery: as with --rebuild, the row
    is built again, and the builder fails it, saying why; nothing is sent to any mailbox."""
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive, world, world_ctx, hub, peer, {DUTY: "550 5.1.1 no such user"}
    )
    row = _rows(archive)[key]
    assert dict(sender.run_once())[row.id] == "failed"
    police = world.directory.get("H26.CATP")
    assert police is not None
    ended = dataclasses.replace(police, emails=frozenset({POLICE, DUTY}), valid_to=WORLD_AT.date())
    with archive.db.session() as s:
        store.put_agency(s, ended, at=LATER, actor=ADMIN)

    handler.rcpt_replies.clear()
    clock[0] = later = LATER + timedelta(days=1)
    [done] = _requeued(archive, [row.id], later)  # the directory stored
    assert (done.state, done.left_agency) == ("new", ())
    with archive.db.session(read_only=True) as s:
        now = store.directory(s)
    Builder(archive, hub, lambda: now, lambda: clock[0], "b").run_once()
    row = _rows(archive)[key]
    assert row.state == "failed" and "is not active on" in (row.last_reply or "")
    sender.run_once()
    assert _to_police(handler) == [[POLICE]]


@pytest.mark.slow  # about 9 s: a demo home, then six CLI processes
def test_the_cli_names_the_mailboxes_that_left_in_its_text_and_json(tmp_path: Path) -> None:
    """`gateway outbox retry` reads the directory as the builder does (the one `gateway
    agencies update` changed) and says which recipients it dropped; --json has them too."""
    home = tmp_path / "demo"
    made = gateway("demo", "--dir", home, "--json")
    assert made.returncode == 0, made.stderr
    more = gateway(
        "--home", home, "agencies", "update", "H26.CATP", "--add-email", DUTY, "--add-email", NIGHT
    )  # fmt: skip
    assert more.returncode == 0, more.stderr
    # The relay took two deliveries for the police's first mailbox and refused them for the
    # others, one given with its domain in capitals (compared as the directory compares).
    duty = "truc-ban@CongAn.Hanoi.gov.vn"
    db = Database.open(f"sqlite:///{home}/archive.db")
    try:
        with db.session() as s:
            query = select(t.Outbox).where(
                t.Outbox.kind == "delivery", t.Outbox.organ_id == "H26.CATP"
            )
            one, two = list(s.scalars(query.order_by(t.Outbox.id)))[:2]
            for row, lacking in ((one, [duty, NIGHT]), (two, [DUTY])):
                _refused_for_good(row, lacking)
            ids = [one.id, two.id]
    finally:
        db.dispose()

    less = gateway("--home", home, "agencies", "update", "H26.CATP", "--remove-email", NIGHT)
    assert less.returncode == 0, less.stderr
    first = gateway("--home", home, "outbox", "retry", str(ids[0]), "--json")
    assert first.returncode == 0, first.stderr
    [out] = json.loads(first.stdout)
    assert (out["id"], out["now"], out["left_agency"]) == (ids[0], "retry", [NIGHT])
    listed = gateway("--home", home, "outbox", "list", "--state", "retry", "--json")
    assert [(r["id"], r["rcpt_to"]) for r in json.loads(listed.stdout)] == [(ids[0], [duty])]

    gone = gateway("--home", home, "agencies", "update", "H26.CATP", "--remove-email", DUTY)
    assert gone.returncode == 0, gone.stderr
    second = gateway("--home", home, "outbox", "retry", str(ids[1]))
    assert second.returncode == 0, second.stderr
    assert (
        f"to be built again, not to {DUTY}, which is no longer a mailbox of H26.CATP"
        in second.stdout
    ), second.stdout


def _refused_for_good(row: t.Outbox, lacking: Sequence[str]) -> None:
    """``row`` as the sender leaves it when the relay took it for the police's first mailbox
    and refused it for ``lacking`` (550)."""
    refused = {"status": "failed", "reply": "550 5.1.1 no such user"}
    recipients = {POLICE: {"status": "sent", "reply": "250 2.0.0 kept"}}
    row.state, row.rcpt_to, row.last_reply = "failed", [POLICE, *lacking], refused["reply"]
    row.detail = {**row.detail, "recipients": recipients | dict.fromkeys(lacking, refused)}


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
