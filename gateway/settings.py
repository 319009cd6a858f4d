"""Settings: one TOML file, ``gateway.toml``, in the gateway's home directory.

The home is ``--home`` or ``$GATEWAY_HOME`` or ``./gateway-home``. Every setting has a default,
so the gateway runs with no file at all; relative paths are relative to the home. Only the CLI
reads settings (DESIGN §2); everything else receives values.

Example (all keys optional)::

    [hub]
    address = "hub@gateway.example.gov.vn"
    certificates = ["keys/hub.pem"]          # one or more: old and new overlap during rotation
    private_keys = ["keys/hub.key"]          # same order as certificates
    passphrase_env = "GATEWAY_KEY_PASSPHRASE"  # or passphrase_file = "..."

    [trust]
    anchors = ["trust/anchors"]              # files or directories of PEM/DER certificates
    intermediates = ["trust/intermediates"]
    crls = ["trust/crls"]
    revocation = "hard-fail"                 # or "soft-fail"
    ocsp_responder = ""                      # "http://…": ask this OCSP responder instead of
                                             # the AIA OCSP URL of each certificate that has one

    [directory]
    file = "agencies.toml"

    [database]
    url = "sqlite:///archive.db"             # relative SQLite paths are in the home;
                                             # or postgresql+psycopg://user@host/dbname

    [archive]
    master_key_file = "keys/archive.key"     # encrypts payload blobs at rest; back it up
    checkpoint_every = 1000                  # sign a tree head after this many entries

    [limits]
    max_message_bytes = 33554432
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from formats.errors import ConfigError
from formats.limits import Limits

CONFIG_NAME = "gateway.toml"
DEFAULT_HOME = "gateway-home"


@dataclass(frozen=True)
class HubSettings:
    address: str = "hub@gateway.localhost"
    certificates: tuple[Path, ...] = (Path("keys/hub.pem"),)
    private_keys: tuple[Path, ...] = (Path("keys/hub.key"),)
    passphrase_env: str = "GATEWAY_KEY_PASSPHRASE"  # noqa: S105 — a variable name
    passphrase_file: Path | None = None


@dataclass(frozen=True)
class TrustSettings:
    anchors: tuple[Path, ...] = (Path("trust/anchors"),)
    intermediates: tuple[Path, ...] = (Path("trust/intermediates"),)
    crls: tuple[Path, ...] = (Path("trust/crls"),)
    revocation: str = "hard-fail"
    ocsp_responder: str = ""  # replaces AIA OCSP URLs in `keys ocsp fetch`; empty: use them


@dataclass(frozen=True)
class DirectorySettings:
    file: Path = Path("agencies.toml")


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///archive.db"


@dataclass(frozen=True)
class ArchiveSettings:
    #: The archive master key (base64, mode 0600), created on first use; keep a backup.
    master_key_file: Path = Path("keys/archive.key")
    #: Sign a checkpoint after this many new entries (and on `gateway archive checkpoint`).
    checkpoint_every: int = 1000
    #: The name checkpoints carry (default: the hub's address).
    origin: str = ""


@dataclass(frozen=True)
class Settings:
    home: Path
    hub: HubSettings = field(default_factory=HubSettings)
    trust: TrustSettings = field(default_factory=TrustSettings)
    directory: DirectorySettings = field(default_factory=DirectorySettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    limits: Limits = field(default_factory=Limits)

    def path(self, p: Path) -> Path:
        """A configured path made absolute against the home directory."""
        return p if p.is_absolute() else self.home / p

    @property
    def database_url(self) -> str:
        """The database URL, a relative SQLite path made absolute against the home."""
        url = self.database.url
        prefix = "sqlite:///"
        if (
            url.startswith(prefix)
            and not url.startswith(prefix + "/")
            and url != prefix + ":memory:"
        ):
            return prefix + str((self.home / url[len(prefix) :]).absolute())
        return url

    @property
    def config_file(self) -> Path:
        return self.home / CONFIG_NAME


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    return Path(home or os.environ.get("GATEWAY_HOME") or DEFAULT_HOME).expanduser()


def load(home: Path) -> Settings:
    """Read ``home/gateway.toml`` if it exists; defaults otherwise."""
    config = home / CONFIG_NAME
    data: dict[str, Any] = {}
    if config.exists():
        try:
            data = tomllib.loads(config.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config}: not valid TOML ({exc})") from None
    unknown = set(data) - {"hub", "trust", "directory", "database", "archive", "limits"}
    if unknown:
        raise ConfigError(f"{config}: unknown section(s) {', '.join(sorted(unknown))}")
    settings = Settings(
        home=home,
        hub=_section(HubSettings, data.get("hub", {}), config, "hub"),
        trust=_section(TrustSettings, data.get("trust", {}), config, "trust"),
        directory=_section(DirectorySettings, data.get("directory", {}), config, "directory"),
        database=_section(DatabaseSettings, data.get("database", {}), config, "database"),
        archive=_section(ArchiveSettings, data.get("archive", {}), config, "archive"),
        limits=_section(Limits, data.get("limits", {}), config, "limits"),
    )
    if settings.trust.revocation not in ("hard-fail", "soft-fail"):
        raise ConfigError(f"{config}: [trust] revocation must be 'hard-fail' or 'soft-fail'")
    responder = settings.trust.ocsp_responder
    if responder and not responder.startswith(("http://", "https://")):
        raise ConfigError(
            f"{config}: [trust] ocsp_responder must be an http:// or https:// URL (or empty to "
            "use each certificate's own OCSP URL)"
        )
    if len(settings.hub.certificates) != len(settings.hub.private_keys):
        raise ConfigError(f"{config}: [hub] certificates and private_keys must pair up one to one")
    return settings


def _section(cls: type[Any], values: Any, config: Path, name: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{config}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(
            f"{config}: unknown key(s) in [{name}]: {', '.join(sorted(unknown))}; "
            f"known keys are {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        try:
            kwargs[key] = _coerce(value, default)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{config}: [{name}] {key} = {value!r} has the wrong type "
                f"(expected {type(default).__name__})"
            ) from None
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{config}: [{name}] {exc}") from None


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError
        return tuple(Path(v) for v in value)
    if isinstance(default, Path) or default is None:
        if not isinstance(value, str):
            raise TypeError
        return Path(value)
    if isinstance(default, bool) or not isinstance(value, type(default)):
        raise TypeError
    return value
