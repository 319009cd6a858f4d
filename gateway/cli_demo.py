"""``gateway demo``: the main job, end to end, on throw-away material and embedded defaults."""

from __future__ import annotations

import functools
import json
import os
import queue
import secrets
import smtplib
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from formats.errors import InputError
from formats.vntime import local_day
from gateway import compliance, compliance_html, ledger, logs, obligation_store, remind
from gateway import settings as settings_mod
from gateway.cli import emit_json
from gateway.demo import HUB_ADDRESS, DemoWorld, tamper
from gateway.loading import load_context, open_archive, open_database
from gateway.serve import Supervisor
from gateway.sink import Sink

ADMIN = "quantri@exchange.hanoi.gov.vn"
SETTLE_TIMEOUT = 60.0


@click.command()
@click.option(
    "--dir",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    help="Make the demo home here, a new or empty directory (default: a temporary one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what happened as JSON.")
def demo(target: Path | None, as_json: bool) -> None:
    """Run the whole gateway on loopback with a throw-away PKI and the Hanoi directory.

    Makes a CA, the hub and three agencies of the Hanoi preset; starts `gateway serve` (SMTP
    on loopback, worker processes) with a local sink standing for the outbound relay; sends a
    month's submissions by SMTP — accepted ones, a duplicate, a tampered copy, a spoofed
    sender, a revoked certificate, a payload claiming another agency; waits for the receipts
    and deliveries; verifies the archive. Leaves the home behind to explore with the CLI.
    """
    started = time.monotonic()
    at = datetime.now(UTC)
    if target is not None:
        _fresh(target)
    home = target or Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    say = (lambda _m: None) if as_json else click.echo
    logs.configure("text", "error")

    say(f"Demo home: {home}")
    say("1. A throw-away PKI (RSA-3072):")
    world = DemoWorld.create(at, progress=lambda what: say(f"   - {what}"))
    passphrase = secrets.token_urlsafe(24).encode()
    world.write_home(home, passphrase)
    cases = _cases(world)
    for name, (_what, _sender, raw) in cases.items():
        (home / "messages" / name).write_bytes(raw)

    with Sink(home / "sink") as sink:
        world.install(
            home,
            passphrase,
            relay_port=sink.port,
            admin=ADMIN,
            preset="hanoi",
            # The demo runs the reminders itself (step 8), whatever the time of day.
            extra_config='\n[archive]\ncheckpoint_every = 10\n\n[compliance]\nremind_at = "off"\n',
        )
        settings = settings_mod.load(home)
        _load_obligations(settings)
        say("2. The Hanoi directory (56 bodies of QĐ 18/2017 Điều 8), three with certificates,")
        say("   and the obligations of Điều 8 (preset hanoi-2017)")
        ready: queue.Queue[dict[str, Any]] = queue.Queue()
        supervisor = Supervisor(settings, log_format="text", log_level="error", on_ready=ready.put)
        runner = threading.Thread(target=supervisor.run, name="gateway-serve", daemon=True)
        runner.start()
        try:
            info = ready.get(timeout=60)
        except queue.Empty:
            raise click.ClickException("the gateway did not start within 60 s") from None
        port = int(info["listeners"]["smtp"])
        say(f"3. gateway serve: SMTP on 127.0.0.1:{port}, {info['workers']} worker processes, "
            f"metrics on http://127.0.0.1:{info['metrics']}/metrics")  # fmt: skip
        say("4. Agencies send their submissions by SMTP:")
        replies = {}
        for name, (what, sender, raw) in cases.items():
            replies[name] = _send(port, raw, sender)
            say(f"   {name:<20} {what}: {replies[name]}")
        db = open_database(settings, migrate=False)
        try:
            _settle(db)
            results = _results(db, replies)
            now = datetime.now(UTC)  # what has arrived by now counts
            status = _status(settings, db, now, home)
            run_reminders = functools.partial(
                remind.run,
                db,
                calendar=remind.calendar_of(settings),
                directory=load_context(settings, db).directory,
                templates=remind.templates_of(settings),
                policy=remind.policy_of(settings),
                hub=settings.hub.address,
                now=now,
                admin=settings.serve.admin_address,
            )
            reminders = run_reminders()
            again = run_reminders()  # as if the scheduler ran twice: nothing new
            _settle(db)
        finally:
            supervisor.stop.set()
            runner.join(timeout=60)
    with db.session(read_only=True) as s:
        states = s.execute(
            select(t.Outbox.kind, t.Outbox.state, func.count()).group_by(
                t.Outbox.kind, t.Outbox.state
            )
        ).all()
    sent = {kind: n for kind, state, n in states if state == "sent"}
    outbound = {
        "reminders": sent.get("reminder", 0),
        "receipts": sent.get("receipt", 0) + sent.get("resend", 0),
        "deliveries": sent.get("delivery", 0),
        # owed under Điều 8 to bodies of the preset with no mailbox or certificate in the demo
        "deliveries_failed": sum(n for k, st, n in states if k == "delivery" and st == "failed"),
        "alerts": sent.get("alert", 0),
        "kept_in": str(sink.directory),
    }
    report = open_archive(settings, db, None).verify()
    db.dispose()
    if as_json:
        emit_json(
            results
            | {"home": str(home), "outbound": outbound, "compliance": status}
            | {"reminders": [r.as_dict() for r in reminders.planned]}
            | {"reminders_queued": len(reminders.queued), "queued_again": len(again.queued)}
            | {"archive": {"ok": report.ok, "entries": report.entries}}
        )
        return
    say("5. Verdicts (filed in the archive):")
    for name, r in results.items():
        reason = (
            f" — [{r['reasons'][0]['code']}] {r['reasons'][0]['message']}" if r["reasons"] else ""
        )
        say(f"   {name:<20} {str(r['disposition']).upper():<12} entry {r['archive_seq']}{reason}")
    say(
        f"6. Sent through the relay (kept in {outbound['kept_in']}): {outbound['receipts']} "
        f"signed receipts, {outbound['deliveries']} deliveries to the police"
    )
    if outbound["deliveries_failed"]:
        say(
            f"   {outbound['deliveries_failed']} more deliveries are owed under Điều 8 to bodies "
            f"that have no mailbox or certificate in this demo: failed, {outbound['alerts']} "
            "alerts to the admin (one per body a day; `gateway outbox list --state failed`)"
        )
    say("7. Compliance (who owes what, as at now; printable reports in the home):")
    for label, summary in status.items():
        counts = ", ".join(f"{n} {k}" for k, n in summary["counts"].items() if n)
        say(f"   period {label}: {counts}")
        for line in summary["home_affairs"]:
            say(f"     {line}")
        say(f"     {summary['html']}")
    kinds = Counter(r.kind for r in reminders.planned)
    say(
        f"8. Reminders to bodies with a mailbox: {len(reminders.planned)} owed "
        f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
        f"{outbound['reminders']} sent, signed and filed; a second run queued {len(again.queued)}"
    )
    state = "verified" if report.ok else "DAMAGED: " + "; ".join(report.problems[:3])
    say(f"9. Archive: {report.entries} entries, {report.checkpoints} signed checkpoints, {state}")
    say("")
    say(f"Done in {time.monotonic() - started:.1f} s. Try:")
    prefix = "" if os.environ.get("GATEWAY_HOME") == str(home) else f"--home {home} "
    say(f"   gateway {prefix}archive list")
    say(f"   gateway {prefix}archive show {results['accepted.eml']['archive_seq']}")
    say(f"   gateway {prefix}check {home / 'messages' / 'accepted.eml'}")
    say(f"   gateway {prefix}serve            # the same gateway, in the foreground")


def _periods(at: datetime) -> tuple[str, str]:
    """(the monthly period open now — sent now it is on time; one two months earlier — late)."""
    day = local_day(at)
    month = day.year * 12 + day.month - 1 + (1 if day.day > 15 else 0)
    return _label(month), _label(month - 2)


def _label(month: int) -> str:
    return f"{month // 12:04d}-{month % 12 + 1:02d}"


def _fresh(target: Path) -> None:
    """``--dir`` is new or empty: the demo writes a whole home (gateway.toml, the passphrase,
    the hub's key, trust files), and over an existing one it would destroy the passphrase that
    opens the hub's key."""
    try:
        occupied = target.exists() and any(target.iterdir())
    except OSError as exc:
        raise InputError(f"--dir {target}: cannot read it: {exc.strerror}") from None
    if occupied:
        raise InputError(
            f"--dir {target} is not empty; the demo makes a home of its own: give a new or "
            "empty directory (or no --dir, for a temporary one)"
        )


def _cases(world: DemoWorld) -> dict[str, tuple[str, str, bytes]]:
    snv, stp = "vanthu@snv.hanoi.gov.vn", "vanthu@stp.hanoi.gov.vn"
    current, overdue = _periods(world.at)
    good = world.submission("H26.SNV", period=current)
    return {
        "accepted.eml": (f"Home Affairs' work permits, {current}", snv, good),
        "late.eml": (
            f"Home Affairs' work permits, {overdue}",
            snv,
            world.submission("H26.SNV", period=overdue, number=4),
        ),
        "accepted-stp.eml": (
            "work permits from Justice",
            stp,
            world.submission("H26.STP", number=2),
        ),
        "duplicate.eml": ("the first one, sent twice", snv, good),
        "tampered.eml": ("one bit flipped in transit", snv, tamper(good)),
        "spoofed-from.eml": (
            "signed by Home Affairs, From Justice",
            stp,
            world.submission("H26.SNV", from_addr=stp),
        ),
        "revoked-signer.eml": (
            "Justice's revoked certificate",
            stp,
            world.submission("H26.STP", signer=world.revoked["H26.STP"]),
        ),
        "wrong-agency.eml": (
            "payload claims to be from Justice",
            snv,
            world.submission("H26.SNV", payload_from="H26.STP", number=3),
        ),
    }


def _send(port: int, raw: bytes, sender: str) -> str:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.ehlo("agency.demo")
            client.mail(sender)
            client.rcpt(HUB_ADDRESS)
            code, text = client.data(raw)
    except smtplib.SMTPException as exc:
        return f"refused: {exc}"
    return f"{code} {text.decode(errors='replace')}"


def _settle(db: Database) -> None:
    """Wait until every message is filed and every receipt and delivery has been sent."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        with db.session(read_only=True) as s:
            busy = s.scalar(select(func.count()).where(t.Intake.state != "done")) or 0
            busy += (
                s.scalar(select(func.count()).where(t.Outbox.state.not_in(("sent", "failed")))) or 0
            )
        if not busy:
            return
        time.sleep(0.1)
    raise click.ClickException(f"the gateway did not finish within {SETTLE_TIMEOUT:.0f} s")


def _results(db: Database, replies: dict[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with db.session(read_only=True) as s:
        for name, reply in replies.items():
            number = int(reply.rsplit(" ", 1)[1]) if "queued as" in reply else None
            row = s.get(t.Intake, number) if number is not None else None
            if row is None or row.archive_seq is None:
                out[name] = {"smtp": reply, "disposition": None, "reasons": [], "archive_seq": None}
                continue
            entry = s.scalar(select(t.LogEntry).where(t.LogEntry.seq == row.archive_seq))
            assert entry is not None
            fields = json.loads(entry.record)
            duplicate = any(
                r.archive_seq == row.archive_seq and r.id < row.id
                for r in s.scalars(select(t.Intake).where(t.Intake.archive_seq == row.archive_seq))
            )
            out[name] = {
                "smtp": reply,
                "disposition": "duplicate" if duplicate else fields["status"],
                "reasons": fields["reasons"],
                "archive_seq": row.archive_seq,
            }
    return out


def _load_obligations(settings: settings_mod.Settings) -> None:
    db = open_database(settings, migrate=False)
    try:
        with db.session() as s:
            obligation_store.load_preset(
                s,
                obligation_store.preset("hanoi-2017"),
                source="preset hanoi-2017",
                at=datetime.now(UTC),
                actor="demo",
            )
    finally:
        db.dispose()


def _status(
    settings: settings_mod.Settings, db: Database, at: datetime, home: Path
) -> dict[str, dict[str, Any]]:
    """The status matrix of the two periods the demo sent for, and a printable page each."""
    calendar = remind.calendar_of(settings)
    out: dict[str, dict[str, Any]] = {}
    with db.session(read_only=True) as s:
        obligations = obligation_store.obligations(s)
        names = ledger.agency_names(s)
        for label in sorted(_periods(at), reverse=True):
            report = compliance.matrix(
                obligations, ledger.submissions(s, [label]), calendar, label, at
            )
            page = home / f"compliance-{label}.html"
            page.write_text(compliance_html.render(report, names, generated=at), encoding="utf-8")
            mine = [
                c for c in report.cells
                if c.obligation.provider == "H26.SNV" and c.obligation.category == "work-permit"
            ]  # fmt: skip
            out[label] = {
                "counts": report.counts(),
                "home_affairs": [
                    f"Home Affairs, work permits: {c.status}"
                    + (f" by {c.late_days} working day(s)" if c.status == "late" else "")
                    + f" (due {c.due:%d/%m/%Y})"
                    + (", sent before the period ended" if c.early else "")
                    for c in mine
                ],
                "html": str(page),
            }
    return out
