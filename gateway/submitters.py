"""SMTP AUTH for agencies that submit straight to the hub's listener (not through their own MX).

Optional: with no ``[listen] auth_file`` the listener offers no AUTH. With one, it offers AUTH
PLAIN and LOGIN — only after STARTTLS, so a password never crosses the network in clear — and
``[listen] require_auth`` makes it mandatory (530 before AUTH). A submitter's login is its
e-mail address, and it may only send ``MAIL FROM`` that address: one agency's password does
not let it submit as another (the signature check would refuse that too, later; this refuses it
at the door, with 553 5.7.1).

The file holds one ``address scrypt$N$r$p$salt$hash`` line per submitter (``#`` comments),
mode 0600, written by ``gateway submitters set``. Hashes are scrypt (RFC 7914, stdlib); a
verified password is remembered in memory (as a salted digest) so that a client that opens a
session per message does not pay scrypt's cost each time.

scrypt costs ~40 ms of CPU a check: the listener awaits :meth:`Authenticator.verify`, which runs
it in the authenticator's own :data:`CHECK_THREADS` threads, never on the event loop (where a
few wrong passwords would hold up every session). At most :data:`MAX_WAITING` checks wait for
a thread; past that, AUTH gets ``454 4.7.0`` (RFC 4954 §6: try again later) at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from formats.errors import ConfigError

N, R, P = 2**14, 8, 1

#: scrypt checks at once (each ~40 ms of CPU and 16 MiB of memory).
CHECK_THREADS = 2
#: Checks that may wait for a thread; more are refused (454) rather than queued.
MAX_WAITING = 32
#: RFC 4954 §6: "454 4.7.0 Temporary authentication failure".
BUSY = "454 4.7.0 Temporary authentication failure; try again later"


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def read_file(path: Path) -> dict[str, str]:
    """address (lower case) → stored hash; ConfigError naming the line on anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"submitters file {path}: {exc.strerror}") from None
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or "@" not in parts[0] or not parts[1].startswith("scrypt$"):
            raise ConfigError(
                f"{path}:{number}: expected 'address scrypt$…' (gateway submitters set)"
            )
        out[parts[0].lower()] = parts[1]
    return out


def write_file(path: Path, entries: Mapping[str, str]) -> None:
    """Replace the file atomically, mode 0600."""
    lines = ["# SMTP AUTH submitters: address and scrypt hash (gateway submitters set)"]
    lines += [f"{address} {stored}" for address, stored in sorted(entries.items())]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Authenticator:
    """An aiosmtpd ``authenticator``: checks a login (an address) and its password.

    The listener awaits :meth:`verify` (scrypt off the event loop); calling the object itself
    is aiosmtpd's synchronous interface, the same check on the caller's thread.
    """

    def __init__(
        self,
        entries: Mapping[str, str],
        *,
        threads: int = CHECK_THREADS,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.entries = dict(entries)
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()
        self._pepper = os.urandom(16)
        self._nobody = hash_password(base64.b64encode(os.urandom(24)).decode())  # see _lookup
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="smtp-auth")
        self._max_checks = threads + max_waiting
        self._checks = 0  # running or waiting for a thread

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        found = self._lookup(data)
        if found is None:
            return AuthResult(success=False, handled=False)
        login, stored, password, memo = found
        return self._result(login, memo, ok=self._known(memo) or check_password(stored, password))

    async def verify(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """:meth:`__call__` with scrypt in the authenticator's threads, off the event loop."""
        found = self._lookup(data)
        if found is None:
            return AuthResult(success=False, handled=False)
        login, stored, password, memo = found
        if self._known(memo):
            return self._result(login, memo, ok=True)
        with self._lock:
            if self._checks >= self._max_checks:
                return AuthResult(success=False, handled=False, message=BUSY)
            self._checks += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._executor, check_password, stored, password)
        finally:
            with self._lock:
                self._checks -= 1
        return self._result(login, memo, ok=ok)

    def _lookup(self, data: Any) -> tuple[str, str, str, bytes] | None:
        """``(login, stored hash, password, memo)``, else ``None`` (not a login and password).
        A login that is not a submitter's is checked against a hash no password matches, so
        that a wrong login takes as long as a wrong password: the time of the answer does not
        tell which addresses may submit."""
        if not isinstance(data, LoginPassword):
            return None
        login = data.login.decode("utf-8", "replace").strip().lower()
        password = data.password.decode("utf-8", "replace")
        stored = self.entries.get(login, self._nobody)
        memo = hashlib.sha256(self._pepper + stored.encode() + b"\0" + password.encode()).digest()
        return login, stored, password, memo

    def _known(self, memo: bytes) -> bool:
        with self._lock:
            return memo in self._verified

    def _result(self, login: str, memo: bytes, *, ok: bool) -> AuthResult:
        if not ok or login not in self.entries:  # an unknown login was checked for its time only
            return AuthResult(success=False, handled=False)
        with self._lock:
            self._verified.add(memo)
        return AuthResult(success=True, auth_data=login)
