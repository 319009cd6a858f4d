"""``gateway init``: create a home directory with a commented settings file
(:mod:`gateway.settings_template`)."""

from __future__ import annotations

import click

from gateway import settings as settings_mod
from gateway.cli import load_settings
from gateway.settings_template import template


@click.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the home directory, its sub-directories and a commented gateway.toml."""
    home = ctx.find_root().obj["home"]
    config = home / settings_mod.CONFIG_NAME
    if not home.exists():
        # Private from the start: the database, the master key and the keys live here.
        home.mkdir(mode=0o700, parents=True)
    for sub in ("keys", "trust/anchors", "trust/intermediates", "trust/crls"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "keys").chmod(0o700)
    if config.exists():
        load_settings(ctx)  # validates the existing file
        click.echo(f"{config} already exists; left unchanged")
        return
    config.write_text(template(), encoding="utf-8")
    click.echo(f"created {config}")
