"""A real ``gateway serve`` process and a real relay for end-to-end tests and benchmarks.

:class:`Relay` is an aiosmtpd server on loopback that keeps every message the gateway sends
(receipts, deliveries, alerts). :func:`start` runs ``python -m gateway serve`` on a home made by
:meth:`gateway.demo.DemoWorld.install`, waits for its ready file and returns its ports.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import func, select

from archive import tables as t
from archive.db import Database
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Relay:
    """Receives what the gateway sends; ``reply`` decides the answer to DATA."""

    received: list[tuple[str, tuple[str, ...], bytes]] = field(default_factory=list)
    reply: str = "250 2.0.0 Ok"
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        if self.reply.startswith("250"):
            with self.lock:
                self.received.append(
                    (str(envelope.mail_from), tuple(envelope.rcpt_tos), envelope.original_content)
                )
        return self.reply

    def to(self, address: str) -> list[bytes]:
        with self.lock:
            return [m for _f, rcpt, m in self.received if address in rcpt]

    def start(self) -> tuple[Controller, int]:
        port = free_port()  # aiosmtpd's Controller cannot take port 0
        controller = Controller(self, hostname="127.0.0.1", port=port, decode_data=False)
        controller.start()
        return controller, port


@dataclass
class Served:
    home: Path
    process: subprocess.Popen[bytes]
    info: dict[str, Any]
    log: Path

    @property
    def smtp_port(self) -> int:
        return int(self.info["listeners"]["smtp"])

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """kill -9 the supervisor and its workers (the whole process group)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


def start(
    home: Path, *args: str, timeout: float = 90, name: str = "ready", before: Path | None = None
) -> Served:
    """``gateway serve`` in a process of its own, started once its ready file is written.
    ``before``: a directory put first on its PYTHONPATH (a ``sitecustomize.py`` there runs
    before the gateway: a fault a test injects)."""
    ready = home / f"{name}.json"
    ready.unlink(missing_ok=True)
    log = home / f"serve-{time.monotonic_ns()}.log"
    path = [str(before)] if before is not None else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, str(ROOT)]))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--home", str(home), "serve", "--log-format",
             "text", "--ready-file", str(ready), *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=home, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            raise RuntimeError(f"gateway serve did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return Served(home, process, json.loads(ready.read_text()), log)


def submit(port: int, raw: bytes, *, mail_from: str, to: str) -> tuple[int, bytes]:
    """Send one message with smtplib; the reply to DATA (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("agency.example")
        code, text = client.mail(mail_from)
        if code != 250:
            return code, text
        code, text = client.rcpt(to)
        if code != 250:
            return code, text
        return client.data(raw)


class Resender(threading.Thread):
    """A client as a mail server is one: sends its messages one by one, to ``ports`` in turn,
    and sends again whatever got no 250 (a refusal, a dropped connection, no server)."""

    def __init__(self, messages: list[bytes], ports: list[int], *, mail_from: str, to: str) -> None:
        super().__init__(daemon=True)
        self.messages, self.ports, self.mail_from, self.to = messages, ports, mail_from, to
        self.acknowledged: list[bytes] = []
        self.by_port: dict[int, int] = {}
        self.attempts = 0

    def run(self) -> None:
        for raw in self.messages:
            while True:
                ports = list(self.ports)  # the test may take a killed instance's port away
                port = ports[self.attempts % len(ports)]
                self.attempts += 1
                try:
                    code, _ = submit(port, raw, mail_from=self.mail_from, to=self.to)
                except (OSError, smtplib.SMTPException):
                    code = 0
                if code == 250:
                    self.acknowledged.append(raw)
                    self.by_port[port] = self.by_port.get(port, 0) + 1
                    break
                time.sleep(0.02)


def counts(db: Database) -> dict[str, int]:
    """Intake rows and outbox rows by state, e.g. ``{"intake:done": 3, "outbox:sent": 5}``."""
    with db.session(read_only=True) as s:
        out = {f"intake:{st}": n for st, n in s.execute(
            select(t.Intake.state, func.count()).group_by(t.Intake.state))}  # fmt: skip
        out |= {f"outbox:{st}": n for st, n in s.execute(
            select(t.Outbox.state, func.count()).group_by(t.Outbox.state))}  # fmt: skip
    return out


def wait_until_settled(db: Database, timeout: float = 120) -> dict[str, int]:
    """Wait until every intake row is done and every outbox row is sent or failed."""
    deadline = time.monotonic() + timeout
    while True:
        c = counts(db)
        pending = {
            k: n for k, n in c.items() if k not in ("intake:done", "outbox:sent", "outbox:failed")
        }
        if not pending:
            return c
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout} s: {c}")
        time.sleep(0.1)


def archived_digests(db: Database) -> list[str]:
    """The SHA-256 (hex) of the raw bytes of every message filed in the log, in log order."""
    with db.session(read_only=True) as s:
        return [
            json.loads(record)["digest"]
            for record in s.scalars(
                select(t.LogEntry.record)
                .where(t.LogEntry.kind == "message")
                .order_by(t.LogEntry.seq)
            )
        ]


def gateway(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m gateway --home HOME ARGS…`` as an operator runs it (e.g. ``archive verify``)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--home", str(home), *args],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
