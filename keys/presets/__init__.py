"""Ready-made agency directories, loaded with ``gateway agencies import --preset NAME``.

Each preset is a TOML file in this package, in the directory format of
:mod:`keys.agency_io`. ``hanoi``: every body named in Article 8 of Hanoi Decision
18/2017/QĐ-UBND, with the 2025 reorganisation encoded as validity dates (see
``docs/agencies.md`` for which dates, and why admins must confirm them).
"""

from __future__ import annotations

from importlib import resources

from formats.errors import InputError


def names() -> tuple[str, ...]:
    """The presets shipped with the gateway."""
    files = resources.files(__name__).iterdir()
    return tuple(sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml")))


def data(name: str) -> bytes:
    """The raw TOML bytes of preset ``name``."""
    if name not in names():
        raise InputError(f"no preset {name!r}; the presets are: {', '.join(names())}")
    return resources.files(__name__).joinpath(f"{name}.toml").read_bytes()
