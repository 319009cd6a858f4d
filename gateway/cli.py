"""The ``gateway`` command line. The only place that reads settings (DESIGN §2).

Errors are one clear line on stderr and a non-zero exit, never a traceback: a
:class:`~formats.errors.GatewayError` exits 2 (1 is kept for "checked and found invalid"),
anything unexpected exits 70 (EX_SOFTWARE) with a one-line summary; ``--debug`` shows the
traceback for developers.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session

from archive.db import Database
from formats.errors import ConfigError, GatewayError, InputError
from formats.vntime import local_day
from gateway import settings as settings_mod
from gateway.cli_payload import payload


class Failure(click.ClickException):
    """A one-line error; exit status 2 (1 means "checked, and refused")."""

    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GatewayError as err:
            raise Failure(err.message) from err


@click.group(cls=_Group)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="GATEWAY_HOME",
    help="Gateway home directory (default: $GATEWAY_HOME or ./gateway-home).",
)
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks for unexpected errors.")
@click.version_option(package_name="official-mail-gateway", prog_name="gateway")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, debug: bool) -> None:
    """Secure official-mail gateway: signed, encrypted XML submissions over S/MIME."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = settings_mod.resolve_home(home)
    ctx.obj["debug"] = debug


def load_settings(ctx: click.Context) -> settings_mod.Settings:
    """The settings of the home, which must exist (:func:`existing_home`)."""
    return settings_mod.load(existing_home(ctx))


def existing_home(ctx: click.Context) -> Path:
    """The home directory, which must exist: a mistyped ``--home`` must not become a new, empty
    home (with a new archive master key). ``gateway init`` and ``gateway demo`` make homes."""
    home: Path = ctx.find_root().obj["home"]
    if not home.is_dir():
        raise ConfigError(f"no gateway home at {home} (run `gateway init --home {home}` first)")
    config = home / settings_mod.CONFIG_NAME
    # lexists: a gateway.toml that is a broken link is a home whose settings say what is wrong.
    if not os.path.lexists(config) and not (home / "archive.db").exists() and any(home.iterdir()):
        # A directory holding other things, not a home: it would get a database and a master
        # key of its own (and an empty log that verifies). An empty one becomes a home.
        raise ConfigError(
            f"{home} is not a gateway home (no {settings_mod.CONFIG_NAME}, and it holds other "
            f"files): run `gateway init --home {home}` to make it one"
        )
    return home


def open_db(ctx: click.Context) -> Database:
    """The database named by the settings, migrated to the current schema."""
    from gateway.loading import open_database

    return open_database(load_settings(ctx))


@contextmanager
def db_session(ctx: click.Context) -> Iterator[Session]:
    """One transaction on the configured database, for one command (engine closed after)."""
    db = open_db(ctx)
    try:
        with db.session() as s:
            yield s
    finally:
        db.dispose()


def actor() -> str:
    """Who is making an admin change, as recorded in the event log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@cli"


def now() -> datetime:
    """The CLI's clock; everything below it receives the time as an argument."""
    return datetime.now(UTC)


def parse_time(text: str, *, option: str = "--at", naive: tzinfo = UTC) -> datetime:
    """An ISO 8601 date or time given on the command line; ``naive`` is the zone of a value
    written without an offset."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(
            f"{option} {text!r} is not an ISO 8601 time (e.g. 2026-11-05T09:30+07:00)"
        ) from None
    value = value if value.utcoffset() is not None else value.replace(tzinfo=naive)
    if not TIME_RANGE[0] <= value.year <= TIME_RANGE[1]:
        # 9999-12-31T23:59 would overflow in UTC, or in a day's arithmetic.
        raise InputError(
            f"{option} {text!r} is out of range: give a time in the years "
            f"{TIME_RANGE[0]}–{TIME_RANGE[1]}"
        )
    return value


#: The years a time given on the command line may fall in.
TIME_RANGE = (1970, 2999)


def in_calendar(at: datetime, what: str) -> datetime:
    """``at``, if its day in Vietnam falls in the years the working-day calendar covers (what
    a reminder run or a compliance report can be planned at); :class:`InputError` naming
    ``what`` otherwise."""
    from gateway.workdays import MAX_YEAR, MIN_YEAR

    if not MIN_YEAR <= local_day(at).year <= MAX_YEAR:
        raise InputError(
            f"{what} is outside the years the working-day calendar covers "
            f"({MIN_YEAR}–{MAX_YEAR}, Vietnam time); give a moment within them"
        )
    return at


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))


cli.add_command(payload)


def _register() -> None:
    # Imported here so that each command module can import helpers from this one.
    from gateway import (
        cli_agencies,
        cli_archive,
        cli_check,
        cli_compliance,
        cli_demo,
        cli_doctor,
        cli_init,
        cli_keys,
        cli_obligations,
        cli_outbox,
        cli_paper,
        cli_proofs,
        cli_send,
        cli_submitters,
    )
    from gateway.cli_remind import remind
    from gateway.cli_serve import serve

    cli.add_command(cli_agencies.agencies)
    cli.add_command(cli_keys.keys)
    cli.add_command(cli_check.check)
    for paper_cmd in (cli_paper.record_paper, cli_paper.withdraw_paper):
        cli_compliance.compliance.add_command(paper_cmd)
    cli.add_command(cli_compliance.compliance)
    cli.add_command(cli_demo.demo)
    cli.add_command(cli_doctor.doctor)
    cli.add_command(cli_init.init)
    for proof in (cli_proofs.prove_cmd, cli_proofs.export_cmd, cli_proofs.verify_bundle_cmd):
        cli_archive.archive_cmd.add_command(proof)
    cli.add_command(cli_archive.archive_cmd)
    cli.add_command(cli_send.send)
    cli.add_command(cli_obligations.obligations)
    cli.add_command(cli_outbox.outbox)
    cli.add_command(serve)
    cli.add_command(remind)
    cli.add_command(cli_submitters.submitters)


_register()


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(prog_name="gateway", standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: one line, never a traceback
        if debug:
            raise
        click.echo(f"gateway: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(70)
