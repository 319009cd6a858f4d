"""A local SMTP sink: keeps every message it is given, as files (for the demo and for trials).

Stands where a city's outbound relay would be, so that receipts and deliveries can be looked
at (and opened with ``openssl cms``) without sending mail anywhere::

    with Sink(directory) as sink:      # listens on 127.0.0.1, a free port: sink.port
        ...                            # [relay] host = "127.0.0.1", port = sink.port
    sink.messages                      # [(mail_from, rcpt_tos, path), ...]
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import TracebackType

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class Sink:
    def __init__(self, directory: Path, host: str = "127.0.0.1") -> None:
        self.directory = directory
        self.host = host
        self.messages: list[tuple[str, tuple[str, ...], Path]] = []
        self._lock = threading.Lock()
        with socket.socket() as probe:  # aiosmtpd's Controller cannot bind port 0 itself
            probe.bind((host, 0))
            self.port = int(probe.getsockname()[1])
        self._controller = Controller(self, hostname=host, port=self.port, decode_data=False)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        if not isinstance(data, bytes):
            return "451 4.3.0 nothing to keep"
        with self._lock:
            path = self.directory / f"{len(self.messages) + 1:04d}.eml"
            path.write_bytes(data)
            self.messages.append((str(envelope.mail_from), tuple(envelope.rcpt_tos), path))
        return "250 2.0.0 kept"

    def to(self, address: str) -> list[Path]:
        with self._lock:
            return [p for _f, rcpt, p in self.messages if address in rcpt]

    def __enter__(self) -> Sink:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._controller.start()
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self._controller.stop()
