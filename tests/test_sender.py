"""The sender against a real relay (aiosmtpd on loopback): what it records when the relay refuses
some recipients of a message, and alerts that never stop a batch from being recorded (how they
are counted, one a day per cause: tests/test_sender_alerts.py)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from archive import tables as t
from archive.service import Archive
from formats.vntime import local_day
from gateway.builder import Builder, Hub
from gateway.demo import DemoWorld
from gateway.outbound import alert
from gateway.pipeline import Context
from gateway.relay import Relay, RelaySession
from gateway.remind import load_templates, run
from gateway.reminders import Policy
from gateway.sender import Sender
from gateway.workdays import Calendar
from keys import store
from keys.directory import Directory
from keys.issuing import issue_agency
from tests.conftest import WORLD_AT
from tests.outbox_world import make_archive, record_sessions
from tests.test_outbound import LATER, _process, _receive, _rows
from tests.test_relay import Peer

POLICE = "pa08@congan.hanoi.gov.vn"
DUTY, NIGHT = "truc-ban@congan.hanoi.gov.vn", "truc-dem@congan.hanoi.gov.vn"


def _police_with(world: DemoWorld, *more: str) -> Directory:
    """The demo directory, with more mailboxes for the police."""
    return Directory.of(
        dataclasses.replace(a, emails=frozenset({*a.emails, *more}))
        if a.organ_id == "H26.CATP"
        else a
        for a in world.directory
    )


def _delivery_to_police(
    archive: Archive, world: DemoWorld, ctx: Context, hub: Hub, *more: str
) -> str:
    """A submission filed and what it owes built, the police having ``more`` mailboxes too;
    the key of its delivery to the police."""
    _receive(archive, world.submission("H26.SNV"))
    seq = _process(archive, ctx, _police_with(world, *more), hub)
    return f"delivery:{seq}:H26.CATP"


def _sender(
    archive: Archive, relay: Relay, clock: list[datetime], hub: Hub, **options: Any
) -> Sender:
    return Sender(
        archive, lambda: RelaySession(relay), lambda: clock[0], "s", admin=hub.admin, **options
    )


def _refused_by(
    archive: Archive,
    world: DemoWorld,
    ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
    replies: dict[str, str],
    **options: Any,
) -> tuple[str, list[datetime], Sender]:
    """A delivery to the police, whose further mailboxes answer their RCPT as ``replies``
    says (address → reply): its key, the sender's clock (at LATER) and the sender."""
    handler, relay = peer
    key = _delivery_to_police(archive, world, ctx, hub, *replies)
    handler.rcpt_replies |= replies
    clock = [LATER]
    return key, clock, _sender(archive, relay, clock, hub, **options)


def _delivered_to(peer: Peer) -> list[str]:
    return sorted(address for got in peer.received for address in got.rcpt_tos)


def refused_alert(archive: Archive, at: datetime = LATER) -> t.Outbox:
    """The day's one alert of rows (or recipients) the relay refused for good."""
    return _rows(archive)[f"alert:outbound-refused:{local_day(at)}"]


def _outcome(archive: Archive, key: str) -> dict[str, Any]:
    with archive.db.session(read_only=True) as s:
        entries = [archive.log.entry(s, seq) for seq in range(archive.log.size(s))]
    [fields] = [e.fields for e in entries if e.kind == "outcome" and e.fields["outbox"] == key]
    return fields


# --- a relay that refuses some recipients of a message -------------------------------------------


def test_recipients_refused_with_a_4xx_are_retried_alone(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive, world, world_ctx, hub, peer, {DUTY: "450 4.2.1 mailbox busy"}
    )
    assert dict(sender.run_once())[2] == "retry"  # not "sent": the duty desk has nothing yet
    row = _rows(archive)[key]
    assert (row.rcpt_to, row.attempts) == ([DUTY], 1)  # retried for the duty desk alone
    assert row.detail["recipients"][POLICE]["status"] == "sent"
    assert row.detail["recipients"][DUTY] == {"status": "retry", "reply": "450 4.2.1 mailbox busy"}
    assert not any(k.startswith("alert:") for k in _rows(archive))  # nothing failed

    del handler.rcpt_replies[DUTY]
    clock[0] = LATER + timedelta(minutes=1)  # the first backoff
    assert sender.run_once() == [(2, "sent")]
    assert _delivered_to(handler) == sorted([POLICE, DUTY, "vanthu@snv.hanoi.gov.vn"])
    assert len([got for got in handler.received if POLICE in got.rcpt_tos]) == 1  # not twice
    assert _rows(archive)[key].state == "sent"
    outcome = _outcome(archive, key)
    assert outcome["status"] == "sent" and outcome["attempts"] == 2
    assert {a: r["status"] for a, r in outcome["recipients"].items()} == {
        POLICE: "sent",
        DUTY: "sent",
    }


def test_recipients_refused_with_a_5xx_fail_and_the_admin_is_alerted(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    handler, relay = peer
    key = _delivery_to_police(archive, world, world_ctx, hub, DUTY)
    handler.rcpt_replies[DUTY] = "550 5.1.1 no such user"
    assert dict(_sender(archive, relay, [LATER], hub).run_once())[2] == "failed"
    assert _delivered_to(handler) == sorted([POLICE, "vanthu@snv.hanoi.gov.vn"])
    rows = _rows(archive)
    assert DUTY in (rows[key].last_reply or "") and "550 5.1.1" in (rows[key].last_reply or "")
    alert = refused_alert(archive)
    assert DUTY in alert.detail["text"] and key in alert.detail["text"]
    assert alert.detail["rows"] == 1
    outcome = _outcome(archive, key)
    assert outcome["status"] == "failed"
    assert outcome["recipients"][POLICE]["status"] == "sent"
    assert outcome["recipients"][DUTY] == {"status": "failed", "reply": "550 5.1.1 no such user"}


def test_a_4xx_and_a_5xx_refusal_retry_one_and_alert_the_other_at_once(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
) -> None:
    handler = peer[0]
    key, clock, sender = _refused_by(
        archive,
        world,
        world_ctx,
        hub,
        peer,
        {DUTY: "452 4.2.2 mailbox full", NIGHT: "550 5.1.1 no such user"},
    )
    assert dict(sender.run_once())[2] == "retry"
    rows = _rows(archive)
    assert rows[key].rcpt_to == [DUTY]
    partial = refused_alert(archive)  # at once, while the duty desk is retried
    assert [k for k in rows if k.startswith("alert:")] == [partial.key]
    assert NIGHT in partial.detail["text"] and f"retrying {DUTY}" in partial.detail["text"]

    del handler.rcpt_replies[DUTY]
    clock[0] = LATER + timedelta(minutes=1)
    assert sender.run_once() == [(2, "failed")]  # the night desk never got it
    alerts = [k for k in _rows(archive) if k.startswith("alert:")]
    assert alerts == [partial.key]  # the admin heard of the night desk once
    assert refused_alert(archive).detail["rows"] == 1  # and the row not counted again
    outcome = _outcome(archive, key)
    assert {a: r["status"] for a, r in outcome["recipients"].items()} == {
        POLICE: "sent",
        DUTY: "sent",
        NIGHT: "failed",
    }


# --- alerts never stop a batch from being recorded -----------------------------------------------


def test_a_failed_certificate_reminder_and_its_admin_copy_are_two_alerts(
    archive: Archive, world: DemoWorld, hub: Hub, peer: tuple[Peer, Relay]
) -> None:
    """A certificate reminder is copied to the admin when queued; when it then fails, the
    failure is a second alert — under a key of its own, recorded with the batch."""
    handler, relay = peer
    at = WORLD_AT
    short = issue_agency(
        world.root, email=POLICE, organ_id="H26.CATP", common_name="Police (short-lived)",
        at=at - timedelta(days=300), days=310, key_kind="rsa2048",
    )  # fmt: skip
    with archive.db.session() as s:
        store.add_certificate(s, short.cert, role="agency", organ_id="H26.CATP", at=at, actor="t")
    run(
        archive.db, calendar=Calendar.load(), directory=world.directory,
        templates=load_templates(), policy=Policy(), hub=hub.address, now=at, admin=hub.admin,
    )  # fmt: skip
    [reminder] = [r for r in _rows(archive).values() if r.kind == "reminder"]
    clock = [at]
    builder = Builder(archive, hub, lambda: world.directory, lambda: clock[0], "b")
    builder.run_once()
    handler.rcpt_replies[POLICE] = "550 5.1.1 mailbox unavailable"
    sender = _sender(archive, relay, clock, hub)
    assert sorted(state for _, state in sender.run_once()) == ["failed", "sent"]
    rows = _rows(archive)
    assert rows[reminder.key].state == "failed"
    assert rows[f"alert:copy:{reminder.key}"].state == "sent"
    failure = refused_alert(archive, at)  # built after a minute, counting what fails with it
    assert failure.state == "building" and reminder.key in failure.detail["text"]
    assert not any(r.state == "sending" for r in rows.values())

    clock[0] = at + timedelta(minutes=6)  # nothing was left claimed: nothing is sent again
    assert sender.run_once() == []
    assert builder.run_once() == 1
    assert [state for _, state in sender.run_once()] == ["sent"]  # the failure alert
    assert [got.rcpt_tos for got in handler.received].count([hub.admin]) == 2


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_an_alert_already_queued_does_not_undo_the_recording_of_a_failure(
    request: pytest.FixtureRequest,
    tmp_path: Any,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
    database: str,
) -> None:
    """Today's alert of that cause was queued by an earlier failure and is sent already: it
    stays as it was, and the failure is recorded all the same."""
    handler, relay = peer
    url, cluster, name = f"sqlite:///{tmp_path}/a.db", None, ""
    if database == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        name = cluster.create_database(request.node.name)
        url = cluster.url(name)
    made = make_archive(url, world)
    try:
        _receive(made, world.submission("H26.SNV"))
        seq = _process(made, world_ctx, world.directory, hub)
        key = f"alert:outbound-refused:{local_day(LATER)}"
        with made.db.session() as s:
            earlier = alert(key.removeprefix("alert:"), "an earlier alert", LATER)
            earlier.state = "sent"
            s.add(earlier)
        handler.rcpt_replies["vanthu@snv.hanoi.gov.vn"] = "550 5.1.1 no such user"
        assert sorted(_sender(made, relay, [LATER], hub).run_once()) == [(1, "failed"), (2, "sent")]
        rows = _rows(made)
        assert rows[f"receipt:{seq}"].state == "failed"
        assert (rows[key].state, rows[key].detail["text"]) == ("sent", "an earlier alert")
        with made.db.session(read_only=True) as s:
            assert s.scalars(select(t.Outbox.state).where(t.Outbox.state == "sending")).all() == []
    finally:
        made.db.dispose()
        if cluster is not None:
            cluster.drop_database(name)


def test_an_idle_sender_only_looks_and_claims_what_is_ready(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    hub: Hub,
    peer: tuple[Peer, Relay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender's thread polls every 0.2 s: with nothing to send, a poll is one read-only
    transaction, never the write lock (and, on SQLite, a commit to sync)."""
    handler, relay = peer
    sessions = record_sessions(archive.db, monkeypatch)
    clock = [LATER]
    sender = _sender(archive, relay, clock, hub)
    assert sender.run_once() == [] and sessions == [True]
    key = _delivery_to_police(archive, world, world_ctx, hub)
    sessions.clear()
    sent = sender.run_once()
    assert sent and {state for _, state in sent} == {"sent"}
    assert sessions[:2] == [True, False]  # looked, then claimed
    assert _rows(archive)[key].state == "sent" and handler.received
    sessions.clear()
    assert sender.run_once() == [] and sessions == [True]  # idle again: only a look
