"""A throw-away Postfix MX in front of the gateway, for the tests (the model is :mod:`tests.pg`).

:func:`start` builds a private Postfix instance from Debian's ``postfix`` package in a fresh
temporary directory: its own ``config_directory`` (``etc/``: ``main.cf`` written with
``postconf -c etc -e``, a ``master.cf`` of our own), ``queue_directory`` (``queue/``),
``data_directory`` (``data/``, where ``master.lock`` lives) and ``maillog_file`` (``maillog``,
through the ``postlog`` service). Nothing of the distribution's ``/etc/postfix`` configuration
is read, and a system instance (if there is one) is neither used nor touched.

The instance plays the city's MX as ``deploy/postfix/`` describes it, on loopback only:

- ``smtpd`` listens on ``127.0.0.1:port`` (a free port), ``mynetworks = 127.0.0.0/8``;
- mail for ``relay_domains`` (the hub's domain) is accepted only for the addresses in
  ``relay_recipient_maps`` (the hub's), and ``transport_maps`` hands it to the gateway's LMTP
  listener (``lmtp:inet:127.0.0.1:lmtp_port``); both maps are ``texthash:`` (no ``postmap``);
- everything else — the gateway's receipts, deliveries and alerts, and Postfix's own bounces —
  goes to ``relayhost = [127.0.0.1]:relay_port``, a sink in the test process, so nothing leaves
  the machine (no DNS either: ``disable_dns_lookups``, ``smtp_host_lookup = native``).

Start-up: ``postfix -c etc check`` creates the queue directories with Postfix's owners
(``postfix``, group ``postdrop`` for ``maildrop``/``public``); then the ``master`` daemon is run
directly in the foreground (``master -c etc -s``, what ``postfix start-fg`` runs) as our child,
in a process group of its own. ``PR_SET_PDEATHSIG`` cannot be put on the master itself: it
switches its effective user and group ids while it starts, and Linux clears the parent-death
signal on any change of credentials (seen here: the master outlived its parent). So a watchdog
process (:data:`WATCHDOG`) holds it instead: when the test process goes away, even by SIGKILL,
the watchdog kills the master's process group and removes the directory.
:meth:`PostfixServer.stop` runs ``postfix -c etc stop``, kills what is left of the master's
process group, stops the watchdog and removes everything.

Postfix's master must run as root (its daemons drop to ``mail_owner``); not as root, or without
the binaries, :class:`PostfixUnavailable` is raised. The binaries are found in ``$POSTFIX_SBIN``
if set (only there), else next to ``postfix`` on ``PATH`` or in ``/usr/sbin``.

:func:`burst` pushes many messages through the MX at once (several SMTP clients in threads).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import servers
from tests.servers import die_with_parent, free_port, tail

START_TIMEOUT = 30.0
HOST = "127.0.0.1"
HUB_DOMAIN = "exchange.hanoi.gov.vn"
HUB_ADDRESSES = ("hub@exchange.hanoi.gov.vn",)
#: The gateway's default ``[limits] max_message_bytes`` (32 MiB); deploy/postfix matches it.
MESSAGE_SIZE_LIMIT = 32 * 1024 * 1024

#: Our master.cf: no chroot (the queue directory is not a prepared jail), no local delivery.
#: ``{port}`` is the smtpd port. The columns: service type private unpriv chroot wakeup maxproc.
MASTER_CF = """\
# tests/postfix.py: a throw-away instance; nothing else reads this file.
{host}:{port} inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


#: Run as ``python -c WATCHDOG PGID ROOT PARENT`` with PR_SET_PDEATHSIG: on SIGTERM (the test
#: process died) or if the parent is already gone, kill the Postfix process group PGID and
#: remove ROOT.
WATCHDOG = """\
import os, shutil, signal, sys
pgid, root, parent = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def die(*_):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    shutil.rmtree(root, ignore_errors=True)
    os._exit(0)
signal.signal(signal.SIGTERM, die)
if os.getppid() != parent:
    die()
while True:
    signal.pause()
"""


class PostfixUnavailable(RuntimeError):
    """No usable Postfix here (not installed, or not root)."""


def find_sbin() -> Path | None:
    """The directory holding ``postfix``, ``postconf`` and ``postqueue``, or ``None``."""
    if os.environ.get("POSTFIX_SBIN"):  # an explicit choice: no looking elsewhere
        chosen = Path(os.environ["POSTFIX_SBIN"])
        return chosen if (chosen / "postfix").is_file() else None
    found = shutil.which("postfix") or shutil.which("postfix", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        return None
    sbin = Path(found).resolve().parent
    return sbin if all((sbin / n).is_file() for n in ("postconf", "postqueue")) else None


@dataclass
class QueuedMessage:
    """One entry of ``postqueue -j``."""

    queue_id: str
    queue_name: str  # incoming, active, deferred, hold, maildrop
    sender: str
    recipients: list[dict[str, Any]]

    @property
    def reasons(self) -> list[str]:
        return [str(r.get("delay_reason", "")) for r in self.recipients]


@dataclass
class PostfixServer:
    root: Path
    process: subprocess.Popen[bytes]
    sbin: Path
    port: int  # smtpd on HOST
    lmtp_port: int  # where mail for the hub goes (the gateway's LMTP listener)
    relay_port: int  # where everything else goes (a sink)
    message_size_limit: int
    env: dict[str, str] = field(repr=False)
    watchdog: subprocess.Popen[bytes] | None = None

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def log(self) -> Path:
        return self.root / "maillog"

    def tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)

    def command(self, name: str, *args: str, check: bool = True) -> str:
        """Run a Postfix command on this instance (``-c etc``); its stdout."""
        proc = subprocess.run(
            [str(self.sbin / name), "-c", str(self.config_dir), *args],
            capture_output=True,
            env=self.env,
            check=False,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{name} {' '.join(args)} failed ({proc.returncode}): "
                f"{proc.stderr.decode(errors='replace')}\n{self.tail()}"
            )
        return proc.stdout.decode(errors="replace")

    def queue(self) -> list[QueuedMessage]:
        """What Postfix holds (``postqueue -j``): nothing once everything is delivered."""
        out = []
        for line in self.command("postqueue", "-j").splitlines():
            if line.strip():
                entry = json.loads(line)
                out.append(
                    QueuedMessage(
                        entry["queue_id"],
                        entry["queue_name"],
                        entry.get("sender", ""),
                        entry.get("recipients", []),
                    )
                )
        return out

    def flush(self) -> None:
        """``postqueue -f``: forget dead destinations, retry every deferred message now."""
        self.command("postqueue", "-f")

    def wait_queue_empty(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            held = self.queue()
            if not held:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix still holds {held} after {timeout} s\n{self.tail()}")
            time.sleep(0.1)

    def wait_deferred(self, queue_id: str, timeout: float = 30) -> QueuedMessage:
        """Wait until ``queue_id`` is in the deferred queue (a delivery attempt failed)."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.queue():
                if entry.queue_id == queue_id and entry.queue_name == "deferred":
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{queue_id} not deferred after {timeout} s: {self.queue()}\n{self.tail()}"
                )
            time.sleep(0.1)

    def deliveries(self, queue_id: str) -> list[dict[str, str]]:
        """The delivery attempts logged for ``queue_id``: relay, status and the reply."""
        pattern = re.compile(
            rf"postfix/(?P<service>\w+)\[\d+\]: {re.escape(queue_id)}: to=<(?P<to>[^>]*)>,"
            r".*? relay=(?P<relay>\S+?),.*? status=(?P<status>\w+) \((?P<reply>.*)\)$"
        )
        return [
            m.groupdict()
            for line in tail(self.log, 100_000).splitlines()
            if (m := pattern.search(line)) is not None
        ]

    def wait_delivered(self, queue_id: str, timeout: float = 60) -> dict[str, str]:
        """Wait for ``queue_id``'s final delivery (``status=sent`` or ``bounced``); its line."""
        deadline = time.monotonic() + timeout
        while True:
            final = [d for d in self.deliveries(queue_id) if d["status"] in ("sent", "bounced")]
            if final:
                return final[-1]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{queue_id} not delivered after {timeout} s: {self.deliveries(queue_id)}\n"
                    f"{self.tail()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the master and every Postfix process it started (its process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """``postfix stop``, then whatever is left is killed, and everything removed."""
        try:
            if self.process.poll() is None:
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.command("postfix", "stop")
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.terminate()  # the master passes SIGTERM on to its children
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=5)
            # Daemons finishing their work (postfix stop lets them) share the master's group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            if self.process.poll() is None:
                self.process.wait()
        finally:
            if self.watchdog is not None and self.watchdog.poll() is None:
                self.watchdog.kill()  # its work is done (and the master's pid may be reused)
                self.watchdog.wait()
            shutil.rmtree(self.root, ignore_errors=True)


def settings(
    root: Path,
    *,
    lmtp_port: int,
    relay_port: int,
    message_size_limit: int,
    hub_domain: str,
) -> dict[str, str]:
    """The ``main.cf`` of the test instance (see deploy/postfix/main.cf.snippet)."""
    etc = root / "etc"
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "inet_interfaces": HOST,
        "inet_protocols": "ipv4",
        "myhostname": "mx.test",
        "mydomain": "test",
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "mynetworks": "127.0.0.0/8",
        # The hand-off, as in deploy/postfix/main.cf.snippet.
        "relay_domains": hub_domain,
        "relay_recipient_maps": f"texthash:{etc / 'relay_recipients'}",
        "transport_maps": f"texthash:{etc / 'transport'}",
        "message_size_limit": str(message_size_limit),
        "lmtp_destination_concurrency_limit": "10",
        "lmtp_destination_recipient_limit": "50",
        "disable_mime_output_conversion": "yes",
        "smtputf8_enable": "no",
        # Everything else to the sink: nothing leaves the machine, no DNS.
        "relayhost": f"[{HOST}]:{relay_port}",
        "smtp_host_lookup": "native",
        "lmtp_host_lookup": "native",
        "disable_dns_lookups": "yes",
        "smtpd_peername_lookup": "no",
        # Seen in the test's time frame, not after the default minutes.
        "lmtp_connection_cache_time_limit": "1s",
        "smtp_connection_cache_time_limit": "1s",
    }


def start(
    *,
    lmtp_port: int,
    relay_port: int,
    more_lmtp_ports: Sequence[int] = (),
    port: int | None = None,
    message_size_limit: int = MESSAGE_SIZE_LIMIT,
    hub_domain: str = HUB_DOMAIN,
    hub_addresses: Sequence[str] = HUB_ADDRESSES,
    extra: dict[str, str] | None = None,
) -> PostfixServer:
    """Configure and start a private Postfix; raises :class:`PostfixUnavailable` without one.

    ``lmtp_port``: the gateway's LMTP listener on HOST (it need not run yet: mail waits in
    Postfix's queue). ``more_lmtp_ports``: more gateway instances, tried in that order when the
    first does not answer (a list of next hops, as in deploy/postfix/transport). ``relay_port``: the sink for everything else. ``extra``: more main.cf
    settings.
    """
    sbin = find_sbin()
    if sbin is None:
        raise PostfixUnavailable("the postfix binaries were not found (Debian: postfix)")
    if os.geteuid() != 0:
        raise PostfixUnavailable("the Postfix master must be started as root")
    try:
        owner = pwd.getpwnam("postfix")
    except KeyError:
        raise PostfixUnavailable("there is no 'postfix' user (the package makes it)") from None
    port = port or free_port()
    root = Path(tempfile.mkdtemp(prefix="postfix-t-"))
    env = {
        "PATH": f"{sbin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "LC_ALL": "C",
        "HOME": str(root),
    }
    try:
        root.chmod(0o755)  # Postfix's daemons (the postfix user) reach their directories in it
        etc, data = root / "etc", root / "data"
        etc.mkdir()
        (root / "queue").mkdir()
        data.mkdir(mode=0o700)
        os.chown(data, owner.pw_uid, owner.pw_gid)
        (etc / "master.cf").write_text(MASTER_CF.format(host=HOST, port=port))
        (etc / "main.cf").write_text("# tests/postfix.py: a throw-away instance.\n")
        (etc / "transport").write_text(
            "".join(f"{a} {transport(lmtp_port, *more_lmtp_ports)}\n" for a in hub_addresses)
        )
        (etc / "relay_recipients").write_text("".join(f"{a} OK\n" for a in hub_addresses))
        conf = settings(
            root,
            lmtp_port=lmtp_port,
            relay_port=relay_port,
            message_size_limit=message_size_limit,
            hub_domain=hub_domain,
        ) | (extra or {})
        _run(env, sbin / "postconf", "-c", str(etc), "-e", *(f"{k} = {v}" for k, v in conf.items()))
        # Creates the queue directories with Postfix's owners and modes (post-install
        # create-missing), and checks the rest.
        _run(env, sbin / "postfix", "-c", str(etc), "check")
        daemon_directory = _run(env, sbin / "postconf", "-c", str(etc), "-hx", "daemon_directory")
        with open(root / "master.out", "wb") as out:
            process = subprocess.Popen(
                [str(Path(daemon_directory.strip()) / "master"), "-c", str(etc), "-s"],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group (for the watchdog, and a Ctrl-C is for pytest only).
                start_new_session=True,
            )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    server = PostfixServer(
        root, process, sbin, port, lmtp_port, relay_port, message_size_limit, env
    )
    try:
        server.watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(process.pid), str(root), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def transport(*lmtp_ports: int) -> str:
    """The ``transport`` entry for the hub: LMTP to the gateway instance(s) on HOST, tried in
    order (Postfix >= 3.5 takes a list of next hops)."""
    return "lmtp:" + ", ".join(f"[{HOST}]:{p}" for p in lmtp_ports)


def required() -> bool:
    """Under CI (or with TESTS_REQUIRE_POSTFIX set) a missing Postfix fails the tests."""
    return servers.required("TESTS_REQUIRE_POSTFIX")


def start_or_skip(**kwargs: Any) -> PostfixServer:
    """:func:`start`, or skip the test when there is no usable Postfix (fail where required)."""
    return servers.start_or_skip(
        lambda: start(**kwargs), PostfixUnavailable, "Postfix", "TESTS_REQUIRE_POSTFIX"
    )


def _run(env: dict[str, str], *argv: str | Path) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, env=env, check=False, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n"
            f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode(errors="replace")


def _wait_ready(server: PostfixServer) -> None:
    servers.wait_ready(
        "the Postfix master",
        server.process,
        lambda: servers.greets(server.port, b"220", b"QUIT\r\n"),
        lambda: f"{tail(server.root / 'master.out')}\n{server.tail()}",
        timeout=START_TIMEOUT,
    )


# --- sending --------------------------------------------------------------------------------

_QUEUED = re.compile(rb"queued as ([0-9A-Za-z]+)")


@dataclass(frozen=True)
class Submitted:
    """The MX's answer to one message: the reply to DATA (or the first refusal)."""

    code: int
    text: bytes

    @property
    def queue_id(self) -> str | None:
        """Postfix's queue ID when accepted (``250 2.0.0 Ok: queued as 4Xyz…``)."""
        match = _QUEUED.search(self.text) if self.code == 250 else None
        return match.group(1).decode() if match else None


def submit(
    port: int,
    raw: bytes,
    *,
    mail_from: str,
    to: str | Iterable[str],
    size: int | None = None,
    client: smtplib.SMTP | None = None,
) -> Submitted:
    """One message to the MX with smtplib (``size``: declare SIZE= in MAIL FROM)."""
    recipients = [to] if isinstance(to, str) else list(to)
    own = client is None
    smtp = client or smtplib.SMTP(HOST, port, timeout=60)
    try:
        if own:
            smtp.ehlo("agency.example")
        options = [f"SIZE={size}"] if size is not None else []
        code, text = smtp.mail(mail_from, options)
        if code != 250:
            smtp.rset()
            return Submitted(code, text)
        for rcpt in recipients:
            code, text = smtp.rcpt(rcpt)
            if code != 250:
                smtp.rset()
                return Submitted(code, text)
        code, text = smtp.data(raw)
        return Submitted(code, text)
    finally:
        if own:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()


def burst(
    port: int,
    messages: Sequence[bytes],
    *,
    mail_from: str,
    to: str = HUB_ADDRESSES[0],
    connections: int = 8,
    per_connection: int = 10,
) -> list[Submitted]:
    """Push ``messages`` through the MX concurrently: ``connections`` SMTP clients at once,
    each sending up to ``per_connection`` messages on one connection before opening another.

    Returns the reply to each message, in order; every one should be ``250`` with a queue ID
    (then :meth:`PostfixServer.wait_delivered` / :meth:`PostfixServer.wait_queue_empty`).
    """
    batches = [
        list(range(i, min(i + per_connection, len(messages))))
        for i in range(0, len(messages), per_connection)
    ]
    results: list[Submitted | None] = [None] * len(messages)

    def send(batch: list[int]) -> None:
        with smtplib.SMTP(HOST, port, timeout=120) as client:
            client.ehlo("agency.example")
            for i in batch:
                results[i] = submit(port, messages[i], mail_from=mail_from, to=to, client=client)

    with ThreadPoolExecutor(max_workers=max(1, connections)) as pool:
        for future in [pool.submit(send, b) for b in batches]:
            future.result()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]
