"""Two ``gateway serve`` instances on one PostgreSQL behind a real Postfix MX (deploy/postfix:
"Several gateway instances"), as a city runs them.

A burst of a few thousand signed, encrypted submissions goes into Postfix with smtplib; Postfix
hands each to the first instance over LMTP, or to the second when the first does not answer.
Both instances' workers claim the intake from the shared database, and both schedulers run the
day's reminders at start-up. The first instance is killed with SIGKILL mid-burst: Postfix
retries what it was handing over with the second, which finishes everything. Then: every
submission is filed once as a message (Postfix's retries are filed as duplicates), the Merkle
log verifies, every sender has its receipt, and each reminder reached its agency exactly once.
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from gateway import obligation_store
from gateway.demo import DemoWorld
from gateway.workdays import VN_TZ, Calendar
from tests import pg, postfix, served, servers

pytestmark = [pytest.mark.postgres, pytest.mark.interop, pytest.mark.slow]

SNV = "vanthu@snv.hanoi.gov.vn"
BURST = 2000
#: Bodies the work-permit obligation of the preset also owes Home Affairs' reports to (Điều
#: 8.2.c), with no certificate in the demo world: their deliveries fail.
UNCERTIFIED = ("H26.SCT", "H26.SYT", "H26.SGDDT", "H26.SVHTT", "H26.SDL", "H26.SKHCN", "H26.CCTKV1")
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)
_QUEUED = re.compile(r": queued as \d+ \(")
_REMINDERS = re.compile(r"reminders: (\d+) owed, (\d+) queued")


@pytest.fixture
def pg_url(pg_cluster: pg.PgCluster) -> Iterator[str]:
    name = pg_cluster.create_database("instances_mx")
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


def message_id(raw: bytes) -> str:
    found = _MESSAGE_ID.search(raw.split(b"\r\n\r\n", 1)[0])
    assert found is not None, raw[:300]
    return found.group(1).decode()


def working_today(home: Path, today: date | None = None) -> str:
    """``[compliance]`` settings for ``home`` that make today (in Hanoi) a working day, so that
    the schedulers run the day's reminders at start-up whatever the date of the test run."""
    today = today or datetime.now(VN_TZ).date()
    if Calendar.load().is_working_day(today):
        return ""
    day = {d.date: d for d in Calendar.load().year_table(today.year).days}.get(today)
    if day is not None and day.entry is not None:  # a day off of the shipped overlay
        return f'exclude = "{day.entry}"\n'
    # A make-up Saturday or Sunday in force; or a package holiday the law does not grant.
    kind, status = ("workday", "law") if today.weekday() >= 5 else ("not-a-holiday", "not-yet-law")
    (home / "overlay.toml").write_text(
        'name = "test"\n[[entry]]\nid = "test-working-today"\n'
        f'date = {today.isoformat()}\nkind = "{kind}"\nstatus = "{status}"\n'
        'name = "A working day for the test"\nsource = "tests/test_instances_mx.py"\n',
        encoding="utf-8",
    )
    return 'overlay = "overlay.toml"\n'


def reminder_runs(log: Path) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in _REMINDERS.findall(log.read_text(errors="replace"))]


def test_two_instances_behind_postfix_share_a_burst_and_send_each_reminder_once(
    pg_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sink = served.Relay()
    controller, sink_port = sink.start()
    lmtp = [servers.free_port(), servers.free_port()]
    mx = postfix.start_or_skip(
        lmtp_port=lmtp[0],
        more_lmtp_ports=lmtp[1:],
        relay_port=sink_port,
        # Deferred mail (the hand-over cut by the kill) is retried within seconds, not minutes.
        extra={"minimal_backoff_time": "1s", "maximal_backoff_time": "2s", "queue_run_delay": "1s"},
    )
    instances: list[served.Served] = []
    db: Database | None = None
    try:
        now = datetime.now(UTC)
        world = DemoWorld.create(now)
        world.install(
            home,
            b"throw-away passphrase",
            relay_port=mx.port,
            database_url=pg_url,
            preset="hanoi",
            extra_config=f'\n[compliance]\nremind_at = "00:00"\n{working_today(home)}',
        )
        db = Database.open(pg_url, migrate=False)
        with db.session() as s:
            obligation_store.load_preset(
                s, obligation_store.preset("hanoi-2017"), source="test", at=now, actor="test"
            )
        messages = [world.submission("H26.SNV") for _ in range(BURST)]
        for i, port in enumerate(lmtp):
            instances.append(
                served.start(home, "--smtp", "", "--lmtp", f"{postfix.HOST}:{port}", name=f"i{i}")
            )

        def arrived() -> int:
            assert db is not None
            with db.session(read_only=True) as s:
                return int(s.scalar(select(func.count()).select_from(t.Intake)) or 0)

        def reminders_sent() -> bool:
            assert db is not None
            with db.session(read_only=True) as s:
                states = collections.Counter(
                    s.scalars(select(t.Outbox.state).where(t.Outbox.kind == "reminder"))
                )
            return bool(states) and set(states) == {"sent"}

        deadline = time.monotonic() + 120
        while not reminders_sent():  # both schedulers ran the day's reminders at start-up
            assert time.monotonic() < deadline, served.counts(db)
            time.sleep(0.05)
        replies: list[postfix.Submitted] = []
        pushing = threading.Thread(
            target=lambda: replies.extend(
                postfix.burst(mx.port, messages, mail_from=SNV, connections=8, per_connection=50)
            )
        )
        pushing.start()
        deadline = time.monotonic() + 300
        while arrived() < BURST // 3:
            assert time.monotonic() < deadline, served.counts(db)
            time.sleep(0.01)
        instances[0].kill()  # mid-burst: Postfix goes on with the second instance
        pushing.join(timeout=600)
        assert not pushing.is_alive()
        assert [r.code for r in replies] == [250] * BURST
        deadline = time.monotonic() + 600
        while True:  # Postfix's queue empties and the gateway settles, both at once
            mx.wait_queue_empty(timeout=600)
            settled = served.wait_until_settled(db, timeout=600)
            if not mx.queue():
                break
            assert time.monotonic() < deadline, mx.queue()

        with db.session(read_only=True) as s:
            rows = s.execute(select(t.LogEntry.kind, t.LogEntry.message_id)).all()
            reminders = s.scalars(select(t.Outbox.message).where(t.Outbox.kind == "reminder"))
            reminder_ids = [message_id(m) for m in reminders if m is not None]
        filed_once = collections.Counter(mid for kind, mid in rows if kind == "message")
        submitted = [message_id(m) for m in messages]
        # Every submission is in the archive exactly once as a message, nothing else is.
        assert sorted(filed_once.elements()) == sorted(submitted)
        # Both instances took mail in from Postfix (the second after the kill at least).
        taken = [len(_QUEUED.findall(i.log.read_text(errors="replace"))) for i in instances]
        assert all(taken) and sum(taken) <= settled["intake:done"], (taken, settled)
        # Every sender got its receipt (the killed instance may have sent a few twice). What
        # failed is only what Điều 8.2.c owes to bodies that have no certificate in this world.
        with db.session(read_only=True) as s:
            failed = set(
                s.execute(
                    select(t.Outbox.kind, t.Outbox.organ_id).where(t.Outbox.state == "failed")
                )
            )
        assert failed == {("delivery", o) for o in UNCERTIFIED}, failed
        assert len(sink.to(SNV)) >= BURST, (len(sink.to(SNV)), settled)
        # Each reminder reached its agency exactly once, however many schedulers ran.
        assert reminder_ids, "no reminder was owed today: the test shows nothing"
        at_sink = collections.Counter(message_id(m) for _f, _r, m in sink.received)
        assert {mid: at_sink[mid] for mid in reminder_ids} == dict.fromkeys(reminder_ids, 1)
        runs = [reminder_runs(i.log) for i in instances]
        assert all(runs), [i.log.read_text()[-2000:] for i in instances]  # both schedulers ran
        assert sum(queued for r in runs for _owed, queued in r) == len(reminder_ids)
        verify = served.gateway(home, "archive", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        for instance in instances:
            with contextlib.suppress(Exception):
                instance.stop()
        if db is not None:
            db.dispose()
        mx.stop()
        controller.stop()


@pytest.mark.parametrize(
    "day",
    [
        None,  # the day of the run
        date(2026, 11, 22),  # a Sunday
        date(2026, 9, 2),  # National Day (a holiday of the package)
        date(2026, 8, 31),  # a day off of the shipped overlay (the proposed swap)
        date(2026, 11, 23),  # a working day already
    ],
)
def test_working_today_makes_the_day_a_working_day(day: date | None, tmp_path: Path) -> None:
    settings = working_today(tmp_path, day)
    today = day or datetime.now(VN_TZ).date()
    exclude = re.findall(r'exclude = "([^"]+)"', settings)
    overlay = tmp_path / "overlay.toml" if "overlay" in settings else None
    assert Calendar.load(exclude=exclude, extra_overlay=overlay).is_working_day(today)
