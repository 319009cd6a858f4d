"""Running the reminders: read the ledger, plan (pure), queue what is new in the outbox (an edge).

Queuing is idempotent: a reminder's key is unique in the outbox, so whatever was queued before
— by this run, an earlier one, another instance, or a run a crash interrupted — is not queued
again; on PostgreSQL the run also holds an advisory lock, so instances do not even race. The
outbox then builds (signs, encrypts to the agency), files and sends each one with retries,
like receipts (:mod:`gateway.outbound`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from archive import tables as t
from archive.db import Database
from formats.errors import ConfigError
from formats.vntime import local_day
from gateway import adhoc, compliance, ledger, obligation_store, outbound
from gateway.reminders import Policy, Reminder, Templates, certificate_reminders, plan
from gateway.settings import Settings
from gateway.workdays import Calendar
from keys import store
from keys.directory import Directory

#: PostgreSQL advisory lock key for a reminder run ("gw-rem").
_LOCK = 0x67772D72656D
#: Periods looked at: at least this many months back (late notices, escalations) and one
#: ahead; more when escalations come later (:func:`months_back`).
MONTHS_BACK = 3


@dataclass(frozen=True)
class RunResult:
    planned: tuple[Reminder, ...]
    queued: tuple[str, ...]  # keys new in the outbox (a dry run: the keys that would be)

    def as_dict(self) -> dict[str, object]:
        return {
            "planned": [r.as_dict() for r in self.planned],
            "queued": list(self.queued),
        }


def calendar_of(settings: Settings) -> Calendar:
    c = settings.compliance
    return Calendar.load(
        include_proposed=c.include_proposed,
        include=c.ids("include"),
        exclude=c.ids("exclude"),
        extra_overlay=settings.path(c.overlay) if c.overlay else None,
    )


def load_templates(override: Path | None = None) -> Templates:
    """The shipped reminder texts, with ``override`` (a file that must be readable) on top."""
    shipped = resources.files("gateway.presets").joinpath("reminders.toml").read_text("utf-8")
    if override is None:
        return Templates.parse(shipped)
    try:
        text = override.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{override}: cannot read ({exc})") from None
    return Templates.parse(shipped, text, where=str(override))


def templates_of(settings: Settings) -> Templates:
    """The reminder texts: ``[compliance] templates`` on the shipped ones, which must be
    there (as ``[compliance] overlay`` must: a mistyped name would send the shipped texts to
    the agencies, unnoticed); unset, the home's reminders.toml if there is one."""
    c = settings.compliance
    if c.templates is None:
        implicit = settings.home / "reminders.toml"
        return load_templates(implicit if implicit.exists() else None)
    path = settings.path(c.templates)
    if not path.exists():
        raise ConfigError(
            f"[compliance] templates: {path} does not exist; correct the name, or remove the "
            "setting to send the shipped texts"
        )
    return load_templates(path)


def policy_of(settings: Settings) -> Policy:
    c = settings.compliance
    return Policy(c.courtesy_days, c.escalate_after_days, c.certificate_days, c.since())


def record_consents(db: Database, *, calendar: Calendar, now: datetime) -> int:
    """File a ``deemed-consent`` entry for each request whose deadline passed unanswered (once:
    already filed ones are not filed again). Returns how many were new."""
    with db.session(read_only=True) as s:
        requests, replies = ledger.requests_and_replies(s)
    statuses = adhoc.requests_status(requests, replies, calendar, now)
    if not any(st.state == "deemed-consent" for st in statuses):
        return 0
    with db.session() as s:
        if db.dialect == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
        return len(ledger.record_deemed_consent(s, statuses, at=now))


def months_back(policy: Policy) -> int:
    """Months of periods to look back over: enough for an escalation ``escalate_after_days``
    working days after a period's due date (seven calendar days to five working days, a
    fortnight for Tết and the due date's own distance after the period). With a fixed three
    months, a delay over about 60 working days (the settings allow 250) never escalated."""
    calendar_days = policy.escalate_after_days * 7 / 5 + 14
    return max(MONTHS_BACK, 2 + math.ceil(calendar_days / 30))


def labels_around(now: datetime, back: int = MONTHS_BACK) -> list[str]:
    day = local_day(now)
    month = day.year * 12 + day.month - 1
    return [f"{m // 12:04d}-{m % 12 + 1:02d}" for m in range(month - back, month + 2)]


def run(
    db: Database,
    *,
    calendar: Calendar,
    directory: Directory,
    templates: Templates,
    policy: Policy,
    hub: str,
    now: datetime,
    dry_run: bool = False,
    admin: str = "",
) -> RunResult:
    """Plan at ``now`` and queue what is new. Certificate warnings also go to ``admin`` (as
    an alert) when an admin address is configured."""
    labels = labels_around(now, months_back(policy))
    with db.session(read_only=True) as s:
        obligations = obligation_store.obligations(s)
        submissions = ledger.submissions(s, labels)
        expiring = [
            (c.sha256, c.organ_id or "", c.subject, c.not_after)
            for c in store.expiring(s, at=now, until=now + timedelta(days=policy.certificate_days))
            if c.role == "agency" and c.organ_id
        ]
    cells = [
        cell
        for label in labels
        for cell in compliance.matrix(obligations, submissions, calendar, label, now).cells
    ]
    planned = plan(
        cells, directory=directory, calendar=calendar, templates=templates, now=now, hub=hub,
        policy=policy,
    ) + certificate_reminders(expiring, directory=directory, templates=templates, now=now, hub=hub)  # fmt: skip
    if not planned:
        return RunResult((), ())
    if dry_run:
        with db.session(read_only=True) as s:
            sent = _sent(s, planned)
        new = dict.fromkeys(r.key for r in planned if r.key not in sent)
        return RunResult(tuple(planned), tuple(new))
    queued = []
    with db.session() as s:
        if db.dialect == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
        known = _sent(s, planned)
        for r in planned:
            if r.key in known:
                continue
            known.add(r.key)
            row = outbound.alert(r.key, r.text, now)
            row.key, row.kind, row.organ_id = r.key, "reminder", r.organ_id
            row.detail = {"subject": r.subject, "text": r.text, "kind": r.kind} | dict(r.about)
            s.add(row)
            queued.append(r.key)
            if r.kind == "certificate" and admin:
                copy = outbound.alert(
                    r.key, f"{r.organ_id}: {r.subject}\n\n{r.text}", now, copy=True
                )
                if s.scalar(select(t.Outbox.id).where(t.Outbox.key == copy.key)) is None:
                    s.add(copy)
    return RunResult(tuple(planned), tuple(queued))


def _sent(s: Session, planned: Sequence[Reminder]) -> set[str]:
    """The keys of ``planned`` already in the outbox (a reminder is sent once, ever)."""
    return set(s.scalars(select(t.Outbox.key).where(t.Outbox.key.in_({r.key for r in planned}))))
