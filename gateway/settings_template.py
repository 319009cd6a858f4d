"""The commented ``gateway.toml`` that ``gateway init`` writes.

Every section and key of :mod:`gateway.settings` with its default, commented; generated from
:func:`gateway.settings.defaults`, so it cannot fall behind the settings. A few keys carry a
note; a key unset by default shows an example instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway import settings as settings_mod
from keys.agency_io import toml_string

_HEADER = """\
# Official-mail gateway settings. Every key is optional: each is shown commented with its
# default, except a key that is unset by default, shown with an example ("unset").
# Relative paths are relative to this directory. README.md and docs/ explain them.
"""

#: An example for each key that is unset by default (the template must show some value).
EXAMPLES: dict[tuple[str, str], str] = {
    ("hub", "passphrase_file"): "keys/passphrase",
    ("listen", "tls_certificate"): "keys/smtp.pem",
    ("listen", "tls_key"): "keys/smtp.key",
    ("listen", "auth_file"): "keys/submitters",
    ("imap", "password_file"): "keys/imap-password",
    ("imap", "ca_file"): "trust/imap-ca.pem",
    ("relay", "password_file"): "keys/relay-password",
    ("relay", "ca_file"): "trust/relay-ca.pem",
    ("compliance", "overlay"): "calendar.toml",
    ("compliance", "templates"): "reminders.toml",
}

#: A short note beside some keys.
NOTES: dict[tuple[str, str], str] = {
    ("hub", "certificates"): "several during a rotation: old and new overlap",
    ("hub", "private_keys"): "encrypted PEM; same order as certificates",
    ("hub", "passphrase_file"): "instead of passphrase_env",
    ("trust", "anchors"): "files or directories of CA certificates",
    ("trust", "revocation"): 'or "soft-fail"',
    ("trust", "ocsp_responder"): "empty: each certificate's own OCSP URL",
    ("database", "url"): "or postgresql+psycopg://user@host/dbname",
    ("archive", "master_key_file"): "encrypts payloads at rest: back it up",
    ("archive", "origin"): "empty: the hub's address",
    ("listen", "smtp"): '"" for no SMTP listener',
    ("listen", "lmtp"): 'e.g. "127.0.0.1:2424" for a Postfix hand-off',
    ("listen", "auth_file"): "SMTP AUTH: `gateway submitters set ADDR`",
    ("imap", "host"): '"" disables IMAP mode',
    ("imap", "security"): '"tls", "starttls" or "none" (loopback)',
    ("relay", "security"): '"starttls", "require-starttls", "tls" or "none"',
    ("compliance", "remind_at"): 'local time; "off": only `gateway remind`',
    ("compliance", "templates"): "default: reminders.toml here, if present",
    ("serve", "metrics"): '"" disables the Prometheus endpoint',
    ("serve", "admin_address"): "failures are e-mailed here (and logged)",
}


def template() -> str:
    """The commented gateway.toml: every section and key, with its default."""
    out = [_HEADER]
    for section, keys in settings_mod.defaults().items():
        out.append(f"\n[{section}]\n")
        for key, default in keys.items():
            if default is None:
                line = f"# {key} = {_toml(Path(EXAMPLES[section, key]))}"
                note = "; ".join(filter(None, ("unset", NOTES.get((section, key)))))
            else:
                line = f"# {key} = {_toml(default)}"
                note = NOTES.get((section, key), "")
            out.append(f"{line:<40} # {note}\n" if note else f"{line}\n")
    return "".join(out)


def _toml(value: Any) -> str:
    """A default as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return toml_string(str(value))
