"""Structured logs: one JSON object per line on standard error (or plain text for people).

Every record carries its time (UTC, ISO 8601), level, logger, process and message; extra fields
given with ``log.info(..., extra={"fields": {...}})`` are merged in. Journald, Loki or any log
shipper reads this as it is.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(fmt: str = "json", level: str = "info") -> None:
    """Send the gateway's logs to standard error as ``json`` lines or ``text``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiosmtpd", "imapclient", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # aiosmtpd's session log warns once per peer misstep (a command over its limit, an unknown
    # command): a peer could fill the log with it. The listener logs what matters itself,
    # throttled (gateway.smtp_protocol).
    logging.getLogger("mail.log").setLevel(logging.ERROR)
