"""Reminders: planned from the status (pure), queued once however often the run repeats, built
signed (and encrypted to the agency), filed and sent."""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func, select

from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database
from archive.records import Transport
from archive.service import Archive
from formats.errors import ConfigError
from formats.payload import Organ
from gateway import intake, obligation_store
from gateway import settings as settings_mod
from gateway.builder import Builder, Hub
from gateway.demo import DemoWorld
from gateway.obligations import DueRule, Obligation
from gateway.remind import load_templates, run, templates_of
from gateway.reminders import Policy
from gateway.workdays import Calendar
from gateway.worker import Worker
from keys import store
from keys.directory import Directory

CAL = Calendar.load()
HUB = "hub@exchange.hanoi.gov.vn"
#: Period 2026-10 (16 Sep – 15 Oct 2026); 5 working days after 15 Oct (Thu) → due Thu 22 Oct.
OBLIGATION = Obligation(
    "test-8.2.c-snv-work-permit",
    "H26.SNV",
    ("H26.CATP",),
    "work-permit",
    "monthly",
    DueRule.working_days_after(5),
    "QĐ 18/2017/QĐ-UBND Điều 8.2.c",
    valid_from=date(2026, 9, 16),  # its first period is 2026-10
)


def _at(day: date, hour: int = 8) -> datetime:
    return datetime(day.year, day.month, day.day, hour - 7, 0, tzinfo=UTC)  # 08:00 in Hanoi


@pytest.fixture(scope="module")
def live_world() -> DemoWorld:
    return DemoWorld.create(datetime(2026, 10, 17, tzinfo=UTC))  # its CRL is fresh until 24 Oct


@pytest.fixture
def archive(tmp_path: Path, live_world: DemoWorld) -> Archive:
    key = live_world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    at = live_world.at
    with db.session() as s:
        for agency in _directory(live_world):
            store.add_agency(s, agency, at=at, actor="test")
        for organ_id, issued in live_world.agencies.items():
            store.add_certificate(
                s, issued.cert, role="agency", organ_id=organ_id, at=at, actor="t"
            )
        obligation_store.add(s, OBLIGATION, at=at, actor="test")
    return Archive(db, BlobStore(os.urandom(32)), HUB, (live_world.hub.cert, key), 1000)


def _directory(world: DemoWorld) -> Directory:
    """The demo's agencies; the People's Committee gets a mailbox (escalations go there)."""
    return Directory.of(
        [
            dataclasses.replace(a, emails=frozenset({"vanphong@hanoi.gov.vn"}))
            if a.organ_id == "H26.UBND"
            else a
            for a in world.directory
        ]
    )


def _run(archive: Archive, world: DemoWorld, at: datetime, **kw: object) -> tuple[int, int]:
    result = run(
        archive.db, calendar=CAL, directory=_directory(world), templates=load_templates(),
        policy=Policy(), hub=HUB, now=at, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return len(result.planned), len(result.queued)


def _keys(archive: Archive) -> list[str]:
    with archive.db.session(read_only=True) as s:
        return sorted(s.scalars(select(t.Outbox.key).where(t.Outbox.kind == "reminder")))


def test_the_calendar_puts_this_due_date_where_the_tests_expect_it() -> None:
    from gateway.obligations import due_date, periods

    [period] = periods(OBLIGATION, date(2026, 10, 15), date(2026, 10, 15))
    assert (period.first, period.last) == (date(2026, 9, 16), date(2026, 10, 15))
    assert due_date(OBLIGATION, period, CAL) == date(2026, 10, 22)


def test_a_month_of_reminders_each_sent_once(archive: Archive, live_world: DemoWorld) -> None:
    # too early for a courtesy notice (more than 2 working days before the due date)
    assert _run(archive, live_world, _at(date(2026, 10, 16))) == (0, 0)
    # Tue 20 Oct: 2 working days before Thu 22 Oct → courtesy, once however often it runs
    assert _run(archive, live_world, _at(date(2026, 10, 20))) == (1, 1)
    assert _run(archive, live_world, _at(date(2026, 10, 20), 15)) == (1, 0)
    # Fri 23 Oct: a day late → late notice
    assert _run(archive, live_world, _at(date(2026, 10, 23))) == (1, 1)
    # Fri 30 Oct: 6 working days late → escalation to the supervisor (the People's Committee).
    # A dry run first: it names only what would be new (not the late notice sent already),
    # and queues nothing.
    before = _keys(archive)
    assert _run(archive, live_world, _at(date(2026, 10, 30)), dry_run=True) == (2, 1)
    assert _keys(archive) == before
    planned, queued = _run(archive, live_world, _at(date(2026, 10, 30)))
    assert (planned, queued) == (2, 1)
    assert _keys(archive) == [
        "reminder:courtesy:test-8.2.c-snv-work-permit:2026-10",
        "reminder:escalation:test-8.2.c-snv-work-permit:2026-10",
        "reminder:late:test-8.2.c-snv-work-permit:2026-10",
    ]
    with archive.db.session(read_only=True) as s:
        escalation = s.scalar(select(t.Outbox).where(t.Outbox.key.like("reminder:escalation:%")))
        assert escalation is not None and escalation.organ_id == "H26.UBND"
        assert "6 ngày làm việc" in escalation.detail["text"]


def test_no_agency_that_has_ceased_is_reminded_nor_escalated_to(
    archive: Archive, live_world: DemoWorld
) -> None:
    """Agencies merged away (the district committees ended 30 June 2025) were sent late
    notices for ever, each refused at building with an admin alert; a supervisor that has
    ceased was escalated to. The status report still shows the gap."""
    at, ended = _at(date(2026, 10, 30)), date(2026, 10, 25)

    def planned(directory: Directory) -> list[str]:
        result = run(
            archive.db, calendar=CAL, directory=directory, templates=load_templates(),
            policy=Policy(), hub=HUB, now=at, dry_run=True,
        )  # fmt: skip
        return sorted(r.key for r in result.planned)

    def ceased(organ_id: str) -> Directory:
        return Directory.of(
            [dataclasses.replace(a, valid_to=ended) if a.organ_id == organ_id else a
             for a in _directory(live_world)]
        )  # fmt: skip

    assert planned(_directory(live_world)) == [
        "reminder:escalation:test-8.2.c-snv-work-permit:2026-10",
        "reminder:late:test-8.2.c-snv-work-permit:2026-10",
    ]
    assert planned(ceased("H26.SNV")) == []
    assert planned(ceased("H26.UBND")) == ["reminder:late:test-8.2.c-snv-work-permit:2026-10"]


def test_runs_at_the_same_time_queue_each_reminder_once(
    archive: Archive, live_world: DemoWorld
) -> None:
    at = _at(date(2026, 10, 23))
    results: list[tuple[int, int]] = []
    threads = [
        threading.Thread(target=lambda: results.append(_run(archive, live_world, at)))
        for _ in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(q for _p, q in results) == 1
    assert len(_keys(archive)) == 1


def test_a_run_that_crashes_queues_nothing_and_the_next_one_everything(
    archive: Archive, live_world: DemoWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import outbound

    calls = {"n": 0}
    real = outbound.alert

    def crash(*args: object, **kw: object) -> t.Outbox:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in the middle of queuing
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(outbound, "alert", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(archive, live_world, _at(date(2026, 10, 30)))
    assert _keys(archive) == []  # one transaction: all or nothing
    monkeypatch.setattr(outbound, "alert", real)
    assert _run(archive, live_world, _at(date(2026, 10, 30))) == (2, 2)


def test_an_on_time_submission_silences_the_reminders(
    archive: Archive, live_world: DemoWorld
) -> None:
    raw = live_world.submission("H26.SNV")  # the demo's work permits for period 2026-10
    received = _at(date(2026, 10, 19))
    intake.accept(archive.db, raw, Transport(received, "smtp", "127.0.0.1"))
    ctx = live_world.context()
    [outcome] = Worker(archive, lambda: ctx, clock=lambda: received, name="w").run_once()
    assert outcome.disposition == "accepted"
    assert _run(archive, live_world, _at(date(2026, 10, 20))) == (0, 0)
    assert _run(archive, live_world, _at(date(2026, 10, 30))) == (0, 0)


def test_a_reminder_is_signed_encrypted_to_the_agency_and_filed(
    archive: Archive, live_world: DemoWorld, tmp_path: Path
) -> None:
    at = _at(date(2026, 10, 23))
    _run(archive, live_world, at)
    key = live_world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    hub = Hub(HUB, Organ("GATEWAY"), (live_world.hub.cert, key))
    assert Builder(archive, hub, lambda: live_world.directory, lambda: at, "b").run_once() == 1
    with archive.db.session(read_only=True) as s:
        row = s.scalar(select(t.Outbox).where(t.Outbox.kind == "reminder"))
        assert row is not None and row.state == "ready" and row.message is not None
        assert row.rcpt_to == ["vanthu@snv.hanoi.gov.vn"]
        entry = archive.log.entry(s, row.entry_seq or 0)
        assert entry.kind == "reminder" and entry.fields["period"] == "2026-10"
        assert s.scalar(select(func.count()).select_from(t.LogEntry)) > 0
        message = row.message
    snv = live_world.agencies["H26.SNV"]
    files = {"m.eml": message, "me.pem": snv.cert_pem(), "me.key": snv.key_pem(),
             "root.pem": live_world.root.cert_pem()}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    signed = subprocess.run(
        ["openssl", "cms", "-decrypt", "-in", tmp_path / "m.eml", "-recip", tmp_path / "me.pem",
         "-inkey", tmp_path / "me.key"], capture_output=True, check=True,
    ).stdout  # fmt: skip
    (tmp_path / "s.eml").write_bytes(signed)
    text = subprocess.run(
        ["openssl", "cms", "-verify", "-in", tmp_path / "s.eml", "-CAfile", tmp_path / "root.pem",
         "-purpose", "smimesign", "-attime", str(int(at.timestamp()))],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    words = base64.b64decode(text.split(b"\r\n\r\n", 1)[1]).decode()
    assert "quá hạn 1 ngày làm việc" in words and "1 working day(s) late" in words


def test_templates_can_be_edited_and_a_bad_placeholder_is_caught(tmp_path: Path) -> None:
    custom = tmp_path / "reminders.toml"
    custom.write_text('[late]\nsubject = "Trễ hạn {label}"\n', encoding="utf-8")
    assert load_templates(custom).texts["late"]["subject"] == "Trễ hạn {label}"
    custom.write_text('[late]\nsubject = "Trễ hạn {nonsense}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="nonsense"):
        load_templates(custom)


def test_a_configured_templates_file_that_is_missing_is_refused(tmp_path: Path) -> None:
    """``[compliance] templates`` naming a file that is not there (a typo) is a setting error,
    as ``[compliance] overlay`` is: it was ignored, and the shipped texts went to the agencies.
    Unset, the home's reminders.toml is used only if it is there."""
    home = tmp_path / "home"
    home.mkdir()
    shipped = load_templates().texts
    assert templates_of(settings_mod.load(home)).texts == shipped  # no reminders.toml: fine
    (home / "gateway.toml").write_text('[compliance]\ntemplates = "reminders-hanoi.toml"\n')
    with pytest.raises(ConfigError, match=r"\[compliance\] templates: .*reminders-hanoi\.toml"):
        templates_of(settings_mod.load(home))
    (home / "reminders-hanoi.toml").write_text('[late]\nsubject = "Trễ hạn {label}"\n')
    assert templates_of(settings_mod.load(home)).texts["late"]["subject"] == "Trễ hạn {label}"


def test_an_expiring_certificate_warns_the_agency_and_the_admin_once(
    archive: Archive, live_world: DemoWorld
) -> None:
    from keys.issuing import issue_agency

    at = _at(date(2026, 10, 20))
    short = issue_agency(
        live_world.root, email="pa08@congan.hanoi.gov.vn", organ_id="H26.CATP",
        common_name="Hanoi City Police (short-lived)", at=at - timedelta(days=300), days=310,
        key_kind="rsa2048",
    )  # fmt: skip
    with archive.db.session() as s:
        store.add_certificate(s, short.cert, role="agency", organ_id="H26.CATP", at=at, actor="t")
    for _ in range(2):
        run(
            archive.db, calendar=CAL, directory=_directory(live_world), templates=load_templates(),
            policy=Policy(), hub=HUB, now=at, admin="quantri@exchange.hanoi.gov.vn",
        )  # fmt: skip
    with archive.db.session(read_only=True) as s:
        rows = list(s.scalars(select(t.Outbox).where(t.Outbox.key.like("%certificate%"))))
    assert sorted((r.kind, r.organ_id) for r in rows) == [("alert", None), ("reminder", "H26.CATP")]
    [warning] = [r for r in rows if r.kind == "reminder"]
    assert warning.key.endswith(":30")  # the 30-days-left warning; 7 and 1 come later
    assert "hết hạn ngày" in warning.detail["text"]


def test_the_compliance_commands_use_the_calendar_the_settings_choose(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from gateway.cli import cli

    versions = []
    for extra in ("", "[compliance]\ninclude_proposed = false\n"):
        home = tmp_path / f"home{len(versions)}"
        home.mkdir()
        (home / "gateway.toml").write_text(extra, encoding="utf-8")
        done = CliRunner().invoke(
            cli, ["--home", str(home), "compliance", "status", "--period", "2026-08", "--json"]
        )
        assert done.exit_code == 0, done.output
        versions.append(json.loads(done.output)["calendar_version"])
    assert versions[0] == Calendar.load().version
    assert versions[1] == Calendar.load(include_proposed=False).version != versions[0]


def test_the_calendar_command_shows_the_calendar_the_settings_choose(tmp_path: Path) -> None:
    """`compliance calendar` showed the shipped calendar whatever [compliance] said: a day
    off an admin had added (overlay) was a working day there, and not in the deadlines."""
    import json

    from click.testing import CliRunner

    from gateway.cli import cli

    home = tmp_path / "home"
    home.mkdir()
    (home / "calendar.toml").write_text(
        '[[entry]]\nid = "hn-2027-extra"\ndate = 2027-02-11\nkind = "off"\n'
        'name = "Nghỉ bù (thử)"\nsource = "test"\nstatus = "law"\n',
        encoding="utf-8",
    )
    (home / "gateway.toml").write_text(
        '[compliance]\ninclude_proposed = false\noverlay = "calendar.toml"\n', encoding="utf-8"
    )
    settings = settings_mod.load(home)
    from gateway.remind import calendar_of

    chosen = calendar_of(settings)
    done = CliRunner().invoke(
        cli, ["--home", str(home), "compliance", "calendar", "2027", "--json"]
    )
    assert done.exit_code == 0, done.output
    shown = json.loads(done.output)
    assert shown["version"] == chosen.version != Calendar.load().version
    assert not chosen.is_working_day(date(2027, 2, 11))


def test_a_long_escalation_delay_still_escalates(archive: Archive, live_world: DemoWorld) -> None:
    """The periods looked at went three months back: with escalate_after_days over about 60
    (the settings allow 250), the period had left the window before it was late enough, and
    no escalation was ever sent."""
    from gateway.compliance import working_days_late

    policy = Policy(escalate_after_days=80)
    due = date(2026, 10, 22)
    day = due
    while working_days_late(CAL, due, day) < 80:
        day += timedelta(days=1)
    result = run(
        archive.db, calendar=CAL, directory=_directory(live_world), templates=load_templates(),
        policy=policy, hub=HUB, now=_at(day), dry_run=True,
    )  # fmt: skip
    keys = [r.key for r in result.planned]
    assert "reminder:escalation:test-8.2.c-snv-work-permit:2026-10" in keys, day
    # ... but no late notice months after the fact (the longer look-back is for escalations)
    assert "reminder:late:test-8.2.c-snv-work-permit:2026-10" not in keys, day


def test_no_reminder_for_a_period_due_before_the_hub_went_live(
    archive: Archive, live_world: DemoWorld, tmp_path: Path
) -> None:
    """The first run of a new hub sent late notices and escalations for every period of the
    months it looks back over, which no one had been able to send it. With [compliance]
    reminders_from (the go-live day), a period due before it is not reminded."""
    at = _at(date(2026, 10, 30))

    def planned(policy: Policy) -> list[str]:
        result = run(
            archive.db, calendar=CAL, directory=_directory(live_world), templates=load_templates(),
            policy=policy, hub=HUB, now=at, dry_run=True,
        )  # fmt: skip
        return sorted(r.key for r in result.planned)

    assert len(planned(Policy())) == 2  # the late notice and the escalation of 2026-10
    assert planned(Policy(since=date(2026, 10, 23))) == []  # due 22 Oct: before go-live
    assert len(planned(Policy(since=date(2026, 10, 22)))) == 2
    home = tmp_path / "home"
    home.mkdir()
    (home / "gateway.toml").write_text('[compliance]\nreminders_from = "2026-10-23"\n')
    from gateway.remind import policy_of

    assert policy_of(settings_mod.load(home)).since == date(2026, 10, 23)
    (home / "gateway.toml").write_text('[compliance]\nreminders_from = "October"\n')
    with pytest.raises(ConfigError, match="reminders_from = 'October' is not a day"):
        settings_mod.load(home)


def test_the_calendar_command_says_when_no_settings_chose_it(tmp_path: Path) -> None:
    """A mistyped --home showed the shipped calendar as if it were the home's."""
    from click.testing import CliRunner

    from gateway.cli import cli

    done = CliRunner().invoke(
        cli, ["--home", str(tmp_path / "nope"), "compliance", "calendar", "2026"]
    )
    assert done.exit_code == 0, done.output
    assert f"(no gateway.toml in {tmp_path / 'nope'}: the shipped calendar)" in done.stderr
