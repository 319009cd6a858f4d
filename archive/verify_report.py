"""The report `archive verify` fills, and how its checks read stored values: as the database
holds them, with no conversion that an edit could make fail (:mod:`archive.verify`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, TypeDecorator, type_coerce
from sqlalchemy.orm import Session

from archive import merkle

#: Rows read from the database at a time.
BATCH = 5000
#: Problems of one kind reported (a report keeps ten times as many in all).
MAX_PER_KIND = 50


@dataclass
class Report:
    entries: int = 0
    checkpoints: int = 0
    #: Entries the newest checkpoint that verifies covers (the rest are proven by none yet).
    covered: int = 0
    kept: int = 0
    blobs: int = 0
    root: bytes = merkle.EMPTY_ROOT
    problems: list[str] = field(default_factory=list)
    #: Entry ranges already reported as missing (not reported again as changed nodes).
    holes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "covered": self.covered,
            "kept": self.kept,
            "blobs": self.blobs,
            "root": self.root.hex(),
            "problems": self.problems,
        }

    def add(self, text: str) -> None:
        """A problem found (the first ``10 × MAX_PER_KIND`` of them are kept)."""
        if len(self.problems) < 10 * MAX_PER_KIND:
            self.problems.append(text)


def rows(s: Session, query: Any) -> Iterator[tuple[Any, ...]]:
    for row in s.execute(query, execution_options={"yield_per": BATCH}):
        yield tuple(row)


class _Stored(TypeDecorator[Any]):
    """A column read as the database holds it (no conversion that an edit could make fail)."""

    impl = String
    cache_ok = True


def as_stored(column: Any) -> Any:
    return type_coerce(column, _Stored())


def instant(value: object) -> datetime | None:
    """A stored time, however the driver gives it (a datetime, or SQLite's text), in UTC; None
    if it is no time."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_value(value: object) -> object:
    """A stored JSON value (text, or what the driver decoded); text that is no JSON as is."""
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def binary(value: object, report: Report, what: str) -> bytes:
    """A stored binary value; an edit may have left text or NULL there instead."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    report.add(f"{what} is not binary any more ({type(value).__name__}): it was rewritten")
    return str(value).encode() if value is not None else b""
