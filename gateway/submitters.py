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

Guessing is throttled (:class:`Throttle`): failed logins are counted per peer address and per
login, so that reconnecting (AUTH is allowed 3 times a session) gains nothing. Past
:data:`FREE_FAILURES` failures, each further one locks that address or login out for
:data:`LOCKOUT` seconds, doubled at each failure up to :data:`MAX_LOCKOUT`; while locked out,
AUTH gets ``454 4.7.0`` at once, with no password checked (the right password too, so that a
lockout tells nothing). Each attempt counts as it begins, so that checks run at once cannot
slip past a lockout. A login's lockout does not apply to an address it has logged in from
(:data:`FORGET_AFTER`): a guesser elsewhere cannot lock an agency out from its own address.
The counts are kept in memory, per authenticator: a restart forgets them. Each failure is
logged on one WARNING line, ``SMTP AUTH failed from <address> for <login> …``, for fail2ban
(``docs/service.md``); the refusals while locked out are not (a peer cannot fill the log).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from formats.errors import ConfigError
from gateway.smtp_checks import peer_parts, safe_text

log = logging.getLogger("gateway.smtp")

N, R, P = 2**14, 8, 1

#: scrypt checks at once (each ~40 ms of CPU and 16 MiB of memory).
CHECK_THREADS = 2
#: Checks that may wait for a thread; more are refused (454) rather than queued.
MAX_WAITING = 32
#: RFC 4954 §6: "454 4.7.0 Temporary authentication failure".
BUSY = "454 4.7.0 Temporary authentication failure; try again later"

#: Failed logins a peer address, or a login, may have before each further one locks it out.
FREE_FAILURES = 5
#: Seconds of the first lockout; each further failure doubles it, up to MAX_LOCKOUT. From one
#: address: 5 guesses, then about one a minute, fewer and fewer, at most one an hour.
LOCKOUT = 60.0
MAX_LOCKOUT = 3600.0
#: An address's or login's failures are forgotten after this long without one; an address a
#: login succeeded from is exempt from that login's lockout for as long.
FORGET_AFTER = 86_400.0
#: Addresses and logins tracked at most (each); past it the oldest are forgotten.
MAX_TRACKED = 100_000
#: While locked out (RFC 4954 §6: a temporary failure; the client may try again later).
LOCKED = "454 4.7.0 Too many failed logins; try again later"


class Throttle:
    """Failed logins counted per peer address and per login, in memory (module docstring).

    ``clock`` gives seconds (monotonic); tests pass their own. One per authenticator.
    """

    def __init__(
        self,
        *,
        free: int = FREE_FAILURES,
        lockout: float = LOCKOUT,
        max_lockout: float = MAX_LOCKOUT,
        forget_after: float = FORGET_AFTER,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free, self.lockout, self.max_lockout = free, lockout, max_lockout
        self.forget_after, self.max_tracked, self.clock = forget_after, max_tracked, clock
        #: key ("address", a) or ("login", l) → (failures, last failure, locked until, locked
        #: until before the last attempt: what taking that attempt back restores).
        self._failures: dict[tuple[str, str], tuple[int, float, float, float]] = {}
        #: (login, address) it succeeded from → when.
        self._trusted: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def locked(self, address: str, login: str) -> float:
        """Seconds ``address``, or ``login`` from ``address``, is still locked out (0: not)."""
        with self._lock:
            now = self.clock()
            keys = [("address", address)]
            if not self._is_trusted(login, address, now):
                keys.append(("login", login))
            return max(0.0, *(self._entry(key, now)[2] - now for key in keys))

    def attempt(self, address: str, login: str) -> tuple[int, float]:
        """Count an attempt as a failure *before* its password is checked, so that checks under
        way at once cannot slip past a lockout between them (:meth:`succeeded` takes it back):
        ``(failures from address, seconds it is now locked out)``."""
        with self._lock:
            now = self.clock()
            counts, locks = [], []
            for key in (("address", address), ("login", login)):
                count, _, before, _ = self._entry(key, now)
                count += 1
                until = before
                if count > self.free:
                    lock = self.lockout * 2 ** min(count - self.free - 1, 32)
                    until = now + min(lock, self.max_lockout)
                self._put(self._failures, key, (count, now, until, before))
                counts.append(count)
                locks.append(until - now)
            return counts[0], max(0.0, *locks)

    def succeeded(self, address: str, login: str, *, attempted: bool) -> None:
        """The address may log in as ``login`` through that login's lockout from now on. This
        attempt, if it was counted (``attempted``), is taken back from the address and from the
        login; their other failures stay counted: one good login of its own must not wipe an
        address's slate between guesses at other logins."""
        with self._lock:
            now = self.clock()
            if attempted:
                for key in (("address", address), ("login", login)):
                    count, last, _, before = self._entry(key, now)
                    if count > 1:  # the lockout this attempt earned goes with it
                        self._failures[key] = (count - 1, last, before, before)
                    else:
                        self._failures.pop(key, None)
            self._put(self._trusted, (login, address), now)

    def _entry(self, key: tuple[str, str], now: float) -> tuple[int, float, float, float]:
        entry = self._failures.get(key)
        if entry is None or (now - entry[1] > self.forget_after and now >= entry[2]):
            return 0, now, now, now
        return entry

    def _is_trusted(self, login: str, address: str, now: float) -> bool:
        since = self._trusted.get((login, address))
        return since is not None and now - since <= self.forget_after

    def _put(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        table.pop(key, None)  # (re)inserted last: the dict is oldest first
        table[key] = value
        while len(table) > self.max_tracked:
            del table[next(iter(table))]


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
        throttle: Throttle | None = None,
    ) -> None:
        self.entries = dict(entries)
        #: Failed logins per address and per login (module docstring).
        self.throttle = throttle or Throttle()
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
        address = _address(session)
        if self.throttle.locked(address, login):
            return AuthResult(success=False, handled=False, message=LOCKED)
        if self._known(memo):
            return self._result(login, memo, address=address, counted=None)
        counted = self.throttle.attempt(address, login)
        ok = check_password(stored, password)
        return self._result(login, memo, address=address, counted=counted, ok=ok)

    async def verify(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """:meth:`__call__` with scrypt in the authenticator's threads, off the event loop."""
        found = self._lookup(data)
        if found is None:
            return AuthResult(success=False, handled=False)
        login, stored, password, memo = found
        address = _address(session)
        if self.throttle.locked(address, login):  # before the memo: the right password too
            return AuthResult(success=False, handled=False, message=LOCKED)
        if self._known(memo):
            return self._result(login, memo, address=address, counted=None)
        with self._lock:
            if self._checks >= self._max_checks:
                return AuthResult(success=False, handled=False, message=BUSY)
            self._checks += 1
        try:
            counted = self.throttle.attempt(address, login)
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._executor, check_password, stored, password)
        finally:
            with self._lock:
                self._checks -= 1
        return self._result(login, memo, address=address, counted=counted, ok=ok)

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

    def _result(
        self,
        login: str,
        memo: bytes,
        *,
        address: str,
        counted: tuple[int, float] | None,
        ok: bool = True,
    ) -> AuthResult:
        """The answer to a login; ``counted``: what :meth:`Throttle.attempt` said before the
        check, ``None`` for a password verified before (no check, nothing counted)."""
        if not ok or login not in self.entries:  # (an unknown login: checked for its time only)
            failures, locked = counted or self.throttle.attempt(address, login)
            # One line per failure, the address first (fail2ban: "SMTP AUTH failed from <HOST>
            # "); the login is the peer's text, reduced to address characters.
            log.warning(
                "SMTP AUTH failed from %s for %s (%d from this address%s)",
                address,
                safe_text(login),
                failures,
                f"; locked out for {locked:.0f} s" if locked else "",
            )
            return AuthResult(success=False, handled=False)
        self.throttle.succeeded(address, login, attempted=counted is not None)
        with self._lock:
            self._verified.add(memo)
        return AuthResult(success=True, auth_data=login)


def _address(session: Session) -> str:
    """The peer's address, without the port."""
    return peer_parts(session.peer)[0]
