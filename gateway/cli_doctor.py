"""``gateway doctor``: check a home before (or while) it serves; the checks are in
:mod:`gateway.doctor`."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from formats.errors import GatewayError
from gateway import doctor as checks
from gateway.cli import emit_json, load_settings, now, parse_time
from gateway.settings import Settings


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as a JSON list.")
@click.option(
    "--at",
    "at_text",
    metavar="ISO-TIME",
    help="Judge certificate and CRL dates at this instant (default: now), e.g. next month.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 120),
    default=5.0,
    show_default=True,
    help="Seconds to wait for each network peer.",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Read the hub key passphrase here ('-': standard input) instead of as [hub] says, "
    "e.g. outside the service, whose credentials only it can read.",
)
@click.pass_context
def doctor(
    ctx: click.Context,
    as_json: bool,
    at_text: str | None,
    timeout: float,
    passphrase_file: Path | None,
) -> None:
    """Check that this home is ready to serve: configuration, file permissions, database,
    keys, certificates, CRLs, listener addresses, the relay and the IMAP mailbox.

    One line per check: OK, WARN (works, but needs attention soon) or FAIL. Nothing is
    changed and no mail is sent. Exit status 1 if any check fails, else 0.
    """
    at = parse_time(at_text) if at_text else now()
    try:
        settings = load_settings(ctx)
    except GatewayError as err:
        results = [checks.fail("config", err.message)]
    else:
        first = (
            checks.ok("config", f"{settings.config_file} parses")
            if settings.config_file.exists()
            else checks.warn(
                "config", f"no {settings.config_file}: running on defaults (is --home right?)"
            )
        )
        with _passphrase_from(settings, passphrase_file) as settings:
            results = [first, *checks.run(settings, at=at, timeout=timeout)]
    if as_json:
        emit_json([r.as_dict() for r in results])
    else:
        width = max(len(r.check) for r in results)
        for r in results:
            click.echo(f"{r.status:<4} {r.check:<{width}}  {r.message}")
    ctx.exit(1 if any(r.status == "FAIL" for r in results) else 0)


@contextmanager
def _passphrase_from(settings: Settings, file: Path | None) -> Iterator[Settings]:
    """``settings`` reading the passphrase from ``file``; ``-`` is standard input, handed on
    in ``[hub] passphrase_env`` for the duration (a pipe from another user cannot be opened
    again as /dev/stdin)."""
    if file is None:
        yield settings
        return
    if str(file) != "-":
        hub = dataclasses.replace(settings.hub, passphrase_file=file.absolute())
        yield dataclasses.replace(settings, hub=hub)
        return
    secret = sys.stdin.readline().rstrip("\r\n")
    name = settings.hub.passphrase_env
    before = os.environ.get(name)
    os.environ[name] = secret
    try:
        yield dataclasses.replace(
            settings, hub=dataclasses.replace(settings.hub, passphrase_file=None)
        )
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
