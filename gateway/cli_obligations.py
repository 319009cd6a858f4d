"""``gateway obligations …``: who owes which information to whom, how often, by when.

A thin edge: options become :class:`~gateway.obligations.Obligation` values, written by
:mod:`gateway.obligation_store`, which records every change as an admin event. One database
session per command, so a command changes everything it reports or nothing. The model, the
Hanoi 2017 preset and the due-rule default are described in ``docs/compliance.md``.
"""

from __future__ import annotations

from datetime import date

import click

from formats.errors import InputError
from gateway import obligation_store
from gateway.cli import actor, emit_json, now
from gateway.cli import db_session as _session
from gateway.obligations import (
    CADENCES,
    DEFAULT_WORKING_DAYS,
    DueRule,
    Obligation,
    as_dict,
    default_due,
)
from keys.agency_io import clean, parse_day

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def obligations() -> None:
    """The obligation matrix: provider, recipients, category, cadence, due rule, legal basis."""


def _day(value: str | None, option: str) -> date | None:
    if not value:
        return None
    try:
        return parse_day(value, option)
    except ValueError as exc:
        raise InputError(str(exc)) from None


class _DryRun(Exception):
    """Raised inside the session to roll a dry run back."""


@obligations.command("load-preset")
@click.option(
    "--preset",
    default="hanoi-2017",
    show_default=True,
    type=click.Choice(obligation_store.preset_names()),
    help="Which shipped preset.",
)
@click.option("--overwrite", is_flag=True, help="Replace rows changed since loading.")
@click.option("--dry-run", is_flag=True, help="Check and report, write nothing.")
@click.option(
    "--due-working-days",
    type=click.IntRange(1, 60),
    help=f"Monthly rows due N working days after the period (default {DEFAULT_WORKING_DAYS}).",
)
@json_option
@click.pass_context
def load_preset(
    ctx: click.Context,
    preset: str,
    overwrite: bool,
    dry_run: bool,
    due_working_days: int | None,
    as_json: bool,
) -> None:
    """Load a shipped obligation preset; all or nothing, and again changes nothing."""
    entries = obligation_store.preset(preset, working_days=due_working_days)
    source = f"preset {preset}"
    try:
        with _session(ctx) as s:
            plan = obligation_store.load_preset(
                s, entries, source=source, overwrite=overwrite, at=now(), actor=actor()
            )
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    if as_json:
        emit_json(
            {
                "source": source,
                "dry_run": dry_run,
                "added": [o.id for o in plan.add],
                "updated": [o.id for o in plan.update],
                "unchanged": list(plan.unchanged),
                "kept": [{"id": k, "differs": list(f)} for k, f in plan.kept],
                "warnings": list(plan.warnings),
            }
        )
        return
    verb = "would load" if dry_run else "loaded"
    click.echo(
        f"{verb} {source}: {len(plan.add)} added, {len(plan.update)} updated, "
        f"{len(plan.unchanged)} unchanged"
        + (f", {len(plan.kept)} kept (differ from preset)" if plan.kept else "")
        + (" — dry run, nothing written" if dry_run else "")
    )
    for obligation_id, differs in plan.kept:
        click.echo(f"kept, differs from preset: {obligation_id} ({', '.join(differs)})")
    if plan.kept:
        click.echo("re-run with --overwrite to replace them with the preset's values")
    for warning in plan.warnings:
        click.echo(f"warning: {warning}")


@obligations.command("list")
@click.option("--at", "at", metavar="YYYY-MM-DD", help="Only obligations in force that day.")
@click.option("--provider", metavar="ORGAN_ID", help="Only those of this provider.")
@json_option
@click.pass_context
def list_(ctx: click.Context, at: str | None, provider: str | None, as_json: bool) -> None:
    """List obligations: id, provider, category, cadence, due rule, validity."""
    day = _day(at, "--at")
    with _session(ctx) as s:
        rows = obligation_store.obligations(s, at=day, provider=provider)
    if as_json:
        emit_json([as_dict(o) for o in rows])
        return
    if not rows:
        click.echo(
            "(no obligations; load the Hanoi 2017 matrix with `gateway obligations load-preset` "
            "or add one with `gateway obligations add`)"
        )
        return
    table = [("ID", "PROVIDER", "CATEGORY", "CADENCE", "TO", "DUE", "VALID")] + [
        (
            o.id,
            o.provider,
            o.category,
            o.cadence,
            str(len(o.recipients)),
            o.due.describe(),
            _window(o),
        )
        for o in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(6)]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[6])


def _window(o: Obligation) -> str:
    if o.valid_from is None and o.valid_to is None:
        return "always"
    return f"{o.valid_from or '…'} → {o.valid_to or '…'}"


@obligations.command()
@click.argument("obligation_id")
@click.option("--provider", required=True, metavar="ORGAN_ID", help="The body that owes it.")
@click.option(
    "--recipient", "recipients", multiple=True, required=True, metavar="ORGAN_ID",
    help="A body it is owed to (repeatable).",
)  # fmt: skip
@click.option("--category", required=True, help="Category code (`gateway payload categories`).")
@click.option("--cadence", type=click.Choice(CADENCES), default="monthly", show_default=True)
@click.option("--due-working-days", type=int, metavar="N", help="Due N working days after.")
@click.option("--due-before", multiple=True, metavar="MM-DD", help="Due before (repeatable).")
@click.option(
    "--legal-basis", required=True, help="What obliges it, e.g. 'QĐ 18/2017/QĐ-UBND Điều 8.2.c'."
)
@click.option("--valid-from", metavar="YYYY-MM-DD", help="First day in force.")
@click.option("--valid-to", metavar="YYYY-MM-DD", help="Last day in force.")
@click.option("--note", default="", help="Free text.")
@json_option
@click.pass_context
def add(
    ctx: click.Context,
    obligation_id: str,
    provider: str,
    recipients: tuple[str, ...],
    category: str,
    cadence: str,
    due_working_days: int | None,
    due_before: tuple[str, ...],
    legal_basis: str,
    valid_from: str | None,
    valid_to: str | None,
    note: str,
    as_json: bool,
) -> None:
    """Add obligation OBLIGATION_ID (lower-case letters, digits, '.', '-')."""
    if due_working_days is not None and due_before:
        raise InputError("give --due-working-days or --due-before, not both")
    if due_working_days is not None:
        due = DueRule.working_days_after(due_working_days)
    elif due_before:
        due = DueRule.before(*due_before)
    else:
        due = default_due(cadence)
    obligation = Obligation(
        id=clean(obligation_id),
        provider=clean(provider),
        recipients=tuple(clean(r) for r in recipients),
        category=clean(category),
        cadence=cadence,
        due=due,
        legal_basis=clean(legal_basis),
        valid_from=_day(valid_from, "--valid-from"),
        valid_to=_day(valid_to, "--valid-to"),
        note=clean(note),
    )
    with _session(ctx) as s:
        obligation_store.add(s, obligation, at=now(), actor=actor())
    _done(as_json, "added", obligation)


@obligations.command()
@click.argument("obligation_id")
@click.option("--last-day", required=True, metavar="YYYY-MM-DD", help="Last day in force.")
@json_option
@click.pass_context
def retire(ctx: click.Context, obligation_id: str, last_day: str, as_json: bool) -> None:
    """End obligation OBLIGATION_ID after --last-day. Nothing is deleted."""
    day = _day(last_day, "--last-day")
    assert day is not None
    with _session(ctx) as s:
        obligation = obligation_store.get(s, obligation_id)
        if obligation.valid_to == day:
            status = "unchanged"
        else:
            obligation = obligation_store.retire(
                s, obligation_id, last_day=day, at=now(), actor=actor()
            )
            status = "retired"
    _done(as_json, status, obligation)


def _done(as_json: bool, status: str, obligation: Obligation) -> None:
    if as_json:
        emit_json({"status": status, "obligation": as_dict(obligation)})
        return
    click.echo(
        f"{status} {obligation.id}: {obligation.provider} → {len(obligation.recipients)} "
        f"recipient(s), {obligation.category}, {obligation.cadence}, "
        f"{obligation.due.describe()}, valid {_window(obligation)}"
    )
