"""How the sender goes through a run against a real relay (aiosmtpd on loopback): it stops
between two messages and gives back what it did not try; what the relay answered is recorded
as it goes, and its claim outlasts a slow relay, so a second sender never takes its rows over;
and it reads the messages a few at a time, not a whole batch at once.

Time is the sender's clock, which the relay here moves on as it takes each message."""

from __future__ import annotations

import contextlib
import re
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as Server
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy import delete, select, update

from archive import tables as t
from archive.service import Archive
from gateway.builder import Builder, Hub
from gateway.demo import DemoWorld
from gateway.outbound import alert
from gateway.relay import Attempt, Relay, RelaySession
from gateway.sender import READ_BUDGET, RECORD_EVERY, Sender
from tests.test_outbound import LATER, _rows
from tests.test_relay import LoopbackController, Peer

MESSAGE_ID = re.compile(rb"Message-ID: <alert\.(\d+)@")


def _alerts(archive: Archive, world: DemoWorld, hub: Hub, n: int) -> list[int]:
    """``n`` admin alerts built and ready to send; their outbox ids."""
    with archive.db.session() as s:
        s.add_all(alert(f"test-{i}", f"alert {i}", LATER) for i in range(n))
    builder = Builder(archive, hub, lambda: world.directory, lambda: LATER, "b")
    while builder.run_once():
        pass
    return sorted(r.id for r in _rows(archive).values() if r.state == "ready")


def _sent_ids(peer: Peer) -> list[int]:
    """The outbox ids of the alerts the relay took, in the order it took them."""
    return [int(m.group(1)) for got in peer.received if (m := MESSAGE_ID.search(got.content))]


@contextlib.contextmanager
def _relay(peer: Peer) -> Iterator[Relay]:
    """``peer`` answering on loopback, as the relay."""
    controller = LoopbackController(peer, hostname="127.0.0.1", port=0)
    controller.start()
    try:
        yield Relay("127.0.0.1", controller.port, security="none", timeout=10, helo="gw")
    finally:
        controller.stop()


class Meanwhile(Peer):
    """A relay that calls ``then(n)`` while it holds the nth message, before it answers."""

    def __init__(self, then: Callable[[int], object]) -> None:
        super().__init__()
        self.then = then

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        self.then(len(self.received) + 1)
        reply: str = await super().handle_DATA(server, session, envelope)
        return reply


# --- a stop between two messages -------------------------------------------------------------


def test_a_stop_ends_the_run_after_the_message_in_flight_and_gives_the_rest_back(
    archive: Archive, world: DemoWorld, hub: Hub
) -> None:
    """The stop comes while the relay holds the third message: that one is answered and
    recorded, and the rows not tried go back as they were, unclaimed; the next run sends
    them, and nothing twice."""
    ids = _alerts(archive, world, hub, 8)
    due = LATER - timedelta(minutes=1)
    with archive.db.session() as s:  # the fifth waits to be tried again after a 4xx
        s.execute(
            update(t.Outbox)
            .where(t.Outbox.id == ids[4])
            .values(state="retry", attempts=2, next_attempt_at=due, last_reply="451 4.3.0 later")
        )
    stop = threading.Event()
    peer = Meanwhile(lambda n: stop.set() if n == 3 else None)
    with _relay(peer) as relay:
        sender = Sender(
            archive, lambda: RelaySession(relay), lambda: LATER, "s", admin=hub.admin, stop=stop
        )
        assert sender.run_once(limit=6) == [(ids[0], "sent"), (ids[1], "sent"), (ids[2], "sent")]
        assert _sent_ids(peer) == ids[:3]
        rows = {r.id: r for r in _rows(archive).values()}
        assert [rows[n].state for n in ids] == ["sent"] * 3 + ["ready", "retry", "ready"] * 1 + [
            "ready"
        ] * 2
        assert all(rows[n].worker is None and rows[n].lease_until is None for n in ids)
        waiting = rows[ids[4]]  # given back as it was claimed
        assert (waiting.attempts, waiting.next_attempt_at, waiting.last_reply) == (
            2,
            due,
            "451 4.3.0 later",
        )
        assert sender.run_once() == []  # stopped: nothing is claimed

        stop.clear()
        assert sorted(sender.run_once()) == [(n, "sent") for n in ids[3:]]
        assert Counter(_sent_ids(peer)) == Counter(ids)  # each once
    with archive.db.session(read_only=True) as s:
        outcomes = [
            archive.log.entry(s, seq).fields["outbox"]
            for seq in range(archive.log.size(s))
            if archive.log.entry(s, seq).kind == "outcome"
        ]
    assert sorted(outcomes) == sorted(f"alert:test-{i}" for i in range(8))


def test_a_run_that_fails_records_what_the_relay_answered_and_gives_the_rest_back(
    archive: Archive, world: DemoWorld, hub: Hub
) -> None:
    """A defect of ours in the middle of a run (here: before the third message is offered)
    does not leave the two messages the relay took to be sent again once the claim expires."""
    ids = _alerts(archive, world, hub, 5)
    offered = Counter[str]()

    class Broken(RelaySession):
        def deliver(self, message: bytes, *, mail_from: str, rcpt_to: Sequence[str]) -> Attempt:
            offered["messages"] += 1
            if offered["messages"] == 3:
                raise KeyError("a defect of ours")
            return super().deliver(message, mail_from=mail_from, rcpt_to=rcpt_to)

    peer = Peer()
    with _relay(peer) as relay:
        sender = Sender(archive, lambda: Broken(relay), lambda: LATER, "s", admin=hub.admin)
        with pytest.raises(KeyError):
            sender.run_once()
    assert _sent_ids(peer) == ids[:2]
    rows = {r.id: r for r in _rows(archive).values()}
    assert [rows[n].state for n in ids] == ["sent", "sent", "ready", "ready", "ready"]
    assert all(rows[n].worker is None for n in ids)


# --- a slow relay, and a second sender -------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "each", "second_at"),
    [
        # 20 deliveries of 20 s each (20 MB at ~8 Mbit/s): past 5 minutes into the batch.
        (20, timedelta(seconds=20), 17),
        # A message the relay takes 10 minutes over (within its 600 s deadline), more than
        # the time a claim used to hold.
        (4, timedelta(minutes=10), 3),
    ],
)
def test_a_second_sender_never_takes_over_rows_a_slow_run_still_holds(
    archive: Archive, world: DemoWorld, hub: Hub, rows: int, each: timedelta, second_at: int
) -> None:
    """What the relay answered is recorded as the run goes (here after every message, each
    taking longer than RECORD_EVERY), and the claim of the rows still to be sent outlasts
    the message in flight: a second instance running meanwhile finds nothing to send."""
    assert each >= RECORD_EVERY
    ids = _alerts(archive, world, hub, rows)
    clock = [LATER]
    seen: dict[str, Any] = {}
    other = Peer()

    def meanwhile(n: int) -> None:
        clock[0] += each
        if n == second_at:
            seen["recorded"] = {r.id: r.state for r in _rows(archive).values()}
            seen["second"] = second.run_once()

    first = Meanwhile(meanwhile)
    with _relay(first) as relay, _relay(other) as relay_b:
        second = Sender(
            archive, lambda: RelaySession(relay_b), lambda: clock[0], "hostB:1", admin=hub.admin
        )
        sender = Sender(
            archive, lambda: RelaySession(relay), lambda: clock[0], "hostA:1", admin=hub.admin
        )
        assert sorted(sender.run_once()) == [(n, "sent") for n in ids]
    assert seen["second"] == [] and other.received == []
    assert Counter(_sent_ids(first)) == Counter(ids)  # each once
    # Recorded before the next message went: each took longer than RECORD_EVERY.
    assert [seen["recorded"][n] for n in ids[: second_at - 1]] == ["sent"] * (second_at - 1)
    assert {seen["recorded"][n] for n in ids[second_at - 1 :]} == {"sending"}


def test_outcomes_are_recorded_every_limit_messages_on_a_fast_relay(
    archive: Archive, world: DemoWorld, hub: Hub
) -> None:
    """On a relay that answers at once (the clock does not move), a run records per ``limit``:
    the rows of the first batch are recorded when the third batch's first message goes."""
    ids = _alerts(archive, world, hub, 6)
    seen: dict[int, dict[int, str]] = {}
    peer = Meanwhile(lambda n: seen.setdefault(n, {r.id: r.state for r in _rows(archive).values()}))
    with _relay(peer) as relay:
        sender = Sender(archive, lambda: RelaySession(relay), lambda: LATER, "s", admin=hub.admin)
        assert sender.run_once(limit=2, batches=3) == [(n, "sent") for n in ids]
    assert [seen[2][n] for n in ids] == ["sending"] * 2 + ["ready"] * 4  # one batch claimed
    assert [seen[3][n] for n in ids] == ["sent"] * 2 + ["sending"] * 2 + ["ready"] * 2
    assert [seen[5][n] for n in ids] == ["sent"] * 4 + ["sending"] * 2


# --- memory -----------------------------------------------------------------------------------


class Forgetful(Peer):
    """A relay that keeps only each message's Message-ID, not its bytes."""

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        envelope.content = envelope.content[:2000]
        envelope.original_content = b""
        reply: str = await super().handle_DATA(server, session, envelope)
        return reply


def test_a_run_reads_its_messages_within_a_byte_budget(
    archive: Archive, world: DemoWorld, hub: Hub
) -> None:
    """Twenty built deliveries of 2 MB each (40 MB): the sender holds at most its read budget
    of them at a time, not the whole batch (memory traced across the run, relay included)."""
    ids = _alerts(archive, world, hub, 20)
    with archive.db.session() as s:
        for n in ids:
            row = s.get(t.Outbox, n)
            assert row is not None and row.message is not None
            head, _, _ = row.message.partition(b"\r\n\r\n")
            row.message = head + b"\r\n\r\n" + (b"A" * 76 + b"\r\n") * (2 * 2**20 // 78)
    peer = Forgetful()
    with _relay(peer) as relay:
        sender = Sender(archive, lambda: RelaySession(relay), lambda: LATER, "s", admin=hub.admin)
        tracemalloc.start()
        try:
            done = sender.run_once()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert sorted(done) == [(n, "sent") for n in ids]
    assert _sent_ids(peer) == ids
    # The budget, plus a message and the copies made to send and to receive it.
    assert peak < READ_BUDGET + 8 * 2 * 2**20 < 20 * 2 * 2**20


def test_a_row_gone_from_the_outbox_is_not_waited_for(
    archive: Archive, world: DemoWorld, hub: Hub
) -> None:
    """A claimed row deleted before it is read (by hand, say) is skipped, and the run ends.
    (Messages of over half the read budget: each is read alone, just before it goes.)"""
    ids = _alerts(archive, world, hub, 2)
    with archive.db.session() as s:
        for n in ids:
            row = s.get(t.Outbox, n)
            assert row is not None and row.message is not None
            row.message += (b"A" * 76 + b"\r\n") * (READ_BUDGET // 2 // 78)

    def delete_the_second(n: int) -> None:
        with archive.db.session() as s:
            s.execute(delete(t.Outbox).where(t.Outbox.id == ids[1]))

    peer = Meanwhile(delete_the_second)
    with _relay(peer) as relay:
        sender = Sender(archive, lambda: RelaySession(relay), lambda: LATER, "s", admin=hub.admin)
        assert sender.run_once() == [(ids[0], "sent")]
    assert _sent_ids(peer) == ids[:1]
    with archive.db.session(read_only=True) as s:
        assert s.scalars(select(t.Outbox.state).where(t.Outbox.id.in_(ids))).all() == ["sent"]
