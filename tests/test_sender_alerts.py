"""The admin's alerts about delivery failures, against a real relay: one a day per cause, naming
how many rows and the first of them, however many rows fail — after a relay outage, when the
relay refuses everything, when it refuses some recipients — and one a day once mail has waited
an hour for a relay that keeps failing. Every row's outcome is still filed on its own."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from archive.service import Archive
from formats.vntime import local_day
from gateway.builder import Builder, Hub
from gateway.demo import DemoWorld
from gateway.pipeline import Context
from gateway.relay import Relay
from gateway.sender import FIRST, GATHER
from gateway.worker import Worker
from keys.directory import Directory
from tests.outbox_world import make_archive
from tests.servers import free_port
from tests.test_outbound import LATER, _receive, _rows
from tests.test_relay import Peer
from tests.test_sender import DUTY, NIGHT, _police_with, _sender


@pytest.fixture
def any_archive(database_url: str, world: DemoWorld) -> Iterator[Archive]:
    """The outbound world on SQLite and on PostgreSQL."""
    made = make_archive(database_url, world)
    yield made
    made.db.dispose()


def _owed(
    archive: Archive,
    world: DemoWorld,
    ctx: Context,
    hub: Hub,
    numbers: range,
    directory: Directory,
) -> list[str]:
    """Submissions ``numbers`` filed and what they owe built (a receipt and a delivery each):
    the keys of those outbox rows."""
    before = set(_rows(archive))
    for number in numbers:
        _receive(archive, world.submission("H26.SNV", number=number))
    while Worker(archive, lambda: ctx, clock=lambda: LATER, name="w").run_once():
        pass
    builder = Builder(archive, hub, lambda: directory, clock=lambda: LATER, name="b")
    while builder.run_once():
        pass
    return [k for k, r in _rows(archive).items() if r.state == "ready" and k not in before]


def _alerts(archive: Archive) -> dict[str, dict[str, Any]]:
    return {k: r.detail for k, r in _rows(archive).items() if r.kind == "alert"}


def _outcomes(archive: Archive) -> list[tuple[str, str]]:
    with archive.db.session(read_only=True) as s:
        entries = [archive.log.entry(s, seq) for seq in range(archive.log.size(s))]
    return sorted((e.fields["outbox"], e.fields["status"]) for e in entries if e.kind == "outcome")


def test_a_relay_outage_alerts_once_after_an_hour_and_once_when_the_rows_are_given_up(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub
) -> None:
    """30 rows while nothing listens at the relay's address: nothing during the first hour,
    then one alert that mail has waited an hour (however often it is retried that day); when
    the rows are given up, one alert naming how many (counted over the run's two batches)."""
    keys = _owed(archive, world, world_ctx, hub, range(1, 16), world.directory)
    assert len(keys) == 30
    down = Relay("127.0.0.1", free_port(), security="none", timeout=2, helo="gw")
    clock = [LATER]
    sender = _sender(archive, down, clock, hub)
    for minutes in (0, 30):
        clock[0] = LATER + timedelta(minutes=minutes)
        assert {state for _, state in sender.run_once()} == {"retry"}
        assert _alerts(archive) == {}  # mail has waited minutes: not yet
    for minutes in (61, 130):
        clock[0] = LATER + timedelta(minutes=minutes)
        assert {state for _, state in sender.run_once()} == {"retry"}
    day = local_day(LATER)
    [waiting] = _alerts(archive).values()
    assert list(_alerts(archive)) == [f"alert:outbound-waiting:{day}"]
    assert f"since {LATER:%Y-%m-%d %H:%M} UTC" in waiting["text"]
    assert "connection refused" in waiting["text"]

    clock[0] = LATER + timedelta(hours=49)  # past give_up_after (48 h)
    done = sender.run_once()
    assert len(done) == 30 and {state for _, state in done} == {"failed"}
    later = local_day(clock[0])
    alerts = _alerts(archive)
    assert sorted(alerts) == [
        f"alert:outbound-given-up:{later}",
        f"alert:outbound-waiting:{day}",
    ]
    given_up = alerts[f"alert:outbound-given-up:{later}"]
    assert given_up["rows"] == 30
    assert len(given_up["first"]) == FIRST
    assert "30 row(s)" in given_up["text"] and keys[0] in given_up["text"]
    assert "give_up_after_hours" in given_up["text"]
    # Each row's outcome is filed on its own, as before.
    assert _outcomes(archive) == sorted((k, "failed") for k in keys)


def test_a_relay_refusing_everything_is_one_alert_a_day(
    any_archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, peer: tuple[Peer, Relay]
) -> None:
    """Every row refused with a 5xx: one alert, counting what fails in the minute before it is
    built (here over a run's two batches, and another run); once built it says what it said
    (later failures that day are in the log and the outcomes); the next day has its own."""
    archive = any_archive
    handler, relay = peer
    handler.data_reply = "554 5.7.1 relaying denied"
    keys = _owed(archive, world, world_ctx, hub, range(1, 4), world.directory)
    clock = [LATER]
    sender = _sender(archive, relay, clock, hub)
    builder = Builder(archive, hub, lambda: world.directory, lambda: clock[0], "b")
    assert [state for _, state in sender.run_once(limit=4)] == ["failed"] * 6
    day = local_day(LATER)
    key = f"alert:outbound-refused:{day}"
    assert list(_alerts(archive)) == [key]
    assert _alerts(archive)[key]["rows"] == 6
    assert builder.run_once() == 0  # not yet: it gathers what fails together

    clock[0] = LATER + timedelta(seconds=30)
    more = _owed(archive, world, world_ctx, hub, range(4, 5), world.directory)
    assert [state for _, state in sender.run_once()] == ["failed"] * 2
    clock[0] = LATER + GATHER + timedelta(seconds=1)
    assert builder.run_once() == 1
    assert _rows(archive)[key].state == "ready"
    refused = _alerts(archive)[key]
    assert refused["rows"] == 8 and len(refused["first"]) == FIRST
    assert "8 row(s)" in refused["text"] and "554 5.7.1 relaying denied" in refused["text"]
    assert all(k in refused["text"] for k in keys[:FIRST])

    later = _owed(archive, world, world_ctx, hub, range(5, 6), world.directory)
    handler.data_reply = "550 5.7.1 still denied"
    assert {state for _, state in sender.run_once()} == {"failed"}  # (the alert too)
    assert list(_alerts(archive)) == [key]
    after = _rows(archive)[key].detail
    assert {k: after[k] for k in ("text", "rows", "first")} == refused  # as it was built

    next_day = LATER + timedelta(days=1)
    clock[0] = next_day
    _owed(archive, world, world_ctx, hub, range(6, 7), world.directory)
    assert {state for _, state in sender.run_once()} == {"failed"}
    assert _alerts(archive)[f"alert:outbound-refused:{local_day(next_day)}"]["rows"] == 2
    # Each row's outcome, and the first day's alert (refused too: nobody is told of that).
    assert len(_outcomes(archive)) == len(keys) + len(more) + len(later) + 1 + 2


def test_recipients_refused_while_others_are_retried_are_one_alert_a_day(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, peer: tuple[Peer, Relay]
) -> None:
    """Two deliveries whose night desk is refused with a 5xx while the duty desk is retried:
    the admin hears of both at once, in one alert naming each, not one per row."""
    handler, relay = peer
    handler.rcpt_replies |= {DUTY: "452 4.2.2 mailbox full", NIGHT: "550 5.1.1 no such user"}
    police = _police_with(world, DUTY, NIGHT)
    keys = _owed(archive, world, world_ctx, hub, range(1, 3), police)
    deliveries = [k for k in keys if k.startswith("delivery:")]
    clock = [LATER]
    sender = _sender(archive, relay, clock, hub)
    states = dict(sender.run_once())
    rows = _rows(archive)
    assert [states[rows[k].id] for k in deliveries] == ["retry", "retry"]
    day = local_day(LATER)
    [(key, alert)] = _alerts(archive).items()
    assert key == f"alert:outbound-refused:{day}"
    assert alert["rows"] == 2
    assert all(k in alert["text"] for k in deliveries)
    assert NIGHT in alert["text"] and f"retrying {DUTY}" in alert["text"]

    del handler.rcpt_replies[DUTY]
    clock[0] = LATER + timedelta(minutes=2)
    assert sorted(sender.run_once()) == sorted((rows[k].id, "failed") for k in deliveries)
    assert _rows(archive)[key].detail["rows"] == 2  # the night desk was told of once per row
