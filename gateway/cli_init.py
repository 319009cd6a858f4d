"""``gateway init``: create a home directory with a commented settings file."""

from __future__ import annotations

import click

from gateway import settings as settings_mod
from gateway.cli import load_settings

_TEMPLATE = """\
# Official-mail gateway settings. Every key is optional; the values shown are the defaults.
# Relative paths are relative to this directory.

[hub]
# address = "hub@gateway.localhost"
# certificates = ["keys/hub.pem"]        # several during a rotation: old and new overlap
# private_keys = ["keys/hub.key"]        # encrypted PEM; same order as certificates
# passphrase_env = "GATEWAY_KEY_PASSPHRASE"
# passphrase_file = "keys/passphrase"

[trust]
# anchors = ["trust/anchors"]            # files or directories of CA certificates
# intermediates = ["trust/intermediates"]
# crls = ["trust/crls"]
# revocation = "hard-fail"               # or "soft-fail"

[directory]
# file = "agencies.toml"

[limits]
# max_message_bytes = 33554432
# max_header_bytes = 32768
# max_parts = 16
# max_depth = 4
# max_xml_bytes = 25165824
# max_xml_depth = 32
"""


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
    config.write_text(_TEMPLATE, encoding="utf-8")
    click.echo(f"created {config}")
