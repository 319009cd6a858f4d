"""``gateway submitters``: SMTP AUTH logins for agencies that submit straight to the hub."""

from __future__ import annotations

from pathlib import Path

import click

from formats.errors import InputError
from gateway.cli import emit_json, load_settings
from gateway.submitters import hash_password, read_file, write_file

DEFAULT_FILE = Path("keys/submitters")


def _file(ctx: click.Context) -> Path:
    settings = load_settings(ctx)
    return settings.path(settings.listen.auth_file or DEFAULT_FILE)


@click.group()
def submitters() -> None:
    """Logins for SMTP AUTH (enable with [listen] auth_file; offered only over STARTTLS)."""


@submitters.command("set")
@click.argument("address")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the password from this file (default: prompt twice).",
)
@click.pass_context
def set_cmd(ctx: click.Context, address: str, password_file: Path | None) -> None:
    """Add ADDRESS (the agency's mailbox) or change its password."""
    if "@" not in address or any(c.isspace() for c in address):
        raise InputError(f"{address!r} is not an e-mail address")
    if password_file is not None:
        password = password_file.read_text(encoding="utf-8").rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 12:
        raise InputError("use a password of at least 12 characters")
    path = _file(ctx)
    entries = read_file(path) if path.exists() else {}
    entries[address.lower()] = hash_password(password)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, entries)
    click.echo(f"{address.lower()}: password set in {path}")


@submitters.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """The addresses that may log in."""
    path = _file(ctx)
    addresses = sorted(read_file(path)) if path.exists() else []
    if as_json:
        emit_json({"file": str(path), "submitters": addresses})
        return
    for a in addresses:
        click.echo(a)
    if not addresses:
        click.echo(f"(no submitters in {path}; add one with `gateway submitters set ADDRESS`)")


@submitters.command("remove")
@click.argument("address")
@click.pass_context
def remove_cmd(ctx: click.Context, address: str) -> None:
    """Remove ADDRESS's login."""
    path = _file(ctx)
    entries = read_file(path) if path.exists() else {}
    if entries.pop(address.lower(), None) is None:
        raise InputError(f"{address} is not a submitter in {path}")
    write_file(path, entries)
    click.echo(f"{address.lower()}: removed")
