"""``gateway agencies …``: the agency directory in the database.

A thin edge: options and files are turned into :class:`~keys.directory.Agency` values and
plans by :mod:`keys.agency_io`, and written by :mod:`keys.store`, which records every change
as an admin event. Each command uses one database session, so a command — an import of a
thousand rows included — changes everything it says or nothing. Layouts and the Hanoi preset
are described in ``docs/agencies.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session

from formats.algorithms import CIPHER_NAMES
from formats.errors import InputError
from formats.vntime import local_day
from gateway.cli import actor, emit_json, now
from gateway.cli import db_session as _session
from keys import agency_io, capabilities, presets, store
from keys.agency_io import Plan, as_dict, clean
from keys.directory import Agency, normalize_email
from keys.store import Unusable

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def agencies() -> None:
    """The agency directory: who may send, from which mailboxes, and when."""


def _day(value: str | None, option: str) -> date | None:
    """An ISO date option; ``""`` (given to clear a date) is None too."""
    if not value:
        return None
    try:
        return agency_io.parse_day(value, option)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _today() -> date:
    return local_day(now())


# --- add, update, retire -------------------------------------------------------------------------

_common = [
    click.option("--name-vi", help="Vietnamese name, with diacritics."),
    click.option("--name-en", help="English name."),
    click.option("--supervisor", help="OrganId of the supervising body ('' for none)."),
    click.option("--contact", help="A person or phone to contact ('' for none)."),
    click.option("--valid-from", metavar="YYYY-MM-DD", help="First valid day ('' for none)."),
    click.option("--valid-to", metavar="YYYY-MM-DD", help="Last valid day ('' for none)."),
]


def _with_common(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_common):
        f = option(f)
    return f


@agencies.command()
@click.argument("organ_id")
@_with_common
@click.option("--email", "emails", multiple=True, metavar="ADDR", help="Mailbox (repeatable).")
@json_option
@click.pass_context
def add(
    ctx: click.Context, /, organ_id: str, emails: tuple[str, ...], as_json: bool, **o: Any
) -> None:
    """Enrol a new agency ORGAN_ID (--name-vi is required)."""
    if not o["name_vi"] or not clean(o["name_vi"]):
        raise InputError("--name-vi is required: give the agency's Vietnamese name")
    agency = Agency(
        organ_id=clean(organ_id),
        name_vi=clean(o["name_vi"]),
        name_en=clean(o["name_en"] or ""),
        emails=frozenset(clean(e) for e in emails),
        supervisor=clean(o["supervisor"] or "") or None,
        valid_from=_day(o["valid_from"], "--valid-from"),
        valid_to=_day(o["valid_to"], "--valid-to"),
        contact=clean(o["contact"] or "") or None,
    )
    with _session(ctx) as s:
        store.add_agency(s, agency, at=now(), actor=actor())
    _done(as_json, "added", agency)


@agencies.command()
@click.argument("organ_id")
@_with_common
@click.option("--email", "emails", multiple=True, metavar="ADDR", help="Replace all mailboxes.")
@click.option("--add-email", "add_emails", multiple=True, metavar="ADDR", help="Add a mailbox.")
@click.option("--remove-email", "remove_emails", multiple=True, metavar="ADDR", help="Remove one.")
@json_option
@click.pass_context
def update(
    ctx: click.Context,
    /,
    organ_id: str,
    emails: tuple[str, ...],
    add_emails: tuple[str, ...],
    remove_emails: tuple[str, ...],
    as_json: bool,
    **o: Any,
) -> None:
    """Change agency ORGAN_ID; options not given stay as they are."""
    if not (emails or add_emails or remove_emails or any(v is not None for v in o.values())):
        raise InputError(f"nothing to change for {organ_id}; give at least one option (--help)")
    if o["name_vi"] is not None and not clean(o["name_vi"]):
        raise InputError("--name-vi cannot be empty: an agency needs its Vietnamese name")
    with _session(ctx) as s:
        old = store.get_agency(s, organ_id)
        refused = store.unusable_mailboxes(s, organ_id)
        changes: dict[str, Any] = {}
        for key in ("name_vi", "name_en"):
            if o[key] is not None:
                changes[key] = clean(o[key])
        for key in ("supervisor", "contact"):
            if o[key] is not None:
                changes[key] = clean(o[key]) or None
        for key in ("valid_from", "valid_to"):
            if o[key] is not None:
                changes[key] = _day(o[key], "--" + key.replace("_", "-"))
        new = replace(old, **changes)
        kept, drop = _emails(new, refused, emails, add_emails, remove_emails)
        new = replace(new, emails=kept)
        result = store.put_agency(s, new, at=now(), actor=actor(), drop=drop)
    left = [u for u in refused if u.address not in drop]
    _done(as_json, "updated" if result == "updated" else "unchanged", new, unusable=left)


def _emails(
    agency: Agency,
    refused: Sequence[Unusable],
    replace_: Sequence[str],
    add_: Sequence[str],
    remove: Sequence[str],
) -> tuple[frozenset[str], set[str]]:
    """The new mailbox set: ``--email`` replaces, then ``--add/--remove-email`` adjust; and
    the stored mailboxes the current rules refuse (``refused``, an earlier version wrote them)
    to drop: all of them with ``--email``, each ``--remove-email`` names."""
    stored = {_as_stored(u.address): u.address for u in refused}
    drop = set(stored.values()) if replace_ else set()
    result = _addresses(replace_, agency) if replace_ else set(agency.emails)
    result |= _addresses(add_, agency)
    usable = []
    for given in remove:
        if (address := stored.get(_as_stored(given))) is not None:
            drop.add(address)
        else:
            usable.append(given)
    for address in sorted(_addresses(usable, agency)):
        if address not in result:
            have = ", ".join(sorted(result)) or "none"
            raise InputError(
                f"{agency.organ_id} has no e-mail {address} to remove; its e-mails: {have}"
            )
        result.discard(address)
    return frozenset(result), drop


def _as_stored(address: str) -> str:
    """``address`` as an earlier version stored it (NFC, trimmed, domain in lower case), to
    find a stored mailbox the current rules refuse."""
    local, _, domain = clean(address).rpartition("@")
    return f"{local}@{domain.lower()}"


def _addresses(addresses: Sequence[str], agency: Agency) -> set[str]:
    try:
        return {normalize_email(a) for a in addresses}
    except ValueError as exc:
        raise InputError(f"agency {agency.organ_id}: {exc}") from None


@agencies.command()
@click.argument("organ_id")
@click.option("--on", "on", metavar="YYYY-MM-DD", help="Last valid day (default: today, UTC+7).")
@json_option
@click.pass_context
def retire(ctx: click.Context, organ_id: str, on: str | None, as_json: bool) -> None:
    """End agency ORGAN_ID's validity after day --on. Nothing is deleted."""
    last_day = _day(on, "--on") or _today()
    with _session(ctx) as s:
        if store.get_agency(s, organ_id).valid_to == last_day:
            status = "unchanged"
        else:
            store.retire_agency(s, organ_id, last_day=last_day, at=now(), actor=actor())
            status = "retired"
        agency = store.get_agency(s, organ_id)
    _done(as_json, status, agency, hint=False)


def _done(
    as_json: bool,
    status: str,
    agency: Agency,
    *,
    hint: bool = True,
    unusable: Sequence[Unusable] = (),
) -> None:
    if as_json:
        emit_json({"status": status, "agency": _shape(agency, unusable)})
        return
    click.echo(f"{status} {agency.organ_id} ({agency.name_vi}), valid {_window(agency)}")
    if hint and not agency.emails:
        click.echo(
            f"note: {agency.organ_id} has no e-mail address yet; add one with "
            f"`gateway agencies update {agency.organ_id} --add-email ADDRESS`"
        )
    for u in unusable:
        click.echo(f"note: {agency.organ_id}: stored mailbox {u.why}; fix: `{u.fix}`")


def _shape(agency: Agency, unusable: Sequence[Unusable]) -> dict[str, Any]:
    """:func:`keys.agency_io.as_dict`, plus ``unusable_emails`` when the agency has a stored
    mailbox the current rules refuse (an earlier version wrote it; it is not in ``emails``)."""
    shape = as_dict(agency)
    if unusable:
        shape["unusable_emails"] = [
            {"address": u.address, "why": u.why, "fix": u.fix} for u in unusable
        ]
    return shape


def _unusable_by_agency(s: Session) -> dict[str, list[Unusable]]:
    out: dict[str, list[Unusable]] = {}
    for u in store.unusable_mailboxes(s):
        out.setdefault(u.organ_id, []).append(u)
    return out


# --- list, show ----------------------------------------------------------------------------------


@agencies.command("list")
@click.option("--active-on", metavar="YYYY-MM-DD", help="Only agencies valid on that day.")
@json_option
@click.pass_context
def list_(ctx: click.Context, active_on: str | None, as_json: bool) -> None:
    """List the agencies: code, Vietnamese name, e-mails, validity."""
    day = _day(active_on, "--active-on")
    with _session(ctx) as s:
        rows = [a for a in store.agencies(s) if day is None or a.active_on(day)]
        unusable = _unusable_by_agency(s)
    if as_json:
        emit_json([_shape(a, unusable.get(a.organ_id, ())) for a in rows])
        return
    table = [("CODE", "NAME (VI)", "E-MAILS", "VALID")] + [
        (a.organ_id, a.name_vi, _mailboxes(a, unusable.get(a.organ_id, ())) or "-", _window(a))
        for a in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3])
    if not rows:
        click.echo(
            "(no agencies; add one with `gateway agencies add` or load a preset with "
            "`gateway agencies import --preset hanoi`)"
        )


def _mailboxes(agency: Agency, unusable: Sequence[Unusable]) -> str:
    """The agency's mailboxes, then each stored one it cannot use, flagged."""
    return ", ".join([*sorted(agency.emails), *(f"{u.address} ({u.short})" for u in unusable)])


def _window(agency: Agency) -> str:
    if agency.valid_from is None and agency.valid_to is None:
        return "always"
    return f"{agency.valid_from or '…'} → {agency.valid_to or '…'}"


@agencies.command()
@click.argument("organ_id")
@json_option
@click.pass_context
def show(ctx: click.Context, organ_id: str, as_json: bool) -> None:
    """Show one agency, whom it supervises and its change history."""
    with _session(ctx) as s:
        agency = store.get_agency(s, organ_id)
        unusable = store.unusable_mailboxes(s, organ_id)
        everyone = {a.organ_id: a for a in store.agencies(s)}
        supervises = [k for k, a in everyone.items() if a.supervisor == organ_id]
        boss = everyone.get(agency.supervisor or "")
        history: list[dict[str, Any]] = [
            {"seq": e.seq, "at": e.at.isoformat(), "actor": e.actor, "action": e.action}
            for e in store.events(s)
            if e.subject == organ_id
        ]
        kept = capabilities.of(s, organ_id)
        encryption: dict[str, Any] = {
            "cipher": capabilities.cipher_for(s, organ_id),
            "advertised": kept.advertised if kept else None,
            "entry_seq": kept.entry_seq if kept else None,
            "received_at": kept.received_at.isoformat() if kept else None,
            "updated_at": kept.updated_at.isoformat() if kept else None,
        }
    if as_json:
        emit_json(
            {
                **_shape(agency, unusable),
                "supervises": supervises,
                "encryption": encryption,
                "history": history,
            }
        )
        return
    click.echo(f"{agency.organ_id}  {agency.name_vi}")
    lines = [
        ("English", agency.name_en or "-"),
        ("e-mails", _mailboxes(agency, unusable) or "none (add with --add-email)"),
        ("supervisor", f"{boss.organ_id} ({boss.name_vi})" if boss else agency.supervisor or "-"),
        ("supervises", ", ".join(supervises) or "-"),
        ("valid", _window(agency)),
        ("contact", agency.contact or "-"),
        ("encryption", _encryption(encryption)),
    ]
    for label, value in lines:
        click.echo(f"  {label + ':':12} {value}")
    for u in unusable:
        click.echo(f"  {'unusable:':12} {u.why}; fix: `{u.fix}`")
    for h in history:
        click.echo(f"  #{h['seq']:<5} {h['at'][:19]}  {h['action']:14} {h['actor']}")


def _encryption(encryption: dict[str, Any]) -> str:
    """What the hub encrypts to the agency with, and why (keys.capabilities)."""
    name = CIPHER_NAMES.get(encryption["cipher"], encryption["cipher"])
    if encryption["entry_seq"] is None:
        return f"{name} (the default: no signed message of it filed yet)"
    advertised = encryption["advertised"] or []
    listed = ", ".join(advertised[:4]) + (" …" if len(advertised) > 4 else "") or "nothing"
    return f"{name} (its newest message, archive entry {encryption['entry_seq']}, advertised: {listed})"


# --- import, export ------------------------------------------------------------------------------


class _DryRun(Exception):
    """Raised inside the session to roll a dry run back."""


@agencies.command("import")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(presets.names()), help="Load a shipped preset.")
@click.option("--format", "fmt", type=click.Choice(agency_io.FORMATS), help="Default: suffix.")
@click.option("--overwrite", is_flag=True, help="Preset: replace entries changed since loading.")
@click.option("--dry-run", is_flag=True, help="Check and report, write nothing.")
@json_option
@click.pass_context
def import_(
    ctx: click.Context,
    file: Path | None,
    preset: str | None,
    fmt: str | None,
    overwrite: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Add or update agencies from FILE (CSV or TOML) or from --preset; all or nothing."""
    if (file is None) == (preset is None):
        raise InputError("give either FILE or --preset NAME (e.g. --preset hanoi)")
    if overwrite and preset is None:
        raise InputError("--overwrite applies to --preset only; a file always sets its entries")
    if preset is not None:
        source, data, fmt = f"preset {preset}", presets.data(preset), "toml"
    else:
        assert file is not None
        source, fmt = str(file), agency_io.format_of(str(file), fmt)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise InputError(f"{file}: cannot read ({exc.strerror})") from None
    entries = agency_io.read(data, source=source, fmt=fmt)
    try:
        with _session(ctx) as s:
            existing = store.agencies(s)
            plan = agency_io.plan_import(
                existing, entries, source=source, preset=preset is not None, overwrite=overwrite
            )
            _apply(s, plan, existing, source=source)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    _report(plan, source=source, dry_run=dry_run, as_json=as_json)


def _apply(s: Session, plan: Plan, existing: Sequence[Agency], *, source: str) -> None:
    """Write ``plan`` through the store. Mailboxes moving between agencies are released
    first; then changes are retried until none is left, since one may need another (a
    successor takes a mailbox once its predecessor's window ends). A refused store call
    writes nothing, so retrying is safe."""
    at, who = now(), actor()
    before = {a.organ_id: a for a in existing}
    claimed = {e for a in [*plan.add, *plan.update] for e in a.emails}
    for new in plan.update:
        old = before[new.organ_id]
        if (old.emails - new.emails) & claimed:
            store.update_agency(s, replace(old, emails=old.emails & new.emails), at=at, actor=who)
    pending = [*plan.add, *plan.update]
    while pending:
        refused: list[tuple[Agency, InputError]] = []
        for agency in pending:
            try:
                store.put_agency(s, agency, at=at, actor=who)
            except InputError as exc:
                refused.append((agency, exc))
        if len(refused) == len(pending):
            first, error = refused[0]
            raise InputError(f"{source}: {first.organ_id}: {error.message}")
        pending = [a for a, _ in refused]
    if plan.changes:
        store.record(
            s,
            at=at,
            actor=who,
            action="agency.import",
            subject="directory",
            source=source,
            added=[a.organ_id for a in plan.add],
            updated=[a.organ_id for a in plan.update],
        )


def _report(plan: Plan, *, source: str, dry_run: bool, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "source": source,
                "dry_run": dry_run,
                "added": [a.organ_id for a in plan.add],
                "updated": [a.organ_id for a in plan.update],
                "unchanged": list(plan.unchanged),
                "kept": [{"organ_id": k, "differs": list(f)} for k, f in plan.kept],
            }
        )
        return
    verb = "would import" if dry_run else "imported"
    click.echo(
        f"{verb} {source}: {len(plan.add)} added, {len(plan.update)} updated, "
        f"{len(plan.unchanged)} unchanged"
        + (f", {len(plan.kept)} kept (differ from preset)" if plan.kept else "")
        + (" — dry run, nothing written" if dry_run else "")
    )
    for organ_id, differs in plan.kept:
        click.echo(f"kept, differs from preset: {organ_id} ({', '.join(differs)})")
    if plan.kept:
        click.echo("re-run with --overwrite to replace them with the preset's values")


@agencies.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(agency_io.FORMATS),
    help="Default: --out's suffix, else toml.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="File (default: stdout)."
)
@json_option
@click.pass_context
def export(ctx: click.Context, fmt: str | None, out: Path | None, as_json: bool) -> None:
    """Write the whole directory as CSV or TOML; `agencies import` reads it back unchanged."""
    if as_json and out is None:
        raise InputError(
            "--json reports on a file written with --out; without --out the "
            "export itself goes to stdout"
        )
    if fmt is None:
        fmt = out.suffix.lstrip(".").lower() if out is not None else "toml"
        fmt = fmt if fmt in agency_io.FORMATS else "toml"
    with _session(ctx) as s:
        rows = store.agencies(s)
        unusable = store.unusable_mailboxes(s)
    for u in unusable:  # an import would refuse them: not written, but said
        click.echo(
            f"note: {u.organ_id}: stored mailbox {u.address} is not exported ({u.short}); "
            f"fix: `{u.fix}`",
            err=True,
        )
    text = agency_io.to_csv(rows) if fmt == "csv" else agency_io.to_toml(rows)
    if out is None:
        click.echo(text, nl=False)
        return
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        tmp.replace(out)
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror})") from None
    if as_json:
        emit_json({"out": str(out), "format": fmt, "agencies": len(rows)})
    else:
        click.echo(f"wrote {len(rows)} agencies to {out} ({fmt})")
