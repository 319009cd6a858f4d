"""``gateway keys ca …``: the built-in certificate authority."""

from __future__ import annotations

import click


@click.group()
def ca() -> None:
    """The built-in CA, for deployments without a national CA."""
