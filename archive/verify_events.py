"""`archive verify`'s look at what admin events made: every admin_events row is its log entry,
and the key store and the agency directory are what the events recorded (:mod:`archive.verify`).
A row written straight into the database, edited or deleted behind the admin's back is named."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import LargeBinary, cast, select
from sqlalchemy.orm import Session

from archive import tables as t
from archive.log import iso
from archive.verify_report import Report, as_stored, binary, instant, json_value, rows

#: Admin entries of the log by event number: (seq, the entry's fields).
Logged = dict[int, tuple[int, dict[str, Any]]]


def admin_events(s: Session, logged: Logged, report: Report) -> None:
    """Every admin_events row is its admin entry in the log, field for field, and the other way
    round: the rows that `agencies show` and the key history read were not edited."""
    seen: set[int] = set()
    e = t.AdminEvent
    query = select(
        e.seq, as_stored(e.at), e.actor, e.action, e.subject, as_stored(e.detail)
    ).order_by(e.seq)
    for number, stored_at, actor, action, subject, raw_detail in rows(s, query):
        seen.add(number)
        entry = logged.get(number)
        if entry is None:
            report.add(f"admin event {number} ({action} {subject}) is not in the log")
            continue
        seq, fields = entry
        at = instant(stored_at)
        stored = (iso(at) if at else stored_at, actor, action, subject, json_value(raw_detail))
        if stored != tuple(fields.get(k) for k in ("at", "actor", "action", "subject", "detail")):
            report.add(f"admin event {number} differs from its log entry {seq}: it was edited")
    for event in sorted(set(logged) - seen):
        report.add(f"admin event {event} of log entry {logged[event][0]} is missing (deleted)")


@dataclass
class _Enrolled:
    """A certificate as the admin events made it: added, windowed, retired."""

    event: int
    role: str
    holder: object
    use_from: datetime | None = None
    use_until: datetime | None = None
    retired: datetime | None = None


def key_store(s: Session, logged: Logged, report: Report) -> None:
    """Every certificate in the key store (trust anchors and intermediates included) is one an
    admin event added, with the role, holder, window and retirement the events give it: a row
    written straight into the database (a rogue trust anchor, another agency's certificate in
    a row) is found, and so is one deleted."""
    made: dict[str, _Enrolled] = {}
    for number in sorted(logged):
        fields = logged[number][1]
        action, detail = fields.get("action"), fields.get("detail")
        if not isinstance(action, str) or not isinstance(detail, dict):
            continue
        sha = detail.get("sha256")
        if not isinstance(sha, str):  # an edited record (reported as such by _entries)
            continue
        if action.startswith("certificate.add."):
            role = action.removeprefix("certificate.add.")
            made[sha] = _Enrolled(number, role, fields.get("subject"))
        elif (c := made.get(sha)) is None:
            continue
        elif action == "certificate.window":
            c.use_from, c.use_until = (
                instant(detail.get("use_from")),
                instant(detail.get("use_until")),
            )
        elif action.startswith("certificate.retire."):
            c.retired = instant(fields.get("at"))
    k = t.Certificate
    query = select(
        k.sha256, k.role, k.organ_id, k.subject, as_stored(k.use_from), as_stored(k.use_until),
        as_stored(k.retired_at), cast(k.der, LargeBinary),
    ).order_by(k.id)  # fmt: skip
    seen = set()
    for sha, role, organ_id, subject, use_from, use_until, retired, der in rows(s, query):
        seen.add(sha)
        who = f"certificate {str(sha)[:16]}… ({role}, {subject})"
        if hashlib.sha256(binary(der, report, f"{who}: its DER")).hexdigest() != sha:
            report.add(f"{who}: its DER is another certificate than its fingerprint names")
        c = made.get(sha)
        if c is None:
            report.add(f"{who} is in the key store, but no admin event added it: written in")
            continue
        held = (role, organ_id or subject, instant(use_from), instant(use_until))
        if held != (c.role, c.holder, c.use_from, c.use_until) or instant(retired) != c.retired:
            report.add(
                f"{who} differs from what admin events made it (event {c.event} and after): "
                "its role, holder, window or retirement was edited",
            )
    for sha in made.keys() - seen:
        report.add(
            f"certificate {str(sha)[:16]}… added by admin event {made[sha].event} is missing "
            "from the key store (deleted)",
        )


#: The directory fields each ``agency.add`` event records in full (:func:`keys.store._detail`)
#: and each ``agency.update`` event records as ``changed: {field: [from, to]}``; ``emails`` is
#: the agency's ``agency_emails`` rows, the others are columns of its ``agencies`` row.
_AGENCY_FIELDS = ("name_vi", "name_en", "emails", "supervisor", "contact", "valid_from", "valid_to")
#: A field the event that added an agency does not record: not compared.
_UNRECORDED = object()


@dataclass
class _Listed:
    """An agency as the admin events made it: ``added`` by one, ``event`` the last that changed
    it; ``created``/``updated``: the times of the two."""

    added: int
    event: int
    fields: dict[str, object]
    created: datetime | None
    updated: datetime | None


def _replay_directory(logged: Logged, report: Report) -> dict[str, _Listed]:
    """The directory as the admin events build it, in order: ``agency.add`` gives every field,
    ``agency.update`` the ones it changed (from → to), ``agency.retire`` the last valid day.
    ``agency.import`` only sums up the adds and updates it was made of. An update that starts
    from another value than the events before it left shows an edit the admin's change then
    carried on (a mailbox written in, then kept by an update of the e-mails)."""
    made: dict[str, _Listed] = {}
    for number in sorted(logged):
        fields = logged[number][1]
        action, organ, detail = fields.get("action"), fields.get("subject"), fields.get("detail")
        if not (isinstance(action, str) and isinstance(organ, str) and isinstance(detail, dict)):
            continue  # an edited record (reported as such by _entries) or not an agency's
        at = instant(fields.get("at"))
        if action == "agency.add":
            recorded = {k: detail.get(k, _UNRECORDED) for k in _AGENCY_FIELDS}
            made[organ] = _Listed(number, number, recorded, at, at)
            continue
        listed = made.get(organ)
        if listed is None:  # no event added it: its row (if any) is reported as written in
            continue
        if action == "agency.update":
            changed = detail.get("changed")
            for name, pair in changed.items() if isinstance(changed, dict) else ():
                if name not in _AGENCY_FIELDS or not (isinstance(pair, list) and len(pair) == 2):
                    continue
                before, after = pair
                if (had := listed.fields[name]) is not _UNRECORDED and had != before:
                    report.add(
                        f"agency {organ}: admin event {number} changed its {name} from "
                        f"{_shown(before)}, but the events before it left {_shown(had)}: the "
                        "row had been edited in the database before that change",
                    )
                listed.fields[name] = after
        elif action == "agency.retire":
            listed.fields["valid_to"] = detail.get("last_day", _UNRECORDED)
        else:
            continue
        listed.event, listed.updated = number, at
    return made


def _shown(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]" if value else "none"
    return "none" if value is None else repr(value)


def _day(value: object) -> object:
    """A stored calendar date as the events write it (``YYYY-MM-DD``): the driver gives a
    date (PostgreSQL) or SQLite's text, compared as it is stored."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    return value


def directory(s: Session, logged: Logged, report: Report) -> None:
    """Every agency in the directory is one an admin event added, with the names, mailboxes,
    supervisor, contact, validity and times the events give it: a mailbox written straight
    into the database (receipts and deliveries would go to it), a validity widened, a name
    changed, an agency written in or deleted is found. The events record every field, so
    every column is compared (the mailbox rows' ids only number them)."""
    made = _replay_directory(logged, report)
    e = t.AgencyEmail
    mailboxes: dict[object, list[str]] = {}
    for organ, address in rows(s, select(e.organ_id, e.address).order_by(e.id)):
        mailboxes.setdefault(organ, []).append(
            address if isinstance(address, str) else repr(address)
        )
    a = t.Agency
    query = select(
        a.organ_id, a.name_vi, a.name_en, a.supervisor, a.contact, as_stored(a.valid_from),
        as_stored(a.valid_to), as_stored(a.created_at), as_stored(a.updated_at),
    ).order_by(a.organ_id)  # fmt: skip
    seen: set[object] = set()
    for organ, name_vi, name_en, supervisor, contact, start, end, created, updated in rows(
        s, query
    ):
        seen.add(organ)
        who = f"agency {organ}" if isinstance(organ, str) else f"agency {organ!r}"
        stored: dict[str, object] = {
            "name_vi": name_vi, "name_en": name_en, "emails": sorted(mailboxes.pop(organ, [])),
            "supervisor": supervisor, "contact": contact, "valid_from": _day(start),
            "valid_to": _day(end),
        }  # fmt: skip
        listed = made.get(organ) if isinstance(organ, str) else None
        if listed is None:
            report.add(
                f"{who} ({_shown(name_vi)}, e-mail {_shown(stored['emails'])}) is in the "
                "directory, but no admin event added it: written in",
            )
            continue
        since = f"the admin events (the last: event {listed.event})"
        for name in _AGENCY_FIELDS:
            want, have = listed.fields[name], stored[name]
            if want is _UNRECORDED or want == have:
                continue
            if name == "emails" and isinstance(want, list):
                _mailboxes(report, who, since, want, stored["emails"])
                continue
            report.add(
                f"{who}: its {name} is {_shown(have)}, but {since} made it {_shown(want)}: "
                "edited in the database",
            )
        for name, value, when in (
            ("created_at", created, listed.created),
            ("updated_at", updated, listed.updated),
        ):
            if instant(value) != when:
                report.add(
                    f"{who}: its {name} is {_shown(value)}, but {since} made it "
                    f"{iso(when) if when else 'none'}: edited in the database",
                )
    for organ in sorted(made.keys() - seen, key=str):
        report.add(
            f"agency {organ} added by admin event {made[organ].added} is missing from the "
            "directory (deleted)",
        )
    for organ, addresses in mailboxes.items():
        report.add(
            f"agency {organ}: e-mail {_shown(sorted(addresses))} is stored for it, but it has no "
            "directory row (written in, or left when its row was deleted)",
        )


def _mailboxes(report: Report, who: str, since: str, want: list[Any], have: object) -> None:
    """One line per mailbox added or removed behind the admin's back."""
    given = {str(x) for x in want}
    held = set(have) if isinstance(have, list) else set()
    for address in sorted(held - given):
        report.add(
            f"{who}: its e-mail {address} was given to it by none of {since}: written in; "
            "mail the hub sends the agency (receipts, deliveries) would go to it",
        )
    for address in sorted(given - held):
        report.add(f"{who}: its e-mail {address}, given by {since}, is missing (deleted)")
    if held == given:  # the same mailboxes, stored twice
        report.add(f"{who}: its e-mails are {_shown(have)}, but {since} made them {_shown(want)}")
