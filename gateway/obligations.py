"""Obligations as data: which body owes which information to whom, how often, and by when.

QĐ 18/2017/QĐ-UBND Điều 8 says, point by point, which body provides which information to which
others; Điều 8.4.a makes the exchange monthly. An :class:`Obligation` is one such row — provider,
recipients, category, cadence, due rule, legal basis — with validity dates, because the bodies
the text names were merged in 2025 and an obligation then passes to the successor (two rows, one
ending the day before the other starts). Pure: no database, no clock, no calendar of its own; a
working-day calendar is passed in (anything with ``add_working_days``, e.g.
``gateway.workdays.Calendar``). Every problem is a one-line :class:`~formats.errors.InputError`.

Periods (first and last day inclusive, Vietnam local dates):

==========  ===================================================  =================================
cadence     period                                               label, example
==========  ===================================================  =================================
monthly     16th of the previous month → 15th (Điều 8.4.a)       ``2026-10``: 16 Sep – 15 Oct 2026
semiannual  from one cut date to the day before the next         ``2026-H1``: 15 Nov 2025 – 14 May
annual      from the cut date to the day before it, a year on    ``2026``: 16 Nov 2025 – 15 Nov 2026
==========  ===================================================  =================================

Due rules (:class:`DueRule`):

* ``working-days-after-period`` *n*: due on the *n*-th working day after the period's last day
  (counted from the next day, DESIGN §6). Monthly default *n* = :data:`DEFAULT_WORKING_DAYS`;
  Điều 8.4.a sets no deadline, ``docs/compliance.md`` says why 5.
* ``before-date`` *dates*: due before each date ("trước ngày 15/5 và 15/11"; annual "trước ngày
  16/11", Điều 13.1). The dates also cut the year into the periods, so each report covers the
  time up to its deadline and is due on the period's last day, the day before the date.

Either way, a due date that falls on a weekly rest day or a public holiday moves to the next
working day (BLDS 2015 Điều 148.5); a working-days rule always ends on one.

Labels: a monthly period by the month of its last day; a semi-annual or annual one by the year
of its last day, the halves numbered in the order they end within that year.

An obligation owes the periods whose **last day** falls inside its validity window: a body
ending on 28 Feb owes the period ending 15 Feb, its successor from 1 Mar the one ending 15 Mar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final, Protocol

from formats.categories import CATEGORIES
from formats.errors import InputError

CADENCES: Final = ("monthly", "semiannual", "annual")
WORKING_DAYS_AFTER: Final = "working-days-after-period"
BEFORE_DATE: Final = "before-date"
DUE_KINDS: Final = (WORKING_DAYS_AFTER, BEFORE_DATE)
#: Monthly default: Điều 8.4.a gives the data period but no deadline (docs/compliance.md).
DEFAULT_WORKING_DAYS: Final = 5
#: QĐ 18/2017 Điều 8.4.a: "mốc số liệu từ ngày 16 tháng trước đến ngày 15 tháng tiếp theo".
MONTHLY_LAST_DAY: Final = 15
#: "Before" dates, as (month, day), when a rule does not give its own: semi-annual reports
#: "trước ngày 15 tháng 5 và 15 tháng 11" (QĐ 1342/QĐ-UBND 2023 Quận 11, Quy chế Điều 10.1),
#: annual "trước ngày 16/11" (QĐ 18/2017 Điều 13.1).
DEFAULT_DATES: Final[Mapping[str, tuple[tuple[int, int], ...]]] = {
    "semiannual": ((5, 15), (11, 15)),
    "annual": ((11, 16),),
}
_DATES_PER_YEAR: Final = {"semiannual": 2, "annual": 1}
_DATES_WANTED: Final = {"semiannual": "two dates (e.g. 05-15 11-15)", "annual": "one date (11-16)"}
#: Categories an agency can owe periodically: Article 8's, and letters (reports) for any rule.
CATEGORY_CODES: Final = (*(c.code for c in CATEGORIES.values() if c.point), "document")
_ID = re.compile(r"[a-z0-9][a-z0-9.\-]{0,99}")
_MONTH_DAY = re.compile(r"(\d{2})-(\d{2})")


class WorkingDayCalendar(Protocol):
    """What :func:`due_date` needs from a calendar."""

    def add_working_days(self, start: date, n: int) -> date:
        """The ``n``-th working day after ``start`` (``start`` itself not counted)."""
        ...


def next_working_day(calendar: WorkingDayCalendar, day: date) -> date:
    """``day`` if it is a working day, else the first working day after it."""
    return calendar.add_working_days(day - timedelta(days=1), 1)


@dataclass(frozen=True)
class DueRule:
    """When a period's submission is due. Build with :meth:`working_days_after` or
    :meth:`before`; stored as :meth:`as_dict`."""

    kind: str
    n: int | None = None
    #: ``before-date``: the dates, as (month, day), in calendar order.
    dates: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind == WORKING_DAYS_AFTER:
            if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 60:
                raise InputError(
                    f"due rule {self.kind}: n must be a whole number 1–60, not {self.n!r}"
                )
            if self.dates:
                raise InputError(f"due rule {self.kind} takes n, not dates")
        elif self.kind == BEFORE_DATE:
            if self.n is not None or not self.dates:
                raise InputError(f"due rule {self.kind} takes dates (e.g. 05-15 11-15), not n")
            for month, day in self.dates:
                try:
                    date(2001, month, day)  # not a leap year: 02-29 would skip three years
                except ValueError:
                    raise InputError(
                        f"due date {month:02}-{day:02} is not a day of every year"
                    ) from None
            if list(self.dates) != sorted(set(self.dates)):
                raise InputError("due dates must be different and in calendar order (05-15 11-15)")
        else:
            raise InputError(f"unknown due rule {self.kind!r}; use one of {', '.join(DUE_KINDS)}")

    @classmethod
    def working_days_after(cls, n: int = DEFAULT_WORKING_DAYS) -> DueRule:
        return cls(WORKING_DAYS_AFTER, n=n)

    @classmethod
    def before(cls, *dates: str) -> DueRule:
        """``DueRule.before("05-15", "11-15")``: due before 15 May and before 15 November."""
        parsed = []
        for text in dates:
            match = _MONTH_DAY.fullmatch(text.strip())
            if not match:
                raise InputError(f"due date {text!r} is not MM-DD (e.g. 11-16 for 16 November)")
            parsed.append((int(match[1]), int(match[2])))
        return cls(BEFORE_DATE, dates=tuple(parsed))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DueRule:
        unknown = sorted(set(data) - {"kind", "n", "dates"})
        if unknown:
            raise InputError(f"due rule: unknown key {unknown[0]!r}; the keys are kind, n, dates")
        if data.get("kind") == BEFORE_DATE:
            dates = data.get("dates")
            if not isinstance(dates, list) or not all(isinstance(d, str) for d in dates):
                raise InputError('due rule before-date: dates must be a list like ["05-15"]')
            return cls.before(*dates)
        return cls(str(data.get("kind")), n=data.get("n"))

    def as_dict(self) -> dict[str, Any]:
        if self.kind == WORKING_DAYS_AFTER:
            return {"kind": self.kind, "n": self.n}
        return {"kind": self.kind, "dates": [f"{m:02}-{d:02}" for m, d in self.dates]}

    def describe(self) -> str:
        if self.kind == WORKING_DAYS_AFTER:
            return f"{self.n} working days after the period ends"
        return "before " + " and ".join(f"{d} {_MONTHS[m - 1]}" for m, d in self.dates)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def default_due(cadence: str, working_days: int = DEFAULT_WORKING_DAYS) -> DueRule:
    """The rule an obligation gets when none is given."""
    if cadence == "monthly":
        return DueRule.working_days_after(working_days)
    if cadence not in DEFAULT_DATES:
        raise InputError(f"unknown cadence {cadence!r}; use {', '.join(CADENCES)}")
    return DueRule(BEFORE_DATE, dates=DEFAULT_DATES[cadence])


@dataclass(frozen=True)
class Period:
    """One reporting period, both days inclusive."""

    label: str
    first: date
    last: date

    def contains(self, day: date) -> bool:
        return self.first <= day <= self.last

    def as_dict(self) -> dict[str, str]:
        return {"label": self.label, "first": self.first.isoformat(), "last": self.last.isoformat()}


@dataclass(frozen=True)
class Obligation:
    """One row of the matrix: ``provider`` owes ``category`` to ``recipients`` every period."""

    id: str
    provider: str
    recipients: tuple[str, ...]
    category: str
    cadence: str
    due: DueRule
    legal_basis: str
    valid_from: date | None = None
    valid_to: date | None = None
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipients", tuple(self.recipients))
        if not _ID.fullmatch(self.id):
            raise InputError(
                f"obligation id {self.id!r}: use 1–100 lower-case letters, digits, '.' and '-' "
                "(e.g. hn2017-8.2.c-snv-work-permit)"
            )
        at = f"obligation {self.id}"
        if not self.provider.strip():
            raise InputError(f"{at}: the provider is empty; give its OrganId")
        if not self.recipients:
            raise InputError(f"{at}: no recipients; give at least one OrganId")
        for organ_id in self.recipients:
            if organ_id == self.provider:
                raise InputError(f"{at}: the provider {organ_id} cannot be its own recipient")
            if self.recipients.count(organ_id) > 1:
                raise InputError(f"{at}: recipient {organ_id} is given twice; keep one")
        if self.category not in CATEGORY_CODES:
            raise InputError(
                f"{at}: unknown category {self.category!r}; obligations carry one of "
                f"{', '.join(CATEGORY_CODES)} (`gateway payload categories`)"
            )
        if self.cadence not in CADENCES:
            raise InputError(f"{at}: unknown cadence {self.cadence!r}; use {', '.join(CADENCES)}")
        if self.due.kind == BEFORE_DATE:
            if self.cadence == "monthly":
                raise InputError(
                    f"{at}: a monthly obligation is due working days after its period "
                    "(Điều 8.4.a fixes the period), not before fixed dates"
                )
            if len(self.due.dates) != _DATES_PER_YEAR[self.cadence]:
                wanted = _DATES_WANTED[self.cadence]
                raise InputError(f"{at}: a {self.cadence} obligation is due before {wanted} a year")
        if not self.legal_basis.strip():
            raise InputError(f"{at}: cite its legal basis (e.g. QĐ 18/2017/QĐ-UBND Điều 8.2.c)")
        if self.valid_from and self.valid_to and self.valid_to < self.valid_from:
            raise InputError(
                f"{at}: valid_to {self.valid_to} is before valid_from {self.valid_from}"
            )

    def active(self, day: date) -> bool:
        return active(self, day)


def active(obligation: Obligation, day: date) -> bool:
    """Whether ``obligation`` is in force on ``day``."""
    return (obligation.valid_from is None or obligation.valid_from <= day) and (
        obligation.valid_to is None or day <= obligation.valid_to
    )


#: The longest period, in days, of a payload without a Cadence that is taken as monthly (a
#: monthly period is 28–31 days), then semi-annual (uneven "before" dates make halves of up to
#: about nine months); anything longer is annual.
_MONTHLY_AT_MOST: Final = 62
_SEMIANNUAL_AT_MOST: Final = 273


def cadence_of(stated: str | None, first: date | None = None, last: date | None = None) -> str:
    """The cadence a payload reports in: the ``Cadence`` it states (the envelope schema requires
    one), or, for an entry archived without one, the cadence its period's length fits — ``first``
    to ``last`` (PeriodStart, PeriodEnd) up to 62 days monthly, up to 273 semi-annual, longer
    annual; with no period either, monthly (Điều 8.4.a: "theo định kỳ hàng tháng")."""
    if stated:
        return stated
    if first is None or last is None:
        return "monthly"
    days = (last - first).days + 1
    if days <= _MONTHLY_AT_MOST:
        return "monthly"
    return "semiannual" if days <= _SEMIANNUAL_AT_MOST else "annual"


def fulfilled_by(
    obligation: Obligation,
    provider: str,
    category: str,
    cadence: str | None,
    day: date,
    first: date | None = None,
) -> bool:
    """Whether a payload from ``provider`` of ``category`` and ``cadence`` whose period ends on
    ``day`` (and starts on ``first``, if known) is owed under ``obligation``, as
    :mod:`gateway.compliance` matches a submission: the obligation's cadence only, as
    :func:`cadence_of` reads it (a November monthly report is not the annual one; an ad-hoc
    payload answers a request, not a periodic obligation, Điều 8.4.a)."""
    return (
        obligation.provider == provider
        and obligation.category == category
        and cadence_of(cadence, first, day) == obligation.cadence
        and active(obligation, day)
    )


def period_containing(obligation: Obligation, day: date) -> Period:
    """The period of ``obligation``'s cadence that ``day`` falls in."""
    if obligation.cadence == "monthly":
        # Điều 8.4.a: the period labelled by month M runs from the 16th of M-1 to the 15th of M.
        end = day.replace(day=MONTHLY_LAST_DAY)
        if day.day > MONTHLY_LAST_DAY:
            end = _add_months(end, 1)
        return Period(
            f"{end.year:04}-{end.month:02}", _add_months(end, -1) + timedelta(days=1), end
        )
    dates = cut_dates(obligation)
    cuts = [date(y, m, d) for y in (day.year, day.year + 1) for m, d in dates]
    starts = [date(day.year - 1, m, d) for m, d in dates] + cuts
    last = next(c for c in cuts if c > day) - timedelta(days=1)
    first = max(s for s in starts if s <= day)
    return Period(_cut_label(dates, last), first, last)


def cut_dates(obligation: Obligation) -> tuple[tuple[int, int], ...]:
    """The (month, day) dates that cut a semi-annual or annual obligation's year into periods:
    its "before" dates, or the defaults for a working-days rule."""
    if obligation.due.kind == BEFORE_DATE:
        return obligation.due.dates
    return DEFAULT_DATES[obligation.cadence]


def _cut_label(dates: tuple[tuple[int, int], ...], last: date) -> str:
    """The label of the period of ``dates`` ending on ``last``: the year of its last day (a
    period due before 1 January ends on 31 December and is that year's), and for halves
    ``-H1``/``-H2`` in the order they end within that year."""
    year = f"{last.year:04}"
    if len(dates) == 1:
        return year
    # Each cut (month, day) ends a period on the day before it: in that year, or, for 1
    # January, on 31 December of that year (the cut of the next year).
    ends = sorted(
        date(last.year, 12, 31) if (m, d) == (1, 1) else date(last.year, m, d) - timedelta(days=1)
        for m, d in dates
    )
    return f"{year}-H{ends.index(last) + 1}"


def periods(obligation: Obligation, start: date, end: date) -> list[Period]:
    """The periods ``obligation`` owes whose last day is in [start, end] (and in its validity)."""
    start = max(start, obligation.valid_from or start)
    end = min(end, obligation.valid_to or end)
    out: list[Period] = []
    if end < start:
        return out
    period = period_containing(obligation, start)
    while period.last <= end:
        out.append(period)
        period = period_containing(obligation, period.last + timedelta(days=1))
    return out


def due_date(obligation: Obligation, period: Period, calendar: WorkingDayCalendar) -> date:
    """The last day on which ``period``'s submission is on time (it ends at 24:00, UTC+7)."""
    if period_containing(obligation, period.first) != period:
        raise ValueError(f"{period.label} is not a {obligation.cadence} period of {obligation.id}")
    rule = obligation.due
    if rule.kind == WORKING_DAYS_AFTER:
        assert rule.n is not None
        return calendar.add_working_days(period.last, rule.n)
    # "trước ngày 16/11": the day before the date, which is the period's last day by construction.
    # BLDS 2015 Điều 148.5: "Khi ngày cuối cùng của thời hạn là ngày nghỉ cuối tuần hoặc ngày
    # nghỉ lễ thì thời hạn kết thúc tại thời điểm kết thúc ngày làm việc tiếp theo ngày nghỉ
    # đó" — a last day on a Sunday 15 November moves to Monday the 16th.
    return next_working_day(calendar, period.last)


def complete_from(obligation: Obligation, period: Period) -> date:
    """The first day a report on ``period`` can be complete: one received earlier is *early*.

    A working-days rule is due after the period: its data run to the period's last day (Điều
    8.4.a: "mốc số liệu từ ngày 16 tháng trước đến ngày 15 tháng tiếp theo"), so a report sent
    on or before that day cannot cover the whole period. A "before" rule is due within its
    period (the report covers the time up to its deadline), so only a report sent before the
    period began is early."""
    if obligation.due.kind == WORKING_DAYS_AFTER:
        return period.last + timedelta(days=1)
    return period.first


def _add_months(day: date, months: int) -> date:
    """``day`` (a day ≤ 28) ``months`` later or earlier."""
    index = day.year * 12 + day.month - 1 + months
    return day.replace(year=index // 12, month=index % 12 + 1)


# --- the JSON / TOML shape ------------------------------------------------------------------------

KEYS: Final = (
    "id",
    "provider",
    "recipients",
    "category",
    "cadence",
    "due",
    "legal_basis",
    "valid_from",
    "valid_to",
    "note",
)


def as_dict(obligation: Obligation) -> dict[str, Any]:
    """The JSON shape of an obligation (also how the preset file spells it)."""
    return {
        "id": obligation.id,
        "provider": obligation.provider,
        "recipients": list(obligation.recipients),
        "category": obligation.category,
        "cadence": obligation.cadence,
        "due": obligation.due.as_dict(),
        "legal_basis": obligation.legal_basis,
        "valid_from": obligation.valid_from.isoformat() if obligation.valid_from else None,
        "valid_to": obligation.valid_to.isoformat() if obligation.valid_to else None,
        "note": obligation.note,
    }


def from_dict(
    values: Mapping[str, Any], *, where: str, working_days: int | None = None
) -> Obligation:
    """An obligation from :func:`as_dict`'s shape (dates as ISO text or TOML dates; ``cadence``
    defaults to monthly, ``due`` to :func:`default_due`). ``working_days`` replaces *n* of a
    working-days rule. Errors start with ``where``."""
    try:
        unknown = sorted(set(values) - set(KEYS))
        if unknown:
            raise InputError(f"unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
        cadence = _text(values, "cadence") or "monthly"
        due_value = values.get("due")
        if due_value is None:
            due = default_due(cadence, working_days or DEFAULT_WORKING_DAYS)
        elif isinstance(due_value, Mapping):
            due = DueRule.from_dict(due_value)
            if working_days and due.kind == WORKING_DAYS_AFTER:
                due = DueRule.working_days_after(working_days)
        else:
            raise InputError(
                'due must be a table, e.g. { kind = "working-days-after-period", n = 5 }'
            )
        recipients = values.get("recipients")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise InputError('recipients must be a list of OrganIds, e.g. ["H26.CATP"]')
        return Obligation(
            id=_text(values, "id"),
            provider=_text(values, "provider"),
            recipients=tuple(r.strip() for r in recipients),
            category=_text(values, "category"),
            cadence=cadence,
            due=due,
            legal_basis=_text(values, "legal_basis"),
            valid_from=_day(values.get("valid_from"), "valid_from"),
            valid_to=_day(values.get("valid_to"), "valid_to"),
            note=_text(values, "note"),
        )
    except InputError as exc:
        raise InputError(f"{where}: {exc.message}") from None


def _text(values: Mapping[str, Any], key: str) -> str:
    value = values.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f'{key} must be text (in TOML: {key} = "…")')
    return value.strip()


def _day(value: Any, key: str) -> date | None:
    if value is None or value == "":
        return None
    if type(value) is date:
        return value
    text = str(value).strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise InputError(f"{key} {value!r} is not a date; write it as YYYY-MM-DD (e.g. 2025-02-28)")
