"""Workers: inbox → pipeline → archive, exactly once; duplicates and transient failures."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import sqlite3
import threading
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import select
from sqlalchemy.exc import DatabaseError

from archive import tables as t
from archive.db import Database
from archive.records import Transport
from archive.service import Archive
from formats.errors import ConfigError, DatabaseDamaged, InputError, InternalError
from formats.smime import Attachment
from gateway import intake, obligation_store, pipeline, worker_process
from gateway import worker as worker_module
from gateway.claims import release_stale_claims, this_host
from gateway.demo import DemoWorld, tamper
from gateway.obligations import Obligation, default_due
from gateway.outbound import ENVIRONMENT
from gateway.pipeline import Context
from gateway.worker import Worker
from gateway.worker_process import BUILD_EVERY, build_now
from keys import store
from keys.directory import Directory
from keys.issuing import Issued, issue_agency, make_root
from keys.trust import TrustStore
from tests import pg
from tests.conftest import WORLD_AT
from tests.outbox_world import archive_on, record_sessions
from tests.test_pipeline import _document_with, _listed


@pytest.fixture
def archive(tmp_path: Path, world: DemoWorld) -> Archive:
    return archive_on(Database.open(f"sqlite:///{tmp_path}/a.db"), world)


def _receive(archive: Archive, raw: bytes, minutes: int = 0) -> int:
    at = WORLD_AT + timedelta(minutes=minutes)
    transport = Transport(
        at,
        "smtp",
        "127.0.0.1",
        "snv.hanoi.gov.vn",
        "vanthu@snv.hanoi.gov.vn",
        ("hub@exchange.hanoi.gov.vn",),
    )
    return intake.accept(archive.db, raw, transport)


def _worker(archive: Archive, ctx: Context, minutes: int = 5) -> Worker:
    return Worker(archive, lambda: ctx, clock=lambda: WORLD_AT + timedelta(minutes=minutes))


def test_every_message_is_filed_once_with_its_verdict(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    good = world.submission("H26.SNV")
    revoked = world.submission("H26.STP", signer=world.revoked["H26.STP"])
    numbers = [_receive(archive, m) for m in (good, tamper(good), revoked)]
    worker = _worker(archive, world_ctx)
    outcomes = worker.run_once()
    assert [(o.intake_id, o.disposition) for o in outcomes] == list(
        zip(numbers, ["accepted", "quarantined", "quarantined"], strict=True)
    )
    assert worker.run_once() == []  # nothing is processed twice
    with archive.db.session() as s:
        rows = s.query(t.Intake).order_by(t.Intake.id).all()
        assert [(r.state, r.archive_seq) for r in rows] == [("done", 0), ("done", 1), ("done", 2)]
        entry = archive.log.entry(s, 0)
        assert entry.fields["status"] == "accepted"
        assert entry.fields["agency"] == "H26.SNV"
        assert archive.blobs.get(s, entry.blobs["raw"]) == good
        assert entry.fields["transport"]["helo"] == "snv.hanoi.gov.vn"
    report = archive.verify()
    assert report.ok, report.problems


def test_a_duplicate_is_not_filed_again_but_a_forgery_reusing_its_id_is(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    good = world.submission("H26.SNV")
    _receive(archive, good)
    _receive(archive, good, minutes=1)  # the agency's mail client sent it twice
    _receive(archive, tamper(good), minutes=2)  # same Message-ID, not authentic
    outcomes = _worker(archive, world_ctx).run_once()
    assert [(o.disposition, o.archive_seq) for o in outcomes] == [
        ("accepted", 0),
        ("duplicate", 0),
        ("quarantined", 1),
    ]
    with archive.db.session() as s:
        assert archive.log.size(s) == 2


def _second_mailbox(world: DemoWorld, world_ctx: Context) -> tuple[Issued, Context]:
    """H26.SNV with a second mailbox, bophan@, and a certificate of its own for it."""
    snv = world.directory.get("H26.SNV")
    assert snv is not None
    two = dataclasses.replace(snv, emails=frozenset({*snv.emails, "bophan@snv.hanoi.gov.vn"}))
    directory = Directory.of([two if a.organ_id == "H26.SNV" else a for a in world.directory])
    second = issue_agency(
        world.root, email="bophan@snv.hanoi.gov.vn", organ_id="H26.SNV",
        common_name="So Noi vu (bo phan)", at=WORLD_AT - timedelta(days=1),
    )  # fmt: skip
    return second, dataclasses.replace(world_ctx, directory=directory)


def test_the_agency_is_the_sender_whichever_of_its_mailboxes_sends(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """A MessageId is the agency's. The same document sent from its second mailbox (its own
    certificate) was filed and delivered twice; another document under the same MessageId
    from there was accepted, where from the first mailbox it is refused as reused."""
    second, ctx = _second_mailbox(world, world_ctx)
    payload = world.payload("H26.SNV", number=7)
    first = world.submission_of(payload, "H26.SNV")
    again = world.submission_of(
        payload, "H26.SNV", signer=second, from_addr="bophan@snv.hanoi.gov.vn"
    )
    other = world.payload("H26.SNV", number=8, message_id=payload.header.message_id)
    reused_id = world.submission_of(
        other, "H26.SNV", signer=second, from_addr="bophan@snv.hanoi.gov.vn"
    )
    for minutes, raw in enumerate((first, again, reused_id)):
        _receive(archive, raw, minutes=minutes)
    outcomes = _worker(archive, ctx).run_once()
    assert [(o.disposition, o.archive_seq) for o in outcomes] == [
        ("accepted", 0), ("duplicate", 0), ("rejected", 1),
    ]  # fmt: skip


def test_a_messageid_filed_before_the_agency_keys_is_still_known(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """Entries filed by an earlier version recorded the sender's mailbox with the MessageId:
    another document under that MessageId, sent after the upgrade, is refused as reused
    still, not filed as new."""
    payload = world.payload("H26.SNV", number=7)
    _receive(archive, world.submission_of(payload, "H26.SNV"))
    [first] = _worker(archive, world_ctx).run_once()
    assert first.disposition == "accepted"
    v = pipeline.process(world.submission_of(payload, "H26.SNV"), world_ctx, at=WORLD_AT)
    [agency_key] = [k for k in worker_module.replay_keys(v) if k.startswith("sender:")]
    [mailbox_key] = worker_module.keys_of_before(v)
    with archive.db.session() as s:  # as the earlier version recorded it
        s.execute(sqlalchemy.update(t.Seen).where(t.Seen.key == agency_key).values(key=mailbox_key))
    other = world.payload("H26.SNV", number=8, message_id=payload.header.message_id)
    _receive(archive, world.submission_of(other, "H26.SNV"), minutes=1)
    [again] = _worker(archive, world_ctx, minutes=6).run_once()
    assert again.disposition == "rejected"
    # And from the agency's other mailbox (its own certificate): the same document is a copy,
    # another under that MessageId is refused.
    second, ctx = _second_mailbox(world, world_ctx)
    bophan = "bophan@snv.hanoi.gov.vn"
    _receive(archive, world.submission_of(payload, "H26.SNV", signer=second, from_addr=bophan))
    _receive(archive, world.submission_of(other, "H26.SNV", signer=second, from_addr=bophan))
    copy, reuse = _worker(archive, ctx, minutes=12).run_once()
    assert (copy.disposition, copy.archive_seq) == ("duplicate", first.archive_seq)
    assert reuse.disposition == "rejected"


def test_a_corrected_resend_of_a_rejected_submission_is_judged_anew(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """The clerk forgot the scan the payload lists: rejected. The same signed payload sent
    again in a new message, the scan attached, is judged anew and accepted, not answered with
    the old refusal; the rejected message itself sent again still gets its receipt again."""
    scan = Attachment("danh-sach.pdf", "application/pdf", b"%PDF-1.7 scan")
    forgot = _document_with(world, [_listed(scan)], [], "<first@snv.hanoi.gov.vn>")
    _receive(archive, forgot)
    [first] = _worker(archive, world_ctx).run_once()
    assert first.disposition == "rejected"
    fixed = _document_with(world, [_listed(scan)], [scan], "<second@snv.hanoi.gov.vn>")
    _receive(archive, forgot, minutes=1)
    _receive(archive, fixed, minutes=2)
    outcomes = _worker(archive, world_ctx, minutes=6).run_once()
    assert [(o.disposition, o.archive_seq) for o in outcomes] == [
        ("duplicate", first.archive_seq),
        ("accepted", 1),
    ]
    _receive(archive, fixed, minutes=7)  # and the accepted one again: a duplicate of it
    [again] = _worker(archive, world_ctx, minutes=8).run_once()
    assert (again.disposition, again.archive_seq) == ("duplicate", 1)


def test_a_rejected_message_sent_again_once_the_hub_is_fixed_is_accepted(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """Rejected because the hub's directory lacked the recipient agency; the admin enters it
    and the agency's mail client sends the very same message again. It was answered with the
    old refusal, as a copy of it, for ever. It is judged anew: accepted, filed, and a copy of
    that one from then on; while the hub is not fixed, a resend gets the old receipt."""
    raw = world.submission("H26.SNV")
    without_police = Directory.of([a for a in world.directory if a.organ_id != "H26.CATP"])
    unfixed = dataclasses.replace(world_ctx, directory=without_police)
    _receive(archive, raw)
    [first] = _worker(archive, unfixed).run_once()
    assert first.disposition == "rejected"
    _receive(archive, raw, minutes=1)
    [again] = _worker(archive, unfixed, minutes=6).run_once()
    assert (again.disposition, again.archive_seq) == ("duplicate", first.archive_seq)
    _receive(archive, raw, minutes=7)
    [fixed] = _worker(archive, world_ctx, minutes=8).run_once()
    assert fixed.disposition == "accepted" and fixed.archive_seq != first.archive_seq
    _receive(archive, raw, minutes=9)
    [last] = _worker(archive, world_ctx, minutes=10).run_once()
    assert (last.disposition, last.archive_seq) == ("duplicate", fixed.archive_seq)


def _with_outer_message_id(raw: bytes, message_id: bytes) -> bytes:
    """``raw`` with its (unsigned, outer) Message-ID replaced, as anyone on the path can."""
    header = b"Message-ID: " + message_id + b"\r\n"
    return re.sub(rb"(?im)^Message-ID: .*?\r\n", header, raw, count=1)


def _outer_message_id(raw: bytes) -> bytes:
    found = re.search(rb"(?im)^Message-ID: (.*?)\r\n", raw)
    assert found is not None
    return found.group(1)


def test_another_submission_under_the_same_outer_message_id_is_judged_not_dropped(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """The outer Message-ID is no part of what is signed: two different signed submissions
    that share it are two submissions. The second was taken for a duplicate: not filed, and
    answered with the first's receipt (its digest, of the other payload)."""
    first = world.submission("H26.SNV", number=1, period="2026-10")
    second = world.submission("H26.SNV", number=2, period="2026-11")
    _receive(archive, first)
    _receive(archive, _with_outer_message_id(second, _outer_message_id(first)), minutes=1)
    outcomes = _worker(archive, world_ctx).run_once()
    assert [(o.disposition, o.archive_seq) for o in outcomes] == [("accepted", 0), ("accepted", 1)]


def test_a_replayed_rejection_cannot_make_a_later_submission_look_like_a_copy(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """Someone on the mail path replays an old rejected message of the agency under the outer
    Message-ID of a genuine one it has seen go by, ahead of it. The genuine one was then
    answered with the old refusal, as a duplicate, and never filed."""
    old = world.submission("H26.SNV", payload_from="H26.STP", number=1)  # rejected
    _receive(archive, old)
    [first] = _worker(archive, world_ctx).run_once()
    assert first.disposition == "rejected"
    genuine = world.submission("H26.SNV", number=2)
    _receive(archive, _with_outer_message_id(old, _outer_message_id(genuine)), minutes=1)
    _receive(archive, genuine, minutes=2)
    outcomes = _worker(archive, world_ctx, minutes=6).run_once()
    assert [(o.disposition, o.archive_seq) for o in outcomes] == [
        ("duplicate", first.archive_seq),  # the same signed message: its receipt again
        ("accepted", 1),
    ]


@pytest.mark.parametrize("batches", [1, 2])
def test_a_payload_message_id_used_again_for_another_document_is_rejected(
    archive: Archive, world: DemoWorld, world_ctx: Context, batches: int
) -> None:
    """DESIGN §5 rule 3: one (sender, MessageId), one document. Another document under the same
    MessageId is neither a duplicate (the first one's receipt would misstate what came) nor a
    second document filed under it: it is rejected, saying why, in the same batch or later."""
    scan = Attachment("danh-sach.pdf", "application/pdf", b"%PDF-1.7 scan")
    first = _document_with(world, [], [], "<first@snv.hanoi.gov.vn>")
    other = _document_with(world, [_listed(scan)], [scan], "<second@snv.hanoi.gov.vn>")
    _receive(archive, first)
    if batches == 2:
        [done] = _worker(archive, world_ctx).run_once()
        assert done.disposition == "accepted"
    _receive(archive, other, minutes=1)
    _receive(archive, other, minutes=2)  # and that message again: its refusal again
    outcomes = _worker(archive, world_ctx, minutes=6).run_once()
    assert [(o.disposition, o.archive_seq) for o in outcomes][-2:] == [
        ("rejected", 1),
        ("duplicate", 1),
    ]
    with archive.db.session(read_only=True) as s:
        [reason] = archive.log.entry(s, 1).fields["reasons"]
    assert reason["code"] == "message-id-reused"
    assert "00000000-0000-0000-0000-000000000007 was used before" in reason["message"]
    assert reason["message_vi"] == "MessageId 00000000-0000-0000-0000-000000000007"


def test_a_transient_failure_is_retried_later_and_not_filed_meanwhile(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    number = _receive(archive, world.submission("H26.SNV"))
    no_crl = dataclasses.replace(world_ctx, trust=TrustStore(anchors=(world.root.cert,)))
    [outcome] = _worker(archive, no_crl).run_once()
    assert outcome.disposition == "retry"
    with archive.db.session() as s:
        row = s.get(t.Intake, number)
        assert row is not None
        assert (row.state, row.attempts, row.archive_seq) == ("retry", 1, None)
        assert archive.log.size(s) == 0
    assert _worker(archive, world_ctx, minutes=5).run_once() == []  # not due yet
    [later] = _worker(archive, world_ctx, minutes=7).run_once()
    assert (later.disposition, later.archive_seq) == ("accepted", 0)


def test_a_claim_says_whether_it_left_a_backlog(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a claim leaves rows waiting or takes several MB (intake is backlogged), the serve
    loop builds receipts and deliveries only every few cycles; otherwise every cycle, so that
    they keep pace."""
    raw = world.submission("H26.SNV")
    for minute in range(5):
        _receive(archive, raw, minutes=minute)  # duplicates after the first: all quick to file
    worker = _worker(archive, world_ctx, minutes=10)
    assert len(worker.run_once(limit=2)) == 2 and worker.backlog  # 3 left
    assert len(worker.run_once(limit=3)) == 3 and not worker.backlog  # none left
    assert worker.run_once() == [] and not worker.backlog
    for minute in range(5, 8):
        _receive(archive, raw, minutes=minute)
    monkeypatch.setattr(worker_module, "BATCH_BYTES", len(raw))  # one message per claim
    assert len(worker.run_once()) == 1 and worker.backlog  # stopped by the byte limit
    assert len(worker.run_once()) == 1 and worker.backlog
    assert len(worker.run_once()) == 1 and not worker.backlog
    _receive(archive, raw, minutes=9)
    monkeypatch.setattr(worker_module, "BACKLOG_BYTES", len(raw))  # a batch this big: long
    assert len(worker.run_once()) == 1 and worker.backlog  # though nothing is left
    monkeypatch.undo()
    for minute in (10, 11):
        _receive(archive, raw, minutes=minute)
    monkeypatch.setattr(worker_module, "BACKLOG_ROWS", 2)  # so many messages: long too
    assert len(worker.run_once()) == 2 and worker.backlog
    assert worker.run_once() == [] and not worker.backlog  # the burst is over

    cycles = range(1, 2 * BUILD_EVERY + 1)
    steady = [build_now(backlog=False, cycle=c) for c in cycles]
    burst = [build_now(backlog=True, cycle=c) for c in cycles]
    assert all(steady)
    assert burst == [c % BUILD_EVERY == 0 for c in cycles] and sum(burst) == 2


def test_idle_polls_only_look_and_a_backlog_is_claimed_without_looking(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle worker never takes the write lock (it looks in a read-only transaction first);
    while intake is backlogged, it claims at once, without the look."""
    sessions = record_sessions(archive.db, monkeypatch)
    worker = _worker(archive, world_ctx, minutes=10)
    assert worker.run_once() == [] and sessions == [True]
    raw = world.submission("H26.SNV")
    for minute in range(3):
        _receive(archive, raw, minutes=minute)
    sessions.clear()
    assert len(worker.run_once(limit=2)) == 2 and worker.backlog
    assert sessions[:2] == [True, False]  # looked, then claimed
    sessions.clear()
    assert len(worker.run_once(limit=2)) == 1 and not worker.backlog
    assert sessions[0] is False  # claimed at once
    sessions.clear()
    assert worker.run_once() == [] and sessions == [True]  # idle again: only a look


def test_a_claim_takes_the_oldest_waiting_rows_of_every_kind(archive: Archive) -> None:
    """New rows, due retries and rows whose lease ran out are claimed oldest first, whatever
    their kind; a retry not yet due and a live claim are not. (Each kind is read from its
    own range of the state index, at most as many rows as the claim may take.)"""
    numbers = [_receive(archive, b"m%d" % i, minutes=i) for i in range(8)]
    now = WORLD_AT + timedelta(minutes=30)
    states = {
        numbers[0]: {"state": "retry", "next_attempt_at": now + timedelta(minutes=1)},
        numbers[1]: {"state": "working", "lease_until": now - timedelta(seconds=1)},
        numbers[2]: {"state": "retry", "next_attempt_at": now},
        numbers[3]: {"state": "working", "lease_until": now + timedelta(minutes=1)},
        numbers[5]: {"state": "done"},
    }
    with archive.db.session() as s:
        for number, values in states.items():
            s.execute(sqlalchemy.update(t.Intake).where(t.Intake.id == number).values(values))
    with archive.db.session() as s:
        assert worker_module.claim(s, "w", now, 3) == ([numbers[1], numbers[2], numbers[4]], True)
    with archive.db.session() as s:
        assert worker_module.claim(s, "w", now, 3) == ([numbers[6], numbers[7]], False)
    with archive.db.session() as s:
        assert worker_module.claim(s, "w", now, 3) == ([], False)


def test_workers_claim_their_share_of_a_backlog_of_big_messages(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = world.submission("H26.SNV")
    for minute in range(5):
        _receive(archive, raw, minutes=minute)
    # Make these "big": the share floor is one message's size.
    monkeypatch.setattr(worker_module, "SHARE_BYTES", len(raw))
    one, other = _worker(archive, world_ctx, minutes=10), _worker(archive, world_ctx, minutes=10)
    one.peers = other.peers = 2
    assert len(one.run_once()) == 3  # of 5 waiting, half rounded up
    assert one.backlog
    assert len(other.run_once()) == 1  # of 2, half
    assert len(other.run_once()) == 1  # the last: the floor is one message
    assert not other.backlog
    alone = _worker(archive, world_ctx, minutes=10)
    for minute in range(20, 24):
        _receive(archive, raw, minutes=minute)
    assert len(alone.run_once()) == 4  # one worker takes what it sees
    monkeypatch.undo()
    for minute in range(30, 34):
        _receive(archive, raw, minutes=minute)
    one.run_once()
    with archive.db.session() as s:  # small messages: all at once, as before
        assert s.query(t.Intake).filter(t.Intake.state != "done").count() == 0


# --- a message our own code fails on -------------------------------------------------------


def test_a_message_that_cannot_be_filed_is_quarantined_and_the_rest_go_on(
    archive: Archive,
    world: DemoWorld,
    world_ctx: Context,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A defect that makes one entry unwritable (here: text UTF-8 cannot hold, taken from the
    message, as a UTF-7 Subject once was) quarantines that message with its bytes; the batch it
    came in is filed one by one instead of failing again and again."""
    poison = world.submission("H26.SNV", number=2)
    real = worker_module.message_item

    def faulty(verdict: Any, raw: bytes, transport: Transport) -> Any:
        item = real(verdict, raw, transport)
        if raw == poison and verdict.subject is not None:
            return dataclasses.replace(item, fields={**item.fields, "subject": "\ud800"})
        return item

    monkeypatch.setattr(worker_module, "message_item", faulty)
    numbers = [
        _receive(archive, m)
        for m in (world.submission("H26.SNV"), poison, world.submission("H26.SNV", number=3))
    ]
    outcomes = _worker(archive, world_ctx).run_once()
    assert [(o.intake_id, o.disposition) for o in outcomes] == list(
        zip(numbers, ["accepted", "quarantined", "accepted"], strict=True)
    )
    with archive.db.session() as s:
        assert {r.state for r in s.query(t.Intake)} == {"done"}
        seq = s.get(t.Intake, numbers[1]).archive_seq  # type: ignore[union-attr]
        entry = archive.log.entry(s, seq)
        assert entry.fields["status"] == "quarantined"
        assert [r["code"] for r in entry.fields["reasons"]] == ["internal-error"]
        assert "UnicodeEncodeError" in entry.fields["reasons"][0]["message"]
        assert archive.blobs.get(s, entry.blobs["raw"]) == poison  # nothing is lost
    assert archive.verify().ok
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert f"intake {numbers[1]}" in record.getMessage() and record.exc_info is not None


def test_a_damaged_database_met_while_filing_blames_no_message(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite reports a damaged page while a batch is filed: that is the database's trouble,
    not the messages'. The worker gives its claim back, uncounted, and the batch is filed as it
    should be once the database is mended (here: the next try), never quarantined."""
    numbers = [_receive(archive, world.submission("H26.SNV", number=n)) for n in (1, 2)]
    real, tries = Worker._file, []

    def damaged_once(self: Worker, *args: Any) -> Any:
        tries.append(1)
        if len(tries) == 1:
            malformed = sqlite3.DatabaseError("database disk image is malformed")
            raise DatabaseError("INSERT INTO log_entries …", {}, malformed)
        return real(self, *args)

    monkeypatch.setattr(Worker, "_file", damaged_once)
    clock = [WORLD_AT + timedelta(minutes=5)]
    worker = Worker(archive, lambda: world_ctx, clock=lambda: clock[0], name="w")
    with pytest.raises(DatabaseDamaged, match="is damaged"):
        worker.run_once()
    outcomes = worker.run_once()  # at once, together: not counted against them
    assert [(o.intake_id, o.disposition) for o in outcomes] == [(n, "accepted") for n in numbers]


def test_a_defect_in_a_pipeline_step_quarantines_only_that_message(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = world.submission("H26.SNV", number=2)

    def payload(w: Any) -> None:
        if w.raw == poison:
            raise KeyError("a bug, holding the message's \ud800 text")
        original(w)

    steps = list(pipeline.STEPS)
    index = [s.name for s in steps].index("payload")
    original = steps[index].run
    steps[index] = dataclasses.replace(steps[index], run=payload)
    monkeypatch.setattr(pipeline, "STEPS", tuple(steps))

    verdict = pipeline.process(poison, world_ctx, at=WORLD_AT)
    assert verdict.disposition == "quarantined"  # though the sender was authenticated
    [error] = verdict.errors
    assert isinstance(error, InternalError) and isinstance(error.__cause__, KeyError)
    assert "step payload" in error.message and "\ud800" not in error.message
    assert [s.outcome for s in verdict.steps][index:] == ["failed"] + ["skipped"] * (
        len(steps) - index - 1
    )

    numbers = [_receive(archive, m) for m in (poison, world.submission("H26.SNV"))]
    outcomes = _worker(archive, world_ctx).run_once()
    assert [(o.intake_id, o.disposition) for o in outcomes] == list(
        zip(numbers, ["quarantined", "accepted"], strict=True)
    )
    with archive.db.session() as s:
        assert archive.log.size(s) == 2
        quarantined = archive.log.entry(s, outcomes[0].archive_seq)  # type: ignore[arg-type]

    # The defect fixed, the admin releases it: decided anew, not taken for a copy of itself.
    monkeypatch.undo()  # the real steps again
    with archive.db.session() as s:
        intake.release(s, quarantined.seq, quarantined.fields, poison, at=WORLD_AT, actor="t")
    [again] = _worker(archive, world_ctx).run_once()
    assert again.disposition == "accepted"


def test_the_worker_loop_outlives_a_defect(
    archive: Archive, world_ctx: Context, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception of no known kind is logged with its traceback and tried again after a
    back-off; the worker process does not exit (the supervisor would restart it into the same
    failure, again and again)."""
    stop = threading.Event()
    calls: list[str] = []
    worker = _worker(archive, world_ctx)

    def run_once(limit: int = 32) -> list[Any]:
        calls.append("worker")
        if len(calls) == 1:
            raise RuntimeError("a defect")
        stop.set()
        return []

    class Builder:  # stands in for the outbound builder: this test is about the loop
        def run_once(self) -> int:
            calls.append("builder")
            return 0

    worker.run_once = run_once  # type: ignore[method-assign]
    stop_wait = stop.wait
    stop.wait = lambda timeout=None: stop_wait(0)  # type: ignore[method-assign]  # no real back-off
    worker_process.work(worker, Builder(), stop, 0)  # type: ignore[arg-type]
    assert calls == ["worker", "worker", "builder"]
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "unexpected failure" in record.getMessage() and record.exc_info is not None


class _Cycles:
    """Stands in for the worker in the watchdog tests: each cycle runs ``step`` once, and
    ``cycles`` cycles end the loop."""

    def __init__(self, step: Any, stop: threading.Event, cycles: int) -> None:
        self.step, self.stop, self.left = step, stop, cycles
        self.backlog = False

    def run_once(self) -> list[Any]:
        self.step()
        self.left -= 1
        if self.left <= 0:
            self.stop.set()
        return []


def _loop_in_a_child(step: Any, cycles: int, hung_after: float, err: Path) -> tuple[int, str]:
    """Run a worker's loop (forked, its standard error to ``err``) whose cycles each run
    ``step``; its exit status and what it wrote, or -1 if it had not ended in 30 s."""
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            worker_process.HUNG_AFTER = hung_after
            stop = threading.Event()
            worker_process.work(_Cycles(step, stop, cycles), _Idle(), stop, 0)  # type: ignore[arg-type]
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), err.read_text(errors="replace")
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1, err.read_text(errors="replace")


def test_a_worker_stuck_in_a_cycle_ends_itself_with_its_tracebacks(tmp_path: Path) -> None:
    """A cycle that never returns (here a loop without end) held its worker, and a core, for
    ever: the supervisor restarts only workers that exit. The watchdog ends the process and
    says where it was stuck; the claims it held are given back and counted."""

    def stuck_for_good() -> None:
        while True:
            pass

    code, err = _loop_in_a_child(stuck_for_good, cycles=1, hung_after=1.0, err=tmp_path / "e")
    assert code == 1, err
    assert "Timeout" in err and "stuck_for_good" in err


def test_a_worker_whose_cycles_all_end_is_never_taken_for_stuck(tmp_path: Path) -> None:
    """Cycles of 0.3 s for 3 s under a watchdog of 1 s: each cycle arms it again."""
    code, err = _loop_in_a_child(
        lambda: time.sleep(0.3), cycles=10, hung_after=1.0, err=tmp_path / "e"
    )
    assert (code, err) == (0, "")


def _die_on(archive: Archive, ctx: Context, poison: bytes) -> int:
    """One cycle of a worker process (forked) that dies on ``poison`` as it would under the
    OOM killer or a crash in a native library: no exception, no clean-up. Its exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            archive.db.engine.dispose(close=False)  # the parent's connections are not ours
            real = worker_module.process

            def process(raw: bytes, context: Any, *, at: Any) -> Any:
                if raw == poison:
                    os._exit(137)
                return real(raw, context, at=at)

            worker_module.process = process  # type: ignore[assignment]
            _worker(archive, ctx).run_once()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_message_that_kills_its_worker_is_set_aside_and_stops_no_other(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """Each death puts the worker's claim back (the supervisor's sweep); a message claimed
    without a decision is claimed alone next time, and after MAX_CLAIMS quarantined unchecked.
    It was claimed again for ever, with the batch claimed with it: none of them was filed."""
    poison = world.submission("H26.SNV", number=1)
    good = world.submission("H26.SNV", number=2)
    numbers = [_receive(archive, poison), _receive(archive, good)]
    exits = []
    for _ in range(worker_module.MAX_CLAIMS + 2):
        exits.append(_die_on(archive, world_ctx, poison))
        release_stale_claims(archive.db, this_host())  # the supervisor's sweep
    # Claimed with the good one, then alone twice; then set aside; then the good one, alone.
    assert exits == [137] * worker_module.MAX_CLAIMS + [0, 0]
    with archive.db.session(read_only=True) as s:
        rows = {r.id: (r.state, r.claims) for r in s.scalars(select(t.Intake))}
        entries = {seq: e.fields for seq, e in archive.log.entries(s, [0, 1]).items()}
    assert rows == {numbers[0]: ("done", 0), numbers[1]: ("done", 0)}
    set_aside, filed = entries[0], entries[1]
    assert set_aside["status"] == "quarantined" and filed["status"] == "accepted"
    [reason] = set_aside["reasons"]
    assert reason["code"] == "internal-error"
    assert "stopped 3 times before deciding it" in reason["message"]


def test_a_batch_the_database_failed_gives_its_claim_back_uncounted(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filing fails 4 times (the database locked): each claim was counted, the batch waited
    for its lease, and after 3 the messages were quarantined unchecked ("the worker checking
    it stopped 3 times") though no worker stopped: a database outage of a few leases set aside
    everything in hand. A worker that lives on gives its claims back uncounted."""
    number = _receive(archive, world.submission("H26.SNV"))
    worker = _worker(archive, world_ctx)
    real = worker._file

    def locked(*_args: Any, **_kw: Any) -> Any:
        raise sqlalchemy.exc.OperationalError("INSERT …", {}, Exception("database is locked"))

    monkeypatch.setattr(worker, "_file", locked)
    for _ in range(worker_module.MAX_CLAIMS + 1):
        with pytest.raises(ENVIRONMENT):
            worker.run_once()
        with archive.db.session(read_only=True) as s:
            row = s.get(t.Intake, number)
            assert row is not None and (row.state, row.claims) == ("new", 0)
    monkeypatch.setattr(worker, "_file", real)
    [outcome] = worker.run_once()
    assert outcome.disposition == "accepted"


def test_a_message_that_raises_every_time_is_set_aside_and_holds_up_no_other(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message whose filing raises every time, past the worker's own fallbacks (here: even
    its item of bytes alone cannot be made): its claim counts and waits for its lease, and the
    message behind it is filed meanwhile, not failed with it every cycle."""
    poison, good = (world.submission("H26.SNV", number=n) for n in (1, 2))
    _receive(archive, poison)
    good_number = _receive(archive, good, minutes=1)
    real = worker_module.message_item

    def item(verdict: Any, raw: bytes, transport: Any) -> Any:
        if raw == poison:
            raise MemoryError("making its item")
        return real(verdict, raw, transport)

    monkeypatch.setattr(worker_module, "message_item", item)
    clock = [WORLD_AT + timedelta(minutes=5)]
    worker = Worker(archive, lambda: world_ctx, clock=lambda: clock[0], name="w")
    done: dict[int, str] = {}
    for _ in range(20):  # cycles 30 s apart: the first batch's claims run out after 2 minutes
        with contextlib.suppress(MemoryError):
            done.update((o.intake_id, o.disposition) for o in worker.run_once())
        clock[0] += timedelta(seconds=30)
    assert done.get(good_number) == "accepted"


def test_a_context_that_cannot_be_loaded_claims_nothing(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """Keys, trust or a directory that cannot be loaded is no message's doing: the worker
    fails before it claims, and no claim counts against the messages waiting."""
    number = _receive(archive, world.submission("H26.SNV"))

    def unloadable() -> Context:
        raise ConfigError("the hub's key file cannot be read")

    worker = Worker(archive, unloadable, clock=lambda: WORLD_AT + timedelta(minutes=5))
    for _ in range(worker_module.MAX_CLAIMS + 1):
        with pytest.raises(ConfigError):
            worker.run_once()
    with archive.db.session(read_only=True) as s:
        row = s.get(t.Intake, number)
        assert row is not None and (row.state, row.claims) == ("new", 0)
    worker.context = lambda: world_ctx
    [outcome] = worker.run_once()
    assert outcome.disposition == "accepted"


def test_a_claim_the_whole_service_stopped_with_does_not_count_against_the_message(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """At start-up, claims held by the previous run's workers are given back without counting:
    kill -9 of the service (or a power cut) is not the messages' doing."""
    number = _receive(archive, world.submission("H26.SNV"))
    with archive.db.session() as s:
        worker_module.claim(s, "host:999999999", WORLD_AT, 10)  # a process that is gone
    assert release_stale_claims(archive.db, "host", at_start=True) == 1
    with archive.db.session(read_only=True) as s:
        row = s.get(t.Intake, number)
        assert row is not None and (row.state, row.claims) == ("new", 0)


class _Idle:
    """Stands in for the outbound builder in the loop tests: nothing to build."""

    def run_once(self) -> int:
        return 0


def test_the_worker_loop_outlives_a_long_database_outage(
    archive: Archive, world_ctx: Context
) -> None:
    """Back-off doubles up to 30 s: 1,100 failures in a row are ~9 hours of PostgreSQL down.
    Its arithmetic once overflowed at the 1,025th (``0.5 * 2**1025``) and the process died."""
    stop = threading.Event()
    worker = _worker(archive, world_ctx)
    waits: list[float] = []
    tries = [0]

    def run_once(limit: int = 32) -> list[Any]:
        tries[0] += 1
        if tries[0] > 1100:
            stop.set()
            return []
        raise DatabaseDamaged("the database cannot be reached")

    worker.run_once = run_once  # type: ignore[method-assign]
    stop.wait = lambda timeout=None: waits.append(timeout) or stop.is_set()  # type: ignore[method-assign,func-returns-value]
    worker_process.work(worker, _Idle(), stop, 0)  # type: ignore[arg-type]
    assert tries[0] == 1101
    assert waits[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0] and set(waits[5:1100]) == {30.0}


# --- who an accepted payload goes to -------------------------------------------------------


def _obligation(id: str, recipients: tuple[str, ...], **kw: Any) -> Obligation:
    return Obligation(
        id, "H26.SNV", recipients, kw.pop("category", "work-permit"), "monthly",
        default_due("monthly"), "QĐ 18/2017/QĐ-UBND Điều 8", **kw,
    )  # fmt: skip


def test_an_accepted_payload_goes_to_its_to_and_to_the_recipients_it_is_owed_to(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """DESIGN §5: payload To plus the obligation's recipients. The demo submission is for
    period 2026-10 (16 Sep – 15 Oct) and addressed To the police only."""
    with archive.db.session() as s:
        for agency in world.directory:
            store.add_agency(s, agency, at=WORLD_AT, actor="test")
        for ob in (
            _obligation("owed", ("H26.CATP", "H26.STP")),
            _obligation("other-category", ("H26.UBND",), category="residence-card"),
            _obligation("ended", ("H26.UBND",), valid_to=date(2026, 9, 30)),
        ):
            obligation_store.add(s, ob, at=WORLD_AT, actor="test")
    _receive(archive, world.submission("H26.SNV"))
    [outcome] = _worker(archive, world_ctx).run_once()
    assert outcome.disposition == "accepted"
    with archive.db.session() as s:
        keys = sorted(s.scalars(select(t.Outbox.key)))
    seq = outcome.archive_seq
    assert keys == [f"delivery:{seq}:H26.CATP", f"delivery:{seq}:H26.STP", f"receipt:{seq}"]


def test_a_message_still_undecided_after_an_hour_is_alerted_once_a_day(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """Without a fresh CRL (hard-fail) messages that got their 250 wait; after an hour the
    admin is told, once a day whatever the number of messages, naming the first."""
    no_crl = dataclasses.replace(world_ctx, trust=TrustStore(anchors=(world.root.cert,)))
    first = _receive(archive, world.submission("H26.SNV"))

    def run(minutes: int) -> list[str]:
        at = WORLD_AT + timedelta(minutes=minutes)
        Worker(archive, lambda: no_crl, clock=lambda: at, admin="admin@hub").run_once()
        with archive.db.session() as s:
            return list(s.scalars(select(t.Outbox.key).where(t.Outbox.kind == "alert")))

    assert run(30) == []  # half an hour: not yet
    _receive(archive, world.submission("H26.SNV", number=2))
    [alert] = run(90)  # both wait; one alert
    assert alert.startswith("alert:intake-waiting:")
    assert run(200) == [alert]  # later the same day: no second one
    with archive.db.session() as s:
        text = s.scalar(select(t.Outbox.detail).where(t.Outbox.key == alert))["text"]
    assert f"intake {first}" in text and "CRL" in text


# --- released by an admin --------------------------------------------------------------------


def test_a_released_message_is_decided_again_as_of_its_arrival(
    archive: Archive, world: DemoWorld, world_ctx: Context
) -> None:
    """Quarantined because the hub did not yet trust the agencies' CA; once it does, the admin
    releases the entry: it is decided again, at its original time of receipt, and accepted."""
    other = make_root("Some Other Root", at=WORLD_AT - timedelta(days=30)).cert
    untrusting = dataclasses.replace(world_ctx, trust=TrustStore(anchors=(other,)))
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    [first] = _worker(archive, untrusting).run_once()
    assert first.disposition == "quarantined" and first.archive_seq is not None

    with archive.db.session() as s:
        entry = archive.log.entry(s, first.archive_seq)
        released = intake.release(
            s, first.archive_seq, entry.fields, raw, at=WORLD_AT + timedelta(days=1), actor="t"
        )
    with archive.db.session() as s:  # twice: the same row, nothing new
        again = intake.release(
            s, first.archive_seq, entry.fields, raw, at=WORLD_AT + timedelta(days=2), actor="t"
        )
    assert released[1] and again == (released[0], False)

    [second] = _worker(archive, world_ctx, minutes=60 * 24 + 5).run_once()
    assert (second.intake_id, second.disposition) == (released[0], "accepted")
    with archive.db.session() as s:
        fields = archive.log.entry(s, second.archive_seq).fields  # type: ignore[arg-type]
        events = [e.action for e in store.events(s)]
        with pytest.raises(InputError, match="only a quarantined message is released"):
            intake.release(s, second.archive_seq, fields, raw, at=WORLD_AT, actor="t")  # type: ignore[arg-type]
    assert fields["transport"]["received_at"] == entry.fields["transport"]["received_at"]
    assert fields["transport"]["released_from"] == str(first.archive_seq)
    assert events == ["release"]


def test_a_message_quarantined_while_filing_records_no_keys_and_is_released_anew(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted, then its entry refused by the database: filed quarantined with its bytes
    alone. It recorded the replay keys of the verdict it had before (accepted), so when the
    admin released it, it was answered as a duplicate of its own quarantine entry, never
    decided again."""
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    real = archive.file_in

    def refuse_accepted(s: Any, items: Any, *, at: Any) -> Any:
        if any(i.fields.get("status") == "accepted" for i in items):
            raise sqlalchemy.exc.IntegrityError("INSERT …", {}, Exception("a constraint"))
        return real(s, items, at=at)

    monkeypatch.setattr(archive, "file_in", refuse_accepted)
    [first] = _worker(archive, world_ctx).run_once()
    assert first.disposition == "quarantined" and first.archive_seq is not None
    with archive.db.session(read_only=True) as s:
        assert s.scalar(select(sqlalchemy.func.count()).select_from(t.Seen)) == 0
    monkeypatch.setattr(archive, "file_in", real)
    with archive.db.session() as s:
        entry = archive.log.entry(s, first.archive_seq)
        intake.release(s, first.archive_seq, entry.fields, raw, at=WORLD_AT, actor="t")
    [second] = _worker(archive, world_ctx, minutes=10).run_once()
    assert second.disposition == "accepted" and second.archive_seq != first.archive_seq


def test_a_batch_that_fails_to_file_judges_its_messages_again_as_they_were(
    archive: Archive, world: DemoWorld, world_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two documents under one MessageId in one batch: the second is refused as a reuse. The
    database then refuses the first one's entry and the batch is filed one by one: the first
    quarantined, and the second still refused for a MessageId that nothing filed holds. It is
    judged again as it was: accepted."""
    scan = Attachment("danh-sach.pdf", "application/pdf", b"%PDF-1.7 scan")
    first = _document_with(world, [], [], "<first@snv.hanoi.gov.vn>")
    other = _document_with(world, [_listed(scan)], [scan], "<second@snv.hanoi.gov.vn>")
    _receive(archive, first)
    _receive(archive, other, minutes=1)
    first_digest = hashlib.sha256(first).hexdigest()
    real = archive.file_in

    def refuse_first(s: Any, items: Any, *, at: Any) -> Any:
        if any(
            i.fields.get("digest") == first_digest and i.fields.get("status") != "quarantined"
            for i in items
        ):
            raise sqlalchemy.exc.IntegrityError("INSERT …", {}, Exception("a constraint"))
        return real(s, items, at=at)

    monkeypatch.setattr(archive, "file_in", refuse_first)
    outcomes = _worker(archive, world_ctx).run_once()
    assert [o.disposition for o in outcomes] == ["quarantined", "accepted"]


def test_a_message_id_reused_refusal_sent_again_is_its_copy(
    archive: Archive, world: DemoWorld, world_ctx: Context, caplog: pytest.LogCaptureFixture
) -> None:
    """A document refused for a MessageId its sender used before, sent again as it was: the
    pipeline accepts it (the MessageId is judged at filing), so it was no copy of its refusal,
    was refused again, and recorded its copy key again: the database refused the row, and the
    message was quarantined as a defect. It is a copy of its refusal: the old receipt again."""
    scan = Attachment("danh-sach.pdf", "application/pdf", b"%PDF-1.7 scan")
    first = _document_with(world, [], [], "<first@snv.hanoi.gov.vn>")
    other = _document_with(world, [_listed(scan)], [scan], "<second@snv.hanoi.gov.vn>")
    _receive(archive, first)
    [accepted] = _worker(archive, world_ctx).run_once()
    assert accepted.disposition == "accepted"
    _receive(archive, other, minutes=1)
    [refused] = _worker(archive, world_ctx, minutes=6).run_once()
    assert refused.disposition == "rejected"
    _receive(archive, other, minutes=7)
    with caplog.at_level("ERROR"):
        [again] = _worker(archive, world_ctx, minutes=8).run_once()
    assert (again.disposition, again.archive_seq) == ("duplicate", refused.archive_seq)
    assert "ERROR" not in caplog.text


@pytest.mark.postgres
def test_two_workers_each_holding_a_copy_file_one_and_answer_the_other_on_postgresql(
    pg_cluster: pg.PgCluster,
    world: DemoWorld,
    world_ctx: Context,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agency's client sent a submission twice and two workers each claimed one copy. Each
    looks for copies under the append lock, so the second finds the first's: one filed, one
    duplicate, neither batch failing on the second's replay key (and left for its lease)."""
    name = pg_cluster.create_database("copies")
    db = Database.open(pg_cluster.url(name))
    archive = archive_on(db, world)
    raw = world.submission("H26.SNV")
    _receive(archive, raw)
    _receive(archive, raw, minutes=1)
    looked = threading.Barrier(2)
    real_seen = worker_module._seen

    def seen(s: Any, keys: list[str]) -> dict[str, int]:
        found = real_seen(s, keys)
        with contextlib.suppress(threading.BrokenBarrierError):
            looked.wait(timeout=2)  # without the lock, both look before either files
        return found

    monkeypatch.setattr(worker_module, "_seen", seen)
    workers = [
        Worker(archive, lambda: world_ctx, clock=lambda: WORLD_AT + timedelta(minutes=5), name=n)
        for n in ("host:1", "host:2")
    ]
    results: dict[str, Any] = {}

    def run(w: Worker) -> None:
        try:
            # A copy each. A claim locks one row beyond its limit while it runs, and the other
            # worker's claim skips locked rows: it may find nothing the first time.
            for _ in range(200):
                if outcomes := w.run_once(limit=1):
                    results[w.name] = [o.disposition for o in outcomes]
                    return
                time.sleep(0.01)
        except Exception as exc:  # the failure under test, reported by the assertion below
            results[w.name] = repr(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    try:
        assert sorted(map(str, results.values())) == ["['accepted']", "['duplicate']"], results
        with db.session(read_only=True) as s:
            assert set(s.scalars(select(t.Intake.state))) == {"done"}
    finally:
        db.dispose()
        pg_cluster.drop_database(name)


def _on_postgresql(pg_cluster: pg.PgCluster, world: DemoWorld, name: str) -> Archive:
    return archive_on(Database.open(pg_cluster.url(pg_cluster.create_database(name))), world)


def _file_all(archive: Archive, ctx: Context) -> tuple[dict[int, str], dict[int, str]]:
    """Workers' cycles until nothing is left, none failing: the intake rows' states and the
    statuses filed."""
    worker = Worker(archive, lambda: ctx, clock=lambda: WORLD_AT + timedelta(minutes=5))
    while worker.run_once():
        pass
    with archive.db.session(read_only=True) as s:
        states = {r.id: r.state for r in s.scalars(select(t.Intake))}
        entries = archive.log.entries(s, range(archive.log.size(s))).values()
        statuses = {e.seq: e.fields["status"] for e in entries}
    return states, statuses


@pytest.mark.postgres
def test_a_message_id_postgresql_cannot_hold_does_not_hold_up_its_batch(
    pg_cluster: pg.PgCluster, world: DemoWorld, world_ctx: Context
) -> None:
    """Anyone may send a Message-ID with a NUL, which PostgreSQL text cannot hold: the search
    column's insert failed the batch on every try, the good message claimed with it included.
    The record keeps the Message-ID as sent; the search column holds it without the NUL, and
    verify agrees."""
    archive = _on_postgresql(pg_cluster, world, "nul")
    nul = (
        b"From: vanthu@snv.hanoi.gov.vn\r\nTo: hub@exchange.hanoi.gov.vn\r\nSubject: x\r\n"
        b"Message-ID: <a\x00b@snv.hanoi.gov.vn>\r\n\r\nhello\r\n"
    )
    numbers = [_receive(archive, raw) for raw in (nul, world.submission("H26.SNV"))]
    try:
        states, statuses = _file_all(archive, world_ctx)
        assert states == dict.fromkeys(numbers, "done")
        assert sorted(statuses.values()) == ["accepted", "quarantined"]
        with archive.db.session(read_only=True) as s:
            assert archive.log.entry(s, 0).fields["message_id"] == "<a\x00b@snv.hanoi.gov.vn>"
            column = s.scalar(select(t.LogEntry.message_id).where(t.LogEntry.seq == 0))
        assert column == "<ab@snv.hanoi.gov.vn>"
        report = archive.verify()
        assert not report.problems, report.problems
    finally:
        archive.db.dispose()


@pytest.mark.postgres
def test_a_row_the_database_refuses_is_the_messages_doing_and_stops_no_other(
    pg_cluster: pg.PgCluster, world: DemoWorld, world_ctx: Context
) -> None:
    """The database refusing one message's row (here a CHECK an administrator added) is not
    the database's trouble, to wait out: the batch is filed one by one and the message that
    cannot be is quarantined with only its bytes, at once. The batch failed instead, and
    waited for its lease, again and again."""
    archive = _on_postgresql(pg_cluster, world, "check")
    with archive.db.session() as s:
        s.execute(
            sqlalchemy.text(
                "ALTER TABLE log_entries ADD CONSTRAINT no_poison "
                "CHECK (message_id IS NULL OR message_id NOT LIKE '%poison%')"
            )
        )
    poison = b"From: a@b.example\r\nMessage-ID: <poison@b.example>\r\n\r\nhello\r\n"
    numbers = [_receive(archive, raw) for raw in (poison, world.submission("H26.SNV"))]
    try:
        states, statuses = _file_all(archive, world_ctx)
        assert states == dict.fromkeys(numbers, "done")
        assert sorted(statuses.values()) == ["accepted", "quarantined"]
    finally:
        archive.db.dispose()
