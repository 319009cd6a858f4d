"""Compliance status figures: 1,000 agencies × 20 categories × 12 monthly periods (240,000 cells).

Each figure is printed next to its target (the compliance issue: status under 1 s) and a
baseline measured in the same run:

- ``matrix`` for all 12 periods (index built once, then one report per month). Baseline: the
  same cells through ``status_for`` one by one (its own due date and sorting per cell, the
  candidates still looked up by key: a scan of every submission per cell would take hours).
- the ledger load from a SQLite archive holding the year's message entries (fields shaped like
  ``gateway.filing.message_item``'s, ~1.4 KB of JSON, no blobs): one period, as
  ``gateway compliance status`` reads it (also with its matrix), and all 12. Filling the
  archive is timed but is not a figure. Also shown: the matrix with Python's cycle collector
  left running (``gateway.compliance`` pauses it while it builds cells).

The submissions are a fixed mix per cell: on time 62 %, late 13 %, corrected 8 %, rejected only
5 %, rejected then accepted 4 %, missing 8 %. There are 13 real obligation categories; the
other 7 are codes of this benchmark, allowed by a subclass of Obligation that skips the
category check (the matrix does not look at what a code means). Nothing asserts a time. ``--quick``: 100 agencies.

Run:  .venv/bin/python bench/compliance_bench.py [--quick] [--no-archive]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archive.db import Database
from archive.log import Item, Log, canonical
from formats.vntime import VN_TZ
from gateway import compliance, ledger
from gateway.compliance import Submission, Submissions, matrix, month_bounds, status_for
from gateway.obligations import CATEGORY_CODES, DueRule, Obligation, due_date, periods
from gateway.remind import load_templates
from gateway.reminders import plan
from gateway.workdays import Calendar
from keys.directory import Agency, Directory

LABELS = tuple(f"2026-{m:02d}" for m in range(1, 13))
CATEGORIES = (*CATEGORY_CODES, *(f"bench-{n}" for n in range(1, 8)))
NOW = datetime(2027, 1, 20, 9, 0, tzinfo=VN_TZ)
TARGET = 1.0  # seconds for 240,000 cells


class BenchObligation(Obligation):
    """An obligation whose category may be a benchmark code (no other check is skipped)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipients", tuple(self.recipients))


def make(agencies: int, seed: int = 1) -> tuple[list[Obligation], list[Submission]]:
    cal = Calendar.load()
    rng = random.Random(seed)
    obligations: list[Obligation] = [
        BenchObligation(
            f"bench-{a:04d}-{c}",
            f"H26.B{a:04d}",
            ("H26.CATP",),
            c,
            "monthly",
            DueRule.working_days_after(5),
            "QĐ 18/2017/QĐ-UBND Điều 8 (benchmark)",
        )
        for a in range(agencies)
        for c in CATEGORIES
    ]
    one = obligations[0]
    start, end = datetime(2025, 12, 20).date(), datetime(2026, 12, 31).date()
    dues = [(p, due_date(one, p, cal)) for p in periods(one, start, end)]
    subs: list[Submission] = []

    def add(ob: Obligation, label: str, day: Any, status: str, business: str = "new") -> None:
        seq = len(subs)
        at = datetime.combine(day, datetime.min.time(), VN_TZ) + timedelta(hours=9)
        doc = f"{ob.provider},{day:%Y/%m/%d},{seq}/BC"
        replaces = subs[-1].document_id if business != "new" else None
        subs.append(
            Submission(
                seq, ob.provider, ob.category, label, status, at, doc, business, replaces, "monthly"
            )
        )

    for ob in obligations:
        for period, due in dues:
            label, r = period.label, rng.random()
            on_time = period.last + timedelta(days=rng.randint(1, (due - period.last).days))
            if r < 0.62:
                add(ob, label, on_time, "accepted")
            elif r < 0.75:
                add(ob, label, due + timedelta(days=rng.randint(1, 10)), "accepted")
            elif r < 0.83:
                add(ob, label, on_time, "accepted")
                add(ob, label, due + timedelta(days=rng.randint(0, 20)), "accepted", "replace")
            elif r < 0.88:
                for _ in range(rng.randint(1, 2)):
                    add(ob, label, on_time, "rejected")
            elif r < 0.92:
                add(ob, label, on_time, "rejected")
                add(ob, label, on_time + timedelta(days=1), "accepted")
    return obligations, subs


def secs(seconds: float) -> str:
    return f"{seconds:,.2f} s" if seconds >= 1 else f"{seconds * 1e3:,.0f} ms"


def line(name: str, value: str, target: str, baseline: str, ok: bool | None) -> None:
    verdict = "" if ok is None else "met" if ok else "MISSED"
    print(f"  {name:<44} {value:>10}   {target:<10} {verdict:<6} baseline {baseline}", flush=True)


def timed(
    obligations: list[Obligation], subs: list[Submission], cal: Calendar
) -> tuple[float, float, list[float], Counter[str]]:
    """Best of 3: (index seconds, 12 × matrix seconds, per-period seconds, status counts)."""
    best: tuple[float, float, list[float], Counter[str]] | None = None
    for _ in range(3):
        began = time.perf_counter()
        index = Submissions.of(subs)
        built = time.perf_counter()
        per_period, counts = [], Counter[str]()
        reports = []
        for label in LABELS:
            t0 = time.perf_counter()
            reports.append(matrix(obligations, index, cal, label, NOW))
            per_period.append(time.perf_counter() - t0)
        done = time.perf_counter()
        for report in reports:
            counts.update(report.counts())
        del reports, index
        if best is None or done - began < best[0] + best[1]:
            best = (built - began, done - built, per_period, counts)
    assert best is not None
    return best


def run_matrix(obligations: list[Obligation], subs: list[Submission], cal: Calendar) -> None:
    cells = len(obligations) * len(LABELS)
    target = TARGET * cells / 240_000
    for label in LABELS:  # the calendar works out each year once, on first use
        matrix(obligations[:1], [], cal, label, NOW)
    index_s, matrix_s, per_period, counts = timed(obligations, subs, cal)
    assert sum(counts.values()) == cells
    with mock.patch.object(compliance, "_collector_paused", contextlib.nullcontext):
        gc_index, gc_matrix, _, _ = timed(obligations, subs, cal)
    # Baseline: the same cells one by one through status_for (a fifth of them, scaled).
    index = Submissions.of(subs)
    sample = obligations[::5]
    began = time.perf_counter()
    for label in LABELS:
        for ob in sample:
            [p] = periods(ob, *month_bounds(label))
            status_for(ob, p, index.get(label, ob.provider, ob.category), cal, NOW)
    baseline = (time.perf_counter() - began) * len(obligations) / len(sample)
    total = index_s + matrix_s
    print(
        f"\n  {len(obligations):,} obligations × {len(LABELS)} periods = {cells:,} cells; "
        f"{len(subs):,} submissions; best of 3 runs"
    )
    print("  " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    line(
        f"status, {cells:,} cells (index + 12 × matrix)",
        secs(total),
        f"< {secs(target)}",
        f"status_for per cell {secs(baseline)}",
        total < target,
    )
    line("  of which: index the submissions", secs(index_s), "", "", None)
    line("  of which: matrix, median per period", secs(statistics.median(per_period)), "", "", None)
    line("  the same, cycle collector not paused", secs(gc_index + gc_matrix), "", "", None)


def fields(sub: Submission) -> dict[str, Any]:
    """A message entry's fields as gateway.filing.message_item writes them (no blobs)."""
    at = sub.received_at.astimezone(UTC).isoformat()
    return {
        "status": sub.status,
        "digest": f"{sub.seq:064x}",
        "size": 14_213,
        "from": f"vanthu@{sub.provider.lower()}.hanoi.gov.vn",
        "message_id": f"<{sub.seq}@{sub.provider.lower()}.hanoi.gov.vn>",
        "subject": "Báo cáo định kỳ tháng",
        "transport": {
            "protocol": "smtp",
            "received_at": at,
            "peer": "10.26.1.1",
            "helo": "mail.hanoi.gov.vn",
            "mail_from": "vanthu@hanoi.gov.vn",
            "rcpt_to": ["hub@exchange.hanoi.gov.vn"],
            "tls": "TLSv1.3",
        },
        "steps": dict.fromkeys(
            ("envelope", "decrypt-verify", "signer", "sender", "payload", "attachments", "agency"),
            "ok",
        ),
        "reasons": [] if sub.status == "accepted" else [{"code": "payload", "text": "x" * 120}],
        "crypto": {
            "cipher": "aes-256-gcm",
            "key_transport": "rsaes-oaep",
            "signature": "rsa",
            "digest": "sha256",
            "style": "opaque",
        },
        "payload_sha256": f"{sub.seq * 7:064x}",
        "signer": {
            "subject": f"CN=Van thu,O={sub.provider},C=VN",
            "issuer": "CN=Hanoi CA,C=VN",
            "serial": f"{sub.seq:032x}",
            "sha256": f"{sub.seq * 3:064x}",
            "emails": ["vanthu@hanoi.gov.vn"],
            "organ_id": sub.provider,
            "revocation_checked": True,
        },
        "agency": sub.provider,
        "category": sub.category,
        "period": sub.period,
        "document_id": sub.document_id,
        "payload": {
            "message_id": f"{sub.seq:032x}",
            "from": sub.provider,
            "to": ["H26.CATP"],
            "business": sub.business,
            "records": 12,
            "period_start": None,
            "period_end": None,
            "cadence": sub.cadence,
            "replaces": sub.replaces,
            "response_for": None,
            "due_date": None,
            "request_ref": None,
        },
    }


def run_ledger(
    obligations: list[Obligation], subs: list[Submission], cal: Calendar, tmp: str
) -> None:
    db = Database.open(f"sqlite:///{tmp}/archive.db")
    try:
        log = Log()
        began = time.perf_counter()
        for first in range(0, len(subs), 5_000):
            batch = [Item("message", s.received_at, fields(s)) for s in subs[first : first + 5_000]]
            with db.session() as s:
                log.append_many(s, batch)
        filled = len(subs) / (time.perf_counter() - began)
        one, status = [], []
        for _ in range(3):
            with db.session(read_only=True) as s:
                t0 = time.perf_counter()
                loaded = ledger.submissions(s, ["2026-10"])
                t1 = time.perf_counter()
            matrix(obligations, loaded, cal, "2026-10", NOW)
            one.append(t1 - t0)
            status.append(time.perf_counter() - t0)
        with db.session(read_only=True) as s:
            t0 = time.perf_counter()
            year = ledger.submissions(s, list(LABELS))
            t1 = time.perf_counter()
        assert len(year) == len(subs)
        print(
            f"\n  SQLite archive in {tmp}: {len(subs):,} message entries of "
            f"{len(canonical(fields(subs[0]))):,} bytes "
            f"(filled at {filled:,.0f} entries/s, 5,000 per transaction; not a figure)"
        )
        line(f"ledger load, 1 period ({len(loaded):,} entries)", secs(min(one)), "", "", None)
        line("compliance status, 1 period: load + matrix", secs(min(status)), "", "", None)
        line(f"ledger load, 12 periods ({len(year):,} entries)", secs(t1 - t0), "", "", None)
    finally:
        db.dispose()


def run_reminders(obligations: list[Obligation], subs: list[Submission], cal: Calendar) -> None:
    """Reminder planning over the same 12 periods: every cell, every agency with a mailbox."""
    agencies = [*sorted({ob.provider for ob in obligations}), "H26.CATP"]
    directory = Directory.of(
        Agency(
            a,
            f"Cơ quan {a}",
            f"Agency {a}",
            frozenset({f"vanthu@{a.lower()}.example"}),
            supervisor=None if a == "H26.UBND" else "H26.UBND",
        )
        for a in ["H26.UBND", *agencies]
    )
    templates = load_templates()
    index = Submissions.of(subs)
    began = time.perf_counter()
    cells = [c for label in LABELS for c in matrix(obligations, index, cal, label, NOW).cells]
    status_s = time.perf_counter() - began
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        planned = plan(
            cells, directory=directory, calendar=cal, templates=templates, now=NOW, hub="hub@x"
        )
        best = min(best, time.perf_counter() - began)
    kinds = Counter(r.kind for r in planned)
    target = TARGET * len(cells) / 240_000
    line(
        f"reminder planning, {len(cells):,} cells",
        secs(best),
        f"< {secs(target)}",
        f"the status it reads {secs(status_s)}; "
        + ", ".join(f"{n:,} {k}" for k, n in sorted(kinds.items())),
        best < target,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100 agencies instead of 1,000")
    parser.add_argument("--no-archive", action="store_true", help="skip the ledger figures")
    args = parser.parse_args()
    agencies = 100 if args.quick else 1_000
    cal = Calendar.load()
    began = time.perf_counter()
    obligations, subs = make(agencies)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"  made the data in {secs(time.perf_counter() - began)}; calendar {cal.version}; "
        f"load average {load} on {os.cpu_count()} cores (others' work shares them)"
    )
    print(f"  {'figure':<44} {'value':>10}   {'target':<10} {'verdict':<6} baseline")
    run_matrix(obligations, subs, cal)
    run_reminders(obligations, subs, cal)
    if not args.no_archive:
        with tempfile.TemporaryDirectory(prefix="compliance-bench-") as tmp:
            run_ledger(obligations, subs, cal, tmp)


if __name__ == "__main__":
    main()
