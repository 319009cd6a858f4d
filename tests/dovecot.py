"""A throw-away Dovecot IMAP server for the tests (the model is :mod:`tests.pg`).

:func:`start` writes a minimal configuration into a fresh temporary directory and runs
``dovecot -F -c <that file>``; nothing of the distribution's ``/etc/dovecot`` is read, and the
distribution's own service (if the package started one) is neither used nor touched. The server
listens on 127.0.0.1 only, on two free ports:

- ``port``: plain IMAP, where STARTTLS is offered and plaintext login is allowed (so a test can
  log in with or without TLS);
- ``tls_port``: IMAP over implicit TLS (IMAPS), with a throw-away CA and server certificate
  made at start-up (``ca_file`` is the CA to trust; the certificate names IP 127.0.0.1).

Users (``user1`` … ``user100``, random passwords) are written into a ``passwd-file`` before
the start; :meth:`DovecotServer.add_user` hands out one nobody has used yet, so each test gets an
empty INBOX. (Dovecot notices a changed passwd-file by its modification time, in whole seconds,
so adding users while it runs would race.) Mail is Maildir under the temporary directory, with
Dovecot's default hierarchy separator ``.``.

As root (the usual case in CI), the master runs as root and drops privileges as in production:
internal processes run as ``dovecot``, login processes as ``dovenull`` (both made by the Debian
package), mail processes as ``nobody``. Not as root, everything runs as the current user,
without chroot. The master is asked to die with the test process (``PR_SET_PDEATHSIG``,
SIGTERM; Dovecot's children follow their master), so even a killed test run leaves no server
behind; :meth:`DovecotServer.stop` removes everything, :meth:`DovecotServer.kill` kills it.

The binary is ``$DOVECOT_BIN`` if set (only there), else ``dovecot`` on ``PATH`` or
``/usr/sbin/dovecot``; without one, :class:`DovecotUnavailable` is raised.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from imapclient import IMAPClient

from keys.issuing import Issued, make_root
from tests import servers
from tests.servers import die_with_parent, free_port, tail

START_TIMEOUT = 30.0
HOST = "127.0.0.1"

CONFIG = """\
# tests/dovecot.py: a throw-away server; nothing else reads this file.
protocols = imap
listen = {host}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
ssl = yes
ssl_cert = <{root}/tls/cert.pem
ssl_key = <{root}/tls/key.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
first_valid_uid = {mail_uid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {tls_port}
    ssl = yes
  }}
{login_chroot}}}
{unprivileged}"""

# Not root: no chroot (it needs root), and every service runs as the current user.
UNPRIVILEGED = """\
service anvil {
  chroot =
}
"""


class DovecotUnavailable(RuntimeError):
    """No Dovecot binary on this machine."""


def find_binary() -> Path | None:
    if os.environ.get("DOVECOT_BIN"):  # an explicit choice: no looking elsewhere
        chosen = Path(os.environ["DOVECOT_BIN"])
        return chosen if chosen.is_file() else None
    on_path = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")
    return Path(on_path) if on_path else None


@dataclass
class DovecotServer:
    root: Path
    process: subprocess.Popen[bytes]
    port: int
    tls_port: int
    ca_file: Path
    _users: dict[str, str]
    _fresh: Iterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._fresh = iter(list(self._users))

    @property
    def log(self) -> Path:
        return self.root / "dovecot.log"

    def add_user(self) -> tuple[str, str]:
        """A user nobody has used yet (an empty mailbox): ``(username, password)``."""
        try:
            name = next(self._fresh)
        except StopIteration:
            raise RuntimeError(
                f"all {len(self._users)} test users are used; start(users_count=…)"
            ) from None
        return name, self._users[name]

    def password(self, username: str) -> str:
        return self._users[username]

    def body_bytes(self, username: str, timeout: float = 10.0) -> list[int]:
        """Message bytes Dovecot sent in each finished session of ``username`` (from its log).

        Dovecot logs ``body_bytes=`` when a session ends; this waits for at least one.
        """
        pattern = re.compile(rf"imap\({re.escape(username)}\).*Disconnected:.* body_bytes=(\d+)")
        deadline = time.monotonic() + timeout
        while True:
            found = [int(m[1]) for m in pattern.finditer(tail(self.log, 10_000))]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def client(self, username: str, *, tls: bool = False) -> IMAPClient:
        """A logged-in client (plain IMAP, or implicit TLS when ``tls``)."""
        if tls:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            client = IMAPClient(HOST, self.tls_port, ssl=True, ssl_context=context, timeout=10)
        else:
            client = IMAPClient(HOST, self.port, ssl=False, timeout=10)
        try:
            client.login(username, self._users[username])
        except BaseException:
            client.shutdown()
            raise
        return client

    def tail(self, lines: int = 30) -> str:
        return tail(self.log, lines)

    def kill(self) -> None:
        """Kill the master and every child at once (SIGKILL): the server dies mid-session."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Stop the master (its children follow) and remove everything."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            # Children still winding down belong to the master's process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _write_passwd(path: Path, users: dict[str, str]) -> None:
    path.write_text("".join(f"{name}:{{PLAIN}}{pw}::::::\n" for name, pw in users.items()))
    path.chmod(0o644)  # read by the auth process (the internal user); throw-away passwords


def _accounts() -> dict[str, str | int]:
    """Who the server's processes run as (see the module docstring)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(os.getegid()).gr_name
        return {
            "internal_user": me.pw_name,
            "internal_group": group,
            "login_user": me.pw_name,
            "mail_uid": me.pw_uid,
            "mail_gid": os.getegid(),
        }
    try:
        internal, login, mail = (pwd.getpwnam(n) for n in ("dovecot", "dovenull", "nobody"))
    except KeyError as exc:
        raise DovecotUnavailable(f"running as root, and there is no {exc} user") from None
    return {
        "internal_user": internal.pw_name,
        "internal_group": grp.getgrgid(internal.pw_gid).gr_name,
        "login_user": login.pw_name,
        "mail_uid": mail.pw_uid,
        "mail_gid": mail.pw_gid,
    }


def _write_tls(directory: Path) -> Path:
    """A throw-away CA and a server certificate for IP 127.0.0.1; returns the CA's PEM file."""
    directory.mkdir(mode=0o700)
    # OpenSSL checks validity against the real clock, so these dates follow it.
    now = datetime.now(UTC) - timedelta(hours=1)
    ca = make_root("tests/dovecot.py throw-away CA", at=now, days=2, key_kind="ec-p256")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca.key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(Issued(cert, key).cert_pem())
    (directory / "key.pem").write_bytes(Issued(cert, key).key_pem())
    (directory / "ca.pem").write_bytes(ca.cert_pem())
    return directory / "ca.pem"


def start(binary: Path | None = None, users_count: int = 100) -> DovecotServer:
    """Configure and start a private server; raises :class:`DovecotUnavailable` without one."""
    binary = binary or find_binary()
    if binary is None:
        raise DovecotUnavailable("the dovecot binary was not found (Debian: dovecot-imapd)")
    accounts = _accounts()
    root = Path(tempfile.mkdtemp(prefix="dovecot-t-"))
    try:
        root.chmod(0o755)  # mail processes (another user) reach their home below it
        mail = root / "mail"
        mail.mkdir()
        if os.geteuid() == 0:
            os.chown(mail, int(accounts["mail_uid"]), int(accounts["mail_gid"]))
        ca_file = _write_tls(root / "tls")
        users = {f"user{n}": secrets.token_urlsafe(12) for n in range(1, users_count + 1)}
        _write_passwd(root / "passwd", users)
        port, tls_port = free_port(), free_port()
        config = root / "dovecot.conf"
        config.write_text(
            CONFIG.format(
                host=HOST,
                root=root,
                port=port,
                tls_port=tls_port,
                login_chroot="" if os.geteuid() == 0 else "  chroot =\n",
                unprivileged="" if os.geteuid() == 0 else UNPRIVILEGED,
                **accounts,
            )
        )
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(root)}
        with open(root / "stdout.log", "wb") as out:
            process = subprocess.Popen(
                [str(binary), "-F", "-c", str(config)],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C at the terminal is for pytest, not the server
                preexec_fn=die_with_parent(),
            )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    server = DovecotServer(root, process, port, tls_port, ca_file, users)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: DovecotServer) -> None:
    servers.wait_ready(
        "dovecot",
        server.process,
        lambda: servers.greets(server.port, b"* OK"),
        lambda: f"{tail(server.root / 'stdout.log')}\n{server.tail()}",
        timeout=START_TIMEOUT,
    )


def module_fixture() -> Any:
    """A module-scoped pytest fixture with one Dovecot for a module's tests (skipped where there
    is none, failed under CI): ``server = dovecot.module_fixture()`` in the test module."""

    @pytest.fixture(scope="module")
    def server() -> Iterator[DovecotServer]:
        started = start_or_skip()
        try:
            yield started
        finally:
            started.stop()

    return server


def start_or_skip() -> DovecotServer:
    """:func:`start`, or skip the test when there is no usable Dovecot (fail under CI, or with
    TESTS_REQUIRE_DOVECOT set)."""
    return servers.start_or_skip(start, DovecotUnavailable, "Dovecot", "TESTS_REQUIRE_DOVECOT")
