"""Settings: one TOML file, ``gateway.toml``, in the gateway's home directory.

The home is ``--home`` or ``$GATEWAY_HOME`` or ``./gateway-home``. Every setting has a default,
so the gateway runs with no file at all; relative paths are relative to the home. Only the CLI
reads settings (DESIGN §2); everything else receives values. Every number has a range
(:data:`RANGES`), checked at load like everything else: one ConfigError line naming the key.

Example (all keys optional)::

    [hub]
    address = "hub@gateway.example.gov.vn"
    certificates = ["keys/hub.pem"]          # one or more: old and new overlap during rotation
    private_keys = ["keys/hub.key"]          # same order as certificates
    passphrase_env = "GATEWAY_KEY_PASSPHRASE"  # or passphrase_file = "..."
    organ_id = "GATEWAY"                     # the hub's edXML OrganId (sender of receipts)
    organ_name = "Cổng trao đổi thư công vụ"

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

    [listen]                                 # `gateway serve`
    smtp = "127.0.0.1:2525"                  # host:port, or "" for no SMTP listener
    lmtp = ""                                # e.g. "127.0.0.1:2424" for a Postfix hand-off
    # tls_certificate = "keys/smtp.pem"      # PEM files for STARTTLS (SMTP only)
    # tls_key = "keys/smtp.key"
    require_tls = false                      # true: 530 until STARTTLS
    # auth_file = "keys/submitters"          # SMTP AUTH (after STARTTLS) for agencies that
                                             # submit directly: `gateway submitters set ADDR`
    require_auth = false                     # true: 530 until AUTH (needs auth_file)
    max_recipients = 50
    timeout = 300.0                          # seconds a session may idle
    max_sessions = 100                       # sessions at once (each listener); over it: 421
    max_sessions_per_ip = 20                 # … from one IP address

    [imap]                                   # poll a mailbox instead of (or as well as) listening
    host = ""                                # "" disables IMAP mode
    port = 993
    security = "tls"                         # "tls" (implicit), "starttls" or "none" (loopback)
    username = ""
    password_env = "GATEWAY_IMAP_PASSWORD"   # or password_file = "..."
    mailbox = "INBOX"
    done_mailbox = "Gateway/Processed"       # taken-in messages are moved here after commit
    poll_seconds = 30.0                      # between polls when IDLE is not offered
    # ca_file = "trust/imap-ca.pem"          # extra CA bundle for the server's certificate

    [relay]                                  # outbound: receipts, deliveries, alerts
    host = "127.0.0.1"
    port = 25
    security = "starttls"                    # "starttls" (if offered), "require-starttls",
                                             # "tls" (implicit) or "none"
    username = ""                            # AUTH only when set
    password_env = "GATEWAY_RELAY_PASSWORD"  # or password_file = "..."
    timeout = 60.0
    # ca_file = "trust/relay-ca.pem"

    [compliance]
    include_proposed = true                  # calendar: apply proposed day-off swaps
    include = ""                             # calendar overlay ids to apply, comma-separated
    exclude = ""                             # … and to drop (e.g. "2026-national-day-swap")
    # overlay = "calendar.toml"              # extra official changes (docs/compliance.md)
    remind_at = "08:00"                      # reminders: each working day at this local time
                                             # ("off": only `gateway remind`, e.g. from a timer)
    courtesy_days = 2                        # courtesy notice: working days before due
    escalate_after_days = 5                  # escalate to the supervisor: working days late
    certificate_days = 30                    # warn before an agency certificate expires
    # templates = "reminders.toml"           # reminder texts (default: reminders.toml if present)
    # reminders_from = "2026-12-01"          # no reminder for periods due before (go-live day)

    [serve]
    workers = 2                              # pipeline processes (crypto off the SMTP loop)
    metrics = "127.0.0.1:9466"               # Prometheus text endpoint; "" disables
    admin_address = ""                       # failures are e-mailed here (and logged)
    give_up_after_hours = 48.0               # outbound: stop retrying, mark failed, alert
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any

from formats.errors import ConfigError
from formats.limits import Limits
from keys.directory import normalize_email

CONFIG_NAME = "gateway.toml"
DEFAULT_HOME = "gateway-home"


#: ``[compliance] remind_at`` that turns the daily reminder run of ``gateway serve`` off.
REMIND_OFF = "off"


@dataclass(frozen=True)
class HubSettings:
    address: str = "hub@gateway.localhost"
    certificates: tuple[Path, ...] = (Path("keys/hub.pem"),)
    private_keys: tuple[Path, ...] = (Path("keys/hub.key"),)
    passphrase_env: str = "GATEWAY_KEY_PASSPHRASE"  # noqa: S105 — a variable name
    passphrase_file: Path | None = None
    #: The hub's own edXML OrganId and name, used as the sender of receipts.
    organ_id: str = "GATEWAY"
    organ_name: str = "Cổng trao đổi thư công vụ"


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
    #: How long a SQLite writer waits for the lock before the message gets 451 (milliseconds).
    busy_timeout_ms: int = 5000


@dataclass(frozen=True)
class ListenSettings:
    smtp: str = "127.0.0.1:2525"
    lmtp: str = ""
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False
    auth_file: Path | None = None
    require_auth: bool = False
    max_recipients: int = 50
    timeout: float = 300.0
    #: Sessions open at once, per listener, and from one IP address (gateway.smtp).
    max_sessions: int = 100
    max_sessions_per_ip: int = 20


@dataclass(frozen=True)
class ImapSettings:
    host: str = ""
    port: int = 993
    security: str = "tls"
    username: str = ""
    password_env: str = "GATEWAY_IMAP_PASSWORD"  # noqa: S105 — a variable name
    password_file: Path | None = None
    mailbox: str = "INBOX"
    done_mailbox: str = "Gateway/Processed"
    poll_seconds: float = 30.0
    ca_file: Path | None = None


@dataclass(frozen=True)
class RelaySettings:
    host: str = "127.0.0.1"
    port: int = 25
    security: str = "starttls"
    username: str = ""
    password_env: str = "GATEWAY_RELAY_PASSWORD"  # noqa: S105 — a variable name
    password_file: Path | None = None
    timeout: float = 60.0
    ca_file: Path | None = None


@dataclass(frozen=True)
class ComplianceSettings:
    include_proposed: bool = True
    include: str = ""
    exclude: str = ""
    overlay: Path | None = None
    remind_at: str = "08:00"
    courtesy_days: int = 2
    escalate_after_days: int = 5
    certificate_days: int = 30
    templates: Path | None = None
    #: No reminder for a period due before this day (YYYY-MM-DD; "": none): the day the hub
    #: went live, so that its first run does not send notices for months it never served.
    reminders_from: str = ""

    def __post_init__(self) -> None:
        if self.reminders_from:
            try:
                date.fromisoformat(self.reminders_from)
            except ValueError:
                raise ValueError(
                    f"reminders_from = {self.reminders_from!r} is not a day (YYYY-MM-DD)"
                ) from None

    def since(self) -> date | None:
        return date.fromisoformat(self.reminders_from) if self.reminders_from else None

    def ids(self, which: str) -> tuple[str, ...]:
        return tuple(i.strip() for i in getattr(self, which).split(",") if i.strip())


@dataclass(frozen=True)
class ServeSettings:
    workers: int = 2
    metrics: str = "127.0.0.1:9466"
    admin_address: str = ""
    give_up_after_hours: float = 48.0


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
    listen: ListenSettings = field(default_factory=ListenSettings)
    imap: ImapSettings = field(default_factory=ImapSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    compliance: ComplianceSettings = field(default_factory=ComplianceSettings)

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


_SECTIONS: dict[str, type[Any]] = {
    "hub": HubSettings,
    "trust": TrustSettings,
    "directory": DirectorySettings,
    "database": DatabaseSettings,
    "archive": ArchiveSettings,
    "limits": Limits,
    "listen": ListenSettings,
    "imap": ImapSettings,
    "relay": RelaySettings,
    "serve": ServeSettings,
    "compliance": ComplianceSettings,
}


#: The range of every number in the settings: ``(section, key): (low, high, above)``; with
#: ``above`` the value must be more than ``low``, otherwise at least ``low``. ``[limits]`` checks
#: itself (every limit a positive integer). Ports of the servers the gateway connects to are
#: 1-65535; listener addresses (host:port strings) may use port 0 for "any free port".
RANGES: dict[tuple[str, str], tuple[float, float, bool]] = {
    ("database", "busy_timeout_ms"): (0, 3_600_000, False),  # an hour: anything longer is a hang
    ("archive", "checkpoint_every"): (1, 10_000_000, False),
    ("listen", "max_recipients"): (1, 10_000, False),  # RFC 5321 §4.5.3.1.8: at least 100 ok
    ("listen", "timeout"): (0, 86_400, True),
    ("listen", "max_sessions"): (1, 100_000, False),
    ("listen", "max_sessions_per_ip"): (1, 100_000, False),
    ("imap", "port"): (1, 65_535, False),
    ("imap", "poll_seconds"): (0, 86_400, True),
    ("relay", "port"): (1, 65_535, False),
    ("relay", "timeout"): (0, 86_400, True),
    ("compliance", "courtesy_days"): (0, 60, False),  # working days
    ("compliance", "escalate_after_days"): (0, 250, False),  # working days: about a year
    ("compliance", "certificate_days"): (0, 3_650, False),
    ("serve", "workers"): (1, 64, False),
    ("serve", "give_up_after_hours"): (0, 24 * 366, True),
}


def defaults() -> dict[str, dict[str, Any]]:
    """Every section and key, in the order of :class:`Settings`, with its default (``None``:
    unset by default). What ``gateway init`` writes, commented."""
    base = Settings(home=Path())
    return {
        name: {f.name: getattr(getattr(base, name), f.name) for f in fields(cls)}
        for name, cls in _SECTIONS.items()
    }


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    return Path(home or os.environ.get("GATEWAY_HOME") or DEFAULT_HOME).expanduser()


def load(home: Path) -> Settings:
    """Read ``home/gateway.toml`` if it exists; defaults otherwise."""
    config = home / CONFIG_NAME
    data: dict[str, Any] = {}
    text = _read_config(config)
    if text is not None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config}: not valid TOML ({exc})") from None
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ConfigError(
            f"{config}: unknown section(s) {', '.join(sorted(unknown))}; "
            f"known sections are {', '.join(_SECTIONS)}"
        )
    settings = Settings(
        home=home,
        **{
            name: _section(cls, data.get(name, {}), config, name) for name, cls in _SECTIONS.items()
        },
    )
    if settings.trust.revocation not in ("hard-fail", "soft-fail"):
        raise ConfigError(f"{config}: [trust] revocation must be 'hard-fail' or 'soft-fail'")
    responder = settings.trust.ocsp_responder
    if responder and not responder.startswith(("http://", "https://")):
        raise ConfigError(
            f"{config}: [trust] ocsp_responder must be an http:// or https:// URL (or empty to "
            "use each certificate's own OCSP URL)"
        )
    # Both go into the headers of every receipt, delivery and alert.
    addresses = {"[hub] address": settings.hub.address}
    if settings.serve.admin_address:
        addresses["[serve] admin_address"] = settings.serve.admin_address
    for where, address in addresses.items():
        try:
            normalize_email(address)
        except ValueError as exc:  # why, and for a non-ASCII domain its ASCII (xn--) form
            raise ConfigError(
                f"{config}: {where} must be one bare ASCII e-mail address (local@domain): {exc}"
            ) from None
    if len(settings.hub.certificates) != len(settings.hub.private_keys):
        raise ConfigError(f"{config}: [hub] certificates and private_keys must pair up one to one")
    _check_choice(config, "imap", "security", settings.imap.security, ("tls", "starttls", "none"))
    _check_choice(
        config,
        "relay",
        "security",
        settings.relay.security,
        ("starttls", "require-starttls", "tls", "none"),
    )
    for name, value in (("smtp", settings.listen.smtp), ("lmtp", settings.listen.lmtp)):
        if value:
            host_port(value, f"{config}: [listen] {name}")
    if settings.serve.metrics:
        host_port(settings.serve.metrics, f"{config}: [serve] metrics")
    hour, _, minute = settings.compliance.remind_at.partition(":")
    if settings.compliance.remind_at != REMIND_OFF and not (
        _digits(hour) and _digits(minute) and int(hour) < 24 and int(minute) < 60
    ):
        raise ConfigError(
            f'{config}: [compliance] remind_at must be HH:MM (local time) or "{REMIND_OFF}"'
        )
    for (section, key), (low, high, above) in RANGES.items():
        _check_range(
            config, section, key, getattr(getattr(settings, section), key), low, high, above
        )
    if settings.listen.require_tls and settings.listen.tls_certificate is None:
        raise ConfigError(f"{config}: [listen] require_tls needs tls_certificate and tls_key")
    if settings.listen.auth_file is not None and settings.listen.tls_certificate is None:
        raise ConfigError(
            f"{config}: [listen] auth_file needs tls_certificate and tls_key (AUTH only over TLS)"
        )
    if settings.listen.require_auth and settings.listen.auth_file is None:
        raise ConfigError(f"{config}: [listen] require_auth needs auth_file")
    return settings


def _read_config(config: Path) -> str | None:
    """The text of ``gateway.toml``; None if there is none. A file that is there but cannot
    be read (a directory, no permission, a dangling link) is a ConfigError, never defaults."""
    try:
        return config.read_text(encoding="utf-8")
    except FileNotFoundError:
        if config.is_symlink():
            raise ConfigError(f"{config}: a symbolic link to a file that does not exist") from None
        return None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config}: not valid TOML (not UTF-8 text: {exc})") from None
    except IsADirectoryError:
        raise ConfigError(f"{config}: is a directory, not a settings file") from None
    except OSError as exc:
        raise ConfigError(f"{config}: cannot be read ({exc.strerror or exc})") from None


def _digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes "²" and "٣", which ``int`` refuses or reads."""
    return text.isascii() and text.isdigit()


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _check_range(
    config: Path, section: str, key: str, value: float, low: float, high: float, above: bool
) -> None:
    if above and not value > low:
        wrong = f"must be more than {_number(low)}"
    elif not above and not value >= low:
        wrong = f"must be at least {_number(low)}"
    elif not value <= high:
        wrong = f"must be at most {_number(high)}"
    else:
        return
    raise ConfigError(f"{config}: [{section}] {key} {wrong} (not {value!r})")


def host_port(value: str, where: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:25"`` for IPv6) as a pair; ConfigError naming ``where``."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not _digits(port) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where} = {value!r}: expected host:port, e.g. 127.0.0.1:2525")
    return host, int(port)


def _check_choice(
    config: Path, section: str, key: str, value: str, allowed: tuple[str, ...]
) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{config}: [{section}] {key} = {value!r}; choose one of {', '.join(allowed)}"
        )


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
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, type(default)):
        raise TypeError
    return value
