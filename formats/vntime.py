"""Vietnam local time: UTC+7 all year (no daylight saving time).

Agency validity dates, reporting periods and dates typed by admins are local calendar days;
this is the one definition of that zone.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

#: Asia/Ho_Chi_Minh.
VN_TZ = timezone(timedelta(hours=7), "ICT")


def local_day(at: datetime) -> date:
    """The calendar day in Vietnam at the instant ``at`` (which must be aware)."""
    return at.astimezone(VN_TZ).date()
