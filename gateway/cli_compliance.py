"""``gateway compliance …``: deadlines and the working-day calendar (DESIGN §6).

A thin edge over :mod:`gateway.workdays`; the calendar and its overlay are described in
``docs/compliance.md``.
"""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli import emit_json
from gateway.workdays import MAX_YEAR, MIN_YEAR, Calendar, Day

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@click.group()
def compliance() -> None:
    """Compliance: the working-day calendar that deadlines are counted in."""


def _line(day: Day) -> str:
    state = "working" if day.working else "off"
    head = f"{day.date:%a %Y-%m-%d}  {state:<8} {day.reason}"
    tail = day.source if day.entry is None else f"{day.source} · {day.status} · {day.entry}"
    if not day.applied:
        tail += " · not applied: an ordinary day"
    return f"{head}\n{'':25}{tail}"


@compliance.command("calendar")
@click.argument("year", type=click.IntRange(MIN_YEAR, MAX_YEAR))
@click.option(
    "--without-proposed",
    is_flag=True,
    help="Leave out changes that are only proposed (e.g. the 2026 National Day swap).",
)
@click.option(
    "--include",
    multiple=True,
    metavar="ID",
    help="Put an overlay entry in force even if not yet law (e.g. vn-culture-day). Repeatable.",
)
@click.option(
    "--exclude", multiple=True, metavar="ID", help="Leave out an overlay entry. Repeatable."
)
@click.option(
    "--overlay",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An extra overlay TOML file; its entries replace shipped entries with the same id.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def calendar_cmd(
    year: int,
    without_proposed: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    overlay: Path | None,
    as_json: bool,
) -> None:
    """Days off on weekdays and working weekend days of YEAR, with their reason and source,
    and the number of working days in each month."""
    cal = Calendar.load(
        include_proposed=not without_proposed,
        include=include,
        exclude=exclude,
        extra_overlay=overlay,
    )
    table = cal.year_table(year)
    if as_json:
        emit_json(table.as_dict())
        return
    click.echo(f"Working days {year} — calendar {table.version}")
    click.echo(table.label)
    click.echo()
    for day in table.days:
        click.echo(_line(day))
    click.echo()
    counts = "  ".join(f"{m} {n}" for m, n in zip(_MONTHS, table.working_days, strict=True))
    click.echo(f"Working days: {counts}  (total {sum(table.working_days)})")
