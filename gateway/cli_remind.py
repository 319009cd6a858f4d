"""``gateway remind``: plan the reminders owed now and queue the new ones (or only show them)."""

from __future__ import annotations

from datetime import datetime

import click

from formats.errors import InputError
from formats.vntime import VN_TZ
from gateway.cli import db_session, emit_json, in_calendar, load_settings, now, parse_time
from gateway.loading import load_directory_merged, open_database
from gateway.remind import calendar_of, policy_of, run, templates_of


def _moment(text: str) -> datetime:
    """``--at``: an ISO 8601 time in the calendar's years (:class:`InputError` otherwise);
    without an offset, Vietnam time (as the compliance commands read it)."""
    return in_calendar(parse_time(text, naive=VN_TZ), f"--at {text!r}")


@click.command()
@click.option("--dry-run", is_flag=True, help="Show what would be sent; queue nothing.")
@click.option("--at", "at_text", metavar="TIME", help="Plan as at this moment (default: now).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def remind(ctx: click.Context, dry_run: bool, at_text: str | None, as_json: bool) -> None:
    """Courtesy notices, late notices, escalations and certificate warnings, each sent once.

    `gateway serve` runs this itself each working day at [compliance] remind_at; running it
    again (or on two instances) sends nothing twice. Queued reminders are signed, encrypted to
    the agency, filed in the archive and sent through the relay by `gateway serve`.
    """
    settings = load_settings(ctx)
    at = _moment(at_text) if at_text else now()
    if at > now() and not dry_run:
        # Each reminder is queued once, by its key: queued ahead of its time, the notice would
        # go now and never when it is due.
        raise InputError(f"--at {at_text} is in the future: look ahead with --dry-run")
    db = open_database(settings)
    try:
        with db_session(ctx) as s:
            directory = load_directory_merged(settings, s)
        result = run(
            db,
            calendar=calendar_of(settings),
            directory=directory,
            templates=templates_of(settings),
            policy=policy_of(settings),
            hub=settings.hub.address,
            now=at,
            dry_run=dry_run,
            admin=settings.serve.admin_address,
        )
    finally:
        db.dispose()
    if as_json:
        emit_json(result.as_dict() | {"dry_run": dry_run, "at": at.isoformat()})
        return
    queued = set(result.queued)
    new = "would send" if dry_run else "queued"
    for r in result.planned:
        state = new if r.key in queued else "already sent"
        click.echo(f"{state:<13} {r.kind:<11} to {r.organ_id:<12} {r.subject}")
    click.echo(
        f"{len(result.planned)} owed, {len(queued)} {'would be queued' if dry_run else 'newly queued'}"
    )
