"""Reminder planning (pure): the status and the moment in, the reminders owed out.

Polite and escalating (DESIGN §6), each owed once — its ``key`` says what it is about, and the
outbox keeps keys unique, so planning twice (two scheduler runs, two instances, a crash and a
restart) sends nothing twice:

- ``courtesy``: a period not yet due, within ``courtesy_days`` working days of its due date,
  to the provider — ``reminder:courtesy:<obligation>:<period>``;
- ``late``: missing (or only rejected) after the due date, to the provider —
  ``reminder:late:<obligation>:<period>``;
- ``escalation``: still missing ``escalate_after_days`` working days after the due date, to
  the provider's supervising body — ``reminder:escalation:<obligation>:<period>``;
- ``certificate``: an agency certificate expiring within ``certificate_days`` days, to the
  agency (and the admin) — ``reminder:certificate:<sha256>:<days-left bucket>``.

Texts come from templates (Vietnamese, then English), which admins may edit: the shipped
``gateway/presets/reminders.toml``, overridden key by key by ``reminders.toml`` in the home
(read by :func:`gateway.remind.load_templates`; this module reads no files).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Final, Literal

from formats.categories import CATEGORIES
from formats.errors import ConfigError
from formats.vntime import local_day
from gateway.compliance import Calendar, Cell, working_days_late
from keys.directory import Directory

Kind = Literal["courtesy", "late", "escalation", "certificate"]
KINDS: Final[tuple[Kind, ...]] = ("courtesy", "late", "escalation", "certificate")


@dataclass(frozen=True)
class Policy:
    courtesy_days: int = 2  # working days before the due date
    escalate_after_days: int = 5  # working days after the due date
    certificate_days: int = 30  # calendar days before a certificate expires
    since: date | None = None  # no reminder for a period due before this day (go-live)
    late_within_months: int = 3  # late notices for periods that ended this recently


@dataclass(frozen=True)
class Reminder:
    key: str
    kind: Kind
    organ_id: str  # the addressee
    subject: str
    text: str
    about: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "kind": self.kind,
            "to": self.organ_id,
            "subject": self.subject,
            "about": dict(self.about),
        }


@dataclass(frozen=True)
class Templates:
    texts: Mapping[str, Mapping[str, str]]

    @classmethod
    def parse(cls, shipped: str, override: str | None = None, *, where: str = "") -> Templates:
        """The shipped texts, with an admin's ``override`` (TOML text from ``where``) on top;
        every placeholder is tried once, so a typo fails here, not at 08:00."""
        texts: dict[str, dict[str, str]] = {k: dict(v) for k, v in tomllib.loads(shipped).items()}
        if override is not None:
            try:
                extra = tomllib.loads(override)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{where}: not valid TOML ({exc})") from None
            for kind, values in extra.items():
                if kind not in KINDS or not isinstance(values, dict):
                    raise ConfigError(f"{where}: [{kind}] is not one of {', '.join(KINDS)}")
                for key, text in values.items():
                    if key not in ("subject", "body") or not isinstance(text, str):
                        raise ConfigError(f"{where}: [{kind}] {key} must be subject or body text")
                texts[kind][key] = text
        templates = cls(texts)
        for kind in KINDS:
            templates.render(kind, _SAMPLE)
        return templates

    def render(self, kind: Kind, values: Mapping[str, str]) -> tuple[str, str]:
        t = self.texts[kind]
        try:
            subject = t["subject"].format_map(values)
            body = t["body"].strip().format_map(values)
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError(
                f"reminder template [{kind}]: unknown or bad placeholder {exc}"
            ) from None
        if "\r" in subject or "\n" in subject:
            raise ConfigError(f"reminder template [{kind}]: the subject must be one line")
        return subject, body


_SAMPLE: Final = {
    k: "x"
    for k in [
        "agency",
        "agency_id",
        "category",
        "category_en",
        "period",
        "label",
        "due",
        "late_days",
        "legal_basis",
        "supervisor",
        "recipients",
        "hub",
        "subject",
    ]
}


def _months_between(earlier: date, later: date) -> int:
    return (later.year * 12 + later.month) - (earlier.year * 12 + earlier.month)


def _dmy(d: date) -> str:
    return f"{d:%d/%m/%Y}"


def plan(
    cells: Iterable[Cell],
    *,
    directory: Directory,
    calendar: Calendar,
    templates: Templates,
    now: datetime,
    hub: str,
    policy: Policy = Policy(),
) -> list[Reminder]:
    """The reminders owed at ``now`` for ``cells`` (one status matrix or several).

    Only cells that can owe something are looked at closely (not yet due, or missing after
    the due date); working-day counts are worked out once per due date."""
    today = local_day(now)
    out: list[Reminder] = []
    days_to: dict[date, int] = {}
    days_late: dict[date, int] = {}
    for cell in cells:
        status, due = cell.status, cell.due
        if policy.since is not None and due < policy.since:
            continue  # before the hub served: the status report still shows it
        if status == "not-due-yet":
            if today > due or (due - today).days > 2 * policy.courtesy_days + 7:
                continue  # too far ahead for a courtesy notice (weekends and holidays included)
            if due not in days_to:
                days_to[due] = _working_days_between(calendar, today, due)
            if days_to[due] > policy.courtesy_days:
                continue
            kinds: tuple[Kind, ...] = ("courtesy",)
            late = 0
        elif status in ("missing", "rejected-only") and today > due:
            if due not in days_late:
                days_late[due] = working_days_late(calendar, due, today)
            late = days_late[due]
            kinds = ("late", "escalation") if late >= policy.escalate_after_days else ("late",)
            # Late notices for the last months only: the look-back is longer when escalations
            # come later, and a late notice months after the fact (one never sent: the hub not
            # yet live then) is news to no one.
            if _months_between(cell.period.last, today) > policy.late_within_months:
                kinds = tuple(k for k in kinds if k != "late")
        else:
            continue
        ob, period = cell.obligation, cell.period
        provider = directory.get(ob.provider)
        if provider is None or not provider.emails or not provider.active_on(today):
            # no mailbox to remind, or no agency any more (merged away, dissolved): the
            # status report still shows the gap; a notice would only come back refused
            continue
        category = CATEGORIES.get(ob.category)
        values = {
            "agency": provider.name_vi,
            "agency_id": ob.provider,
            "category": category.title_vi if category else ob.category,
            "category_en": category.title_en if category else ob.category,
            "period": f"{_dmy(period.first)} – {_dmy(period.last)}",
            "label": period.label,
            "due": _dmy(due),
            "late_days": str(late),
            "legal_basis": ob.legal_basis,
            "supervisor": "",
            "recipients": ", ".join(
                (a.name_vi if (a := directory.get(r)) else r) for r in ob.recipients
            ),
            "hub": hub,
            "subject": "",
        }
        about = {"obligation": ob.id, "period": period.label, "due": due.isoformat()}
        for kind in kinds:
            to = ob.provider
            if kind == "escalation":
                supervisor = directory.get(provider.supervisor) if provider.supervisor else None
                if supervisor is None or not supervisor.emails or not supervisor.active_on(today):
                    continue
                values["supervisor"], to = supervisor.name_vi, supervisor.organ_id
            out.append(_make(templates, kind, to, ob.id, period.label, values, about))
    return out


def _make(
    templates: Templates,
    kind: Kind,
    to: str,
    obligation: str,
    label: str,
    values: Mapping[str, str],
    about: Mapping[str, str],
) -> Reminder:
    subject, text = templates.render(kind, values)
    return Reminder(f"reminder:{kind}:{obligation}:{label}", kind, to, subject, text, about)


def _working_days_between(calendar: Calendar, start: date, end: date) -> int:
    """Working days after ``start`` up to and including ``end`` (0 when ``end`` is today)."""
    n = 0
    day = start
    while day < end:
        day = date.fromordinal(day.toordinal() + 1)
        if calendar.is_working_day(day):
            n += 1
    return n


def certificate_reminders(
    expiring: Iterable[tuple[str, str, str, datetime]],
    *,
    directory: Directory,
    templates: Templates,
    now: datetime,
    hub: str,
) -> list[Reminder]:
    """``expiring``: (sha256, OrganId, subject, not_after) of agency certificates; one
    reminder per certificate and bucket (30, 7 and 1 day(s) left), so a few, not daily."""
    today = local_day(now)
    out = []
    for sha, organ_id, subject_dn, not_after in expiring:
        agency = directory.get(organ_id)
        if agency is None or not agency.emails:
            continue
        left = (local_day(not_after) - today).days
        bucket = next((b for b in (1, 7, 30) if left <= b), None)
        if bucket is None or left < 0:
            continue
        values = dict(_SAMPLE) | {
            "agency": agency.name_vi,
            "agency_id": organ_id,
            "due": _dmy(local_day(not_after)),
            "hub": hub,
            "subject": subject_dn,
        }
        subject, text = templates.render("certificate", values)
        out.append(
            Reminder(
                f"reminder:certificate:{sha}:{bucket}",
                "certificate",
                organ_id,
                subject,
                text,
                {"certificate": sha, "expires": not_after.isoformat()},
            )
        )
    return out
