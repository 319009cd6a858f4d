"""Vietnamese working days: the ``holidays`` package (``VN``) plus an overlay of official changes.

Pure: no clock and no I/O, except reading the shipped overlay (``gateway/presets/calendar-vn.toml``)
and an admin's extra overlay file when :meth:`Calendar.load` is given one. Described in
``docs/compliance.md``.

How a day is decided, in order:

1. Saturday and Sunday are days off, Monday to Friday working days
   (QĐ 188/1999/QĐ-TTg Điều 1: state bodies work 40 hours a week, Saturday and Sunday off).
2. The package's holidays (Bộ luật Lao động 2019 Điều 112, with its observed days) and the swaps
   it lists make weekdays days off and weekend days working days.
3. ``not-a-holiday`` entries name a holiday the package lists from their date on that the law
   does not grant (yet): those days are ordinary days, unless that holiday is in force.
4. ``off`` and ``workday`` entries own their date: in force, the day is off / a working day; not
   in force, it is an ordinary day by its weekday, whatever the package says (the package lists
   some swaps before they are decided, e.g. National Day 2026).

An entry is in force when its id is included, or its status is ``law``, or it is ``proposed``
and proposed changes are included (the default) — and its id is not excluded.

Deadlines (QĐ 1342/QĐ-UBND 2023 Điều 7.3.a: "trả lời văn bản trong vòng 15 (mười lăm) ngày làm
việc kể từ ngày nhận đầy đủ hồ sơ"; Điều 7.3.b: "07 (bảy) ngày làm việc sau khi cuộc họp kết
thúc"): counted from the day after receipt (Bộ luật Dân sự 2015 Điều 147.2) and ending at 24:00
of the last day, Asia/Ho_Chi_Minh (Điều 148.6).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

import holidays
from holidays.version import __version__ as HOLIDAYS_VERSION

from formats.errors import ConfigError, InputError
from formats.vntime import VN_TZ, local_day

Kind = Literal["off", "workday", "not-a-holiday"]
Status = Literal["law", "proposed", "not-yet-law"]
KINDS: tuple[str, ...] = get_args(Kind)
STATUSES: tuple[str, ...] = get_args(Status)
#: The years the calendar answers for (the package's lunar calendar covers them).
MIN_YEAR, MAX_YEAR = 2000, 2099
SHIPPED = "calendar-vn.toml"
PACKAGE = f"holidays {HOLIDAYS_VERSION} (VN)"
_ONE_DAY = timedelta(days=1)
_ID = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_FIELDS = ("id", "date", "kind", "name", "source", "status")


def _ordinary(d: date) -> bool:
    """Working by weekday alone (QĐ 188/1999/QĐ-TTg: Saturday and Sunday off)."""
    return d.weekday() < 5


@dataclass(frozen=True)
class Entry:
    """One official change to the package's calendar, with the document it comes from."""

    id: str
    date: date
    kind: Kind
    name: str
    source: str
    status: Status

    @classmethod
    def from_toml(cls, raw: Mapping[str, Any], where: str) -> Entry:
        keys = [f"unknown key {k!r}" for k in sorted(set(raw) - set(_FIELDS))]
        keys += [f"no {k!r}" for k in _FIELDS if k not in raw]
        if keys:
            raise ConfigError(f"{where}: {', '.join(keys)}; an entry has: {', '.join(_FIELDS)}")
        ident, day, kind, status = raw["id"], raw["date"], raw["kind"], raw["status"]
        checks = (
            (isinstance(ident, str) and _ID.match(ident), f"id {ident!r}: use a-z, 0-9 and '-'"),
            (type(day) is date, f"date {day!r} must be a TOML date, e.g. date = 2026-01-02"),
            (kind in KINDS, f"kind {kind!r} is not one of {', '.join(KINDS)}"),
            (status in STATUSES, f"status {status!r} is not one of {', '.join(STATUSES)}"),
            (
                all(isinstance(raw[k], str) and raw[k].strip() for k in ("name", "source")),
                "name and source must be non-empty strings",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{where}: {message}")
        if kind != "not-a-holiday" and _ordinary(day) != (kind == "off"):
            raise ConfigError(
                f"{where}: {day:%a %Y-%m-%d} is already a {'working day' if _ordinary(day) else 'day off'}"
                "; an off entry is a weekday, a workday entry a make-up Saturday or Sunday"
            )
        return cls(ident, day, cast(Kind, kind), raw["name"], raw["source"], cast(Status, status))


@dataclass(frozen=True)
class Overlay:
    """A named list of entries, parsed once from TOML (``name = …`` and ``[[entry]]`` tables)."""

    name: str
    entries: tuple[Entry, ...]

    @classmethod
    def parse(cls, text: str, origin: str) -> Overlay:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
        unknown = sorted(set(doc) - {"name", "entry"})
        if unknown:
            raise ConfigError(f"{origin}: unknown key(s) {unknown}; expected name and [[entry]]")
        raw = doc.get("entry", [])
        if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
            raise ConfigError(f"{origin}: entries are [[entry]] tables")
        entries = tuple(Entry.from_toml(e, f"{origin} entry {i + 1}") for i, e in enumerate(raw))
        return cls(str(doc.get("name", Path(origin).stem)), entries)

    @classmethod
    def shipped(cls) -> Overlay:
        text = resources.files("gateway.presets").joinpath(SHIPPED).read_text("utf-8")
        return cls.parse(text, SHIPPED)

    def merged(self, extra: Overlay) -> Overlay:
        """This overlay with ``extra``'s entries added; an id in ``extra`` replaces ours."""
        kept = tuple(e for e in self.entries if e.id not in {x.id for x in extra.entries})
        return Overlay(f"{self.name}+{extra.name}", kept + extra.entries)


@dataclass(frozen=True)
class Day:
    """A day that is not plain (a weekday holiday, a working weekend day, or one an entry names)."""

    date: date
    working: bool
    reason: str
    source: str
    status: str  # "package", or the entry's status
    entry: str | None = None  # the overlay entry's id
    applied: bool = True  # False: the entry is not in force, the day is ordinary

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "date": self.date.isoformat(), "weekday": f"{self.date:%a}"}


@dataclass(frozen=True)
class YearTable:
    year: int
    version: str
    label: str
    days: tuple[Day, ...]
    working_days: tuple[int, ...]  # per month, January first

    def as_dict(self) -> dict[str, Any]:
        return {
            "year": self.year,
            "version": self.version,
            "label": self.label,
            "days": [d.as_dict() for d in self.days],
            "working_days": {f"{self.year}-{m:02d}": n for m, n in enumerate(self.working_days, 1)},
            "total_working_days": sum(self.working_days),
        }


@dataclass(frozen=True)
class _PackageYear:
    holidays: Mapping[date, str]
    workdays: frozenset[date]


@cache
def _package(year: int) -> _PackageYear:
    # Neighbouring years too: a swap may move a working day across New Year (2015, 2019).
    vn = holidays.country_holidays("VN", years=range(year - 1, year + 2), language="en_US")
    names = {d: n for d, n in vn.items() if d.year == year}
    workdays = getattr(vn, "weekend_workdays", ())  # absent from old versions
    return _PackageYear(
        MappingProxyType(names),
        frozenset(d for d in workdays if d.year == year and not _ordinary(d)),
    )


@dataclass(frozen=True)
class Calendar:
    """Working days for Vietnamese state bodies. Build it with :meth:`load` or :meth:`build`."""

    entries: tuple[Entry, ...]
    in_force: frozenset[str]
    #: Short and stable: stored with every deadline computed with this calendar.
    version: str
    label: str
    _years: dict[int, Mapping[date, Day]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def load(
        cls,
        *,
        include_proposed: bool = True,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        extra_overlay: Path | None = None,
    ) -> Calendar:
        """The shipped overlay (merged with ``extra_overlay``) over the package."""
        overlay = Overlay.shipped()
        if extra_overlay is not None:
            try:
                text = extra_overlay.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read overlay {extra_overlay}: {exc}") from None
            overlay = overlay.merged(Overlay.parse(text, extra_overlay.name))
        return cls.build(
            overlay, include_proposed=include_proposed, include=include, exclude=exclude
        )

    @classmethod
    def build(
        cls,
        overlay: Overlay,
        *,
        include_proposed: bool = True,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
    ) -> Calendar:
        entries, inc, exc = overlay.entries, frozenset(include), frozenset(exclude)
        ids = sorted({e.id for e in entries})
        for what, given in (("include", inc), ("exclude", exc)):
            if given - set(ids):
                raise ConfigError(
                    f"no overlay entry {', '.join(sorted(given - set(ids)))} to {what}; "
                    f"the entries are: {', '.join(ids)}"
                )
        if inc & exc:
            raise ConfigError(f"{', '.join(sorted(inc & exc))} both included and excluded")
        owners: dict[tuple[str, date], Entry] = {}
        statuses = {e.id: e.status for e in entries}
        for e in entries:
            if statuses[e.id] != e.status:
                raise ConfigError(f"entry {e.id}: its days have different statuses; make them one")
            key = ("veto" if e.kind == "not-a-holiday" else "day", e.date)
            if key in owners:
                raise ConfigError(f"{e.date}: named by both {owners[key].id} and {e.id}; keep one")
            owners[key] = e

        def applies(e: Entry) -> bool:
            if e.id in exc or e.id in inc:
                return e.id in inc
            return e.status == "law" or (e.status == "proposed" and include_proposed)

        on = frozenset(e.id for e in entries if applies(e))
        rows = [asdict(e) | {"in_force": e.id in on} for e in entries]
        content = {"package": HOLIDAYS_VERSION, "entries": sorted(rows, key=str)}
        canonical = json.dumps(content, default=str, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        off = sorted(set(ids) - on)
        label = f"{PACKAGE} + {overlay.name}: {len(on)} of {len(ids)} changes in force" + (
            f"; not applied: {', '.join(off)}" if off else ""
        )
        return cls(tuple(entries), on, f"vn-{digest[:12]}", label)

    # --- questions -------------------------------------------------------------------------------

    def is_working_day(self, d: date) -> bool:
        day = self._resolve(d.year).get(d)
        return day.working if day else _ordinary(d)

    def add_working_days(self, start: date, n: int) -> date:
        """The ``n``-th working day after ``start`` (BLDS 2015 Điều 147.2: the first day of a
        period in days is the day after the event)."""
        if isinstance(start, datetime):
            raise TypeError("start is a day: pass local_day(received), or use deadline()")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a whole number of working days ≥ 1, not {n!r}")
        d = start
        while n:
            d += _ONE_DAY
            n -= self.is_working_day(d)
        return d

    def deadline(self, received: datetime, n: int) -> datetime:
        """The end of the ``n``-th working day after the local day of ``received``: 24:00
        Asia/Ho_Chi_Minh (BLDS 2015 Điều 148.6), i.e. 00:00 local of the next day."""
        if received.utcoffset() is None:
            raise ValueError("received must be an aware datetime (e.g. tzinfo=UTC or VN_TZ)")
        last = self.add_working_days(local_day(received), n)
        return datetime.combine(last + _ONE_DAY, time(0), tzinfo=VN_TZ)

    def days_off(self, year: int) -> tuple[Day, ...]:
        """The weekdays of ``year`` that are not working days, with why."""
        return tuple(d for d in self.year_table(year).days if _ordinary(d.date) and not d.working)

    def year_table(self, year: int) -> YearTable:
        days = tuple(v for _, v in sorted(self._resolve(year).items()))
        months = [0] * 12
        d = date(year, 1, 1)
        while d.year == year:
            months[d.month - 1] += self.is_working_day(d)
            d += _ONE_DAY
        return YearTable(year, self.version, self.label, days, tuple(months))

    # --- the rules, one year at a time -----------------------------------------------------------

    def _resolve(self, year: int) -> Mapping[date, Day]:
        cached = self._years.get(year)
        if cached is not None:
            return cached
        if not MIN_YEAR <= year <= MAX_YEAR:
            raise InputError(f"the calendar covers {MIN_YEAR}–{MAX_YEAR}, not {year}")
        pkg = _package(year)
        days = {d: Day(d, False, n, PACKAGE, "package") for d, n in pkg.holidays.items()}
        days = {d: v for d, v in days.items() if _ordinary(d)}  # weekend holidays: off anyway
        for d in pkg.workdays:
            days[d] = Day(d, True, "Make-up working day (package swap)", PACKAGE, "package")
        for e in self.entries:
            on = e.id in self.in_force
            if e.kind == "not-a-holiday" and e.date.year <= year:
                try:
                    first = e.date.replace(year=year)
                except ValueError:  # 29 February
                    continue
                listed = pkg.holidays.get(first)
                named = {d for d, n in pkg.holidays.items() if listed and n.startswith(listed)}
                for d in named | {first}:
                    reason = pkg.holidays.get(d, e.name)
                    working = _ordinary(d) and not on
                    days[d] = Day(d, working, reason, e.source, e.status, e.id, on)
            elif e.kind != "not-a-holiday" and e.date.year == year:
                working = e.kind == "workday" if on else _ordinary(e.date)
                days[e.date] = Day(e.date, working, e.name, e.source, e.status, e.id, on)
        frozen = MappingProxyType(days)
        self._years[year] = frozen
        return frozen
