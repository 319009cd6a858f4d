"""A throw-away PostgreSQL cluster for the test session.

:func:`start` runs ``initdb`` into a fresh temporary directory and starts ``postgres`` on it,
listening only on a unix socket inside that directory (no TCP port, so nothing else on the
machine can reach it or collide with it). Durability settings are the production ones
(``fsync=on``, ``synchronous_commit=on``); only ``initdb``'s own final flush is skipped, since
the cluster is thrown away. The server's time zone is Asia/Ho_Chi_Minh on purpose, so that a
time that comes back in UTC proves the conversion rather than the server's default.

PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
``postgres`` system user (or ``$PG_TEST_USER``), which owns the directory. The postmaster is
asked to die with the test process (``PR_SET_PDEATHSIG``), so even a killed test run leaves no
server behind; :meth:`PgCluster.stop` removes everything.

Binaries are found through ``$PG_BINDIR`` (only there, if set), ``initdb`` on ``PATH``, ``pg_config --bindir``, or
the newest ``/usr/lib/postgresql/*/bin`` (the Debian layout).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests import servers
from tests.servers import die_with_parent, tail

SUPERUSER = "postgres"
PORT = 5432  # only names the socket file; the socket directory is private to this cluster
START_TIMEOUT = 30.0

SERVER_SETTINGS = {
    "listen_addresses": "",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "timezone": "Asia/Ho_Chi_Minh",
    "max_connections": "100",
    "shared_buffers": "16MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class PgUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``postgres`` and friends, or ``None``."""
    if os.environ.get("PG_BINDIR"):  # an explicit choice: no looking elsewhere
        chosen = Path(os.environ["PG_BINDIR"])
        return chosen if (chosen / "initdb").is_file() else None
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    candidates.extend(debian)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


@dataclass
class PgCluster:
    root: Path
    process: subprocess.Popen[bytes]
    port: int = PORT
    _admin: psycopg.Connection[Any] | None = None
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, dbname: str) -> str:
        """A SQLAlchemy URL for ``dbname`` over the unix socket."""
        return f"postgresql+psycopg://{SUPERUSER}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
            connect_timeout=5,
        )

    def create_database(self, hint: str = "") -> str:
        """Create an empty database and return its name (``hint`` makes it recognisable)."""
        slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")
        name = f"t{next(self._names):04d}_{slug}"[:63].rstrip("_")
        self._admin_connection().execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, cutting off any session still connected to it."""
        self._admin_connection().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin_connection(self) -> psycopg.Connection[Any]:
        if self._admin is None or self._admin.closed:
            self._admin = self.connect()
        return self._admin

    def stop(self) -> None:
        """Stop the server (immediate shutdown: the data is thrown away) and remove it all."""
        try:
            if self._admin is not None:
                with contextlib.suppress(psycopg.Error):
                    self._admin.close()
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGQUIT)  # immediate shutdown
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as when we are root; ``None`` to run as ourselves."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("PG_TEST_USER", "postgres")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PgUnavailable(
            f"running as root, and there is no {name!r} user to run PostgreSQL as "
            "(set PG_TEST_USER to an unprivileged user)"
        ) from None


def start(bindir: Path | None = None) -> PgCluster:
    """initdb + start a private server; raises :class:`PgUnavailable` without binaries."""
    bindir = bindir or find_bindir()
    if bindir is None:
        raise PgUnavailable("PostgreSQL server binaries (initdb, postgres) not found")
    user = _server_user()
    # Short path: the socket path must fit in sun_path (107 bytes).
    root = Path(tempfile.mkdtemp(prefix="pgt-", dir="/tmp" if Path("/tmp").is_dir() else None))
    try:
        run_as: dict[str, Any] = {}
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
            run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "LANG": "C",
            "HOME": str(root),
        }
        data = root / "data"
        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",  # initdb's final flush only; the running server uses fsync=on
                "--no-instructions",
            ],
            cwd=root,
            env=env,
            capture_output=True,
            check=False,
            **run_as,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout.decode()}{initdb.stderr.decode()}")
        # In postgresql.conf rather than on the command line, so that a test can still change
        # a server-wide setting with ALTER SYSTEM (the command line would win over it).
        settings = {**SERVER_SETTINGS, "unix_socket_directories": str(root), "port": str(PORT)}
        with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# tests/pg.py\n")
            conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())
        argv = [str(bindir / "postgres"), "-D", str(data)]
        log = root / "server.log"
        with open(log, "wb") as out:
            if user is not None:
                os.chown(log, user.pw_uid, user.pw_gid)
            process = subprocess.Popen(
                argv,
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C at the terminal is for pytest, not the server
                preexec_fn=die_with_parent(signal.SIGQUIT),
                **run_as,
            )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    cluster = PgCluster(root=root, process=process)
    try:
        _wait_ready(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_ready(cluster: PgCluster) -> None:
    def accepts() -> bool:
        cluster.connect().close()
        return True

    servers.wait_ready(
        "postgres",
        cluster.process,
        accepts,
        lambda: tail(cluster.log),
        timeout=START_TIMEOUT,
        errors=(psycopg.OperationalError,),
    )
