"""Reports received on paper (QĐ 18/2017 Điều 8.4.a "bằng văn bản"), recorded by an
administrator: counted by the status and the reminders, withdrawn by an entry of its own
(gateway/paper.py, gateway/cli_paper.py)."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from archive.db import Database, sqlite_url
from formats.errors import InputError
from formats.vntime import local_day
from gateway import obligation_store, paper
from gateway.cli import cli
from gateway.compliance import matrix, status_for
from gateway.demo import DemoWorld
from gateway.obligations import Period
from tests.test_compliance import CAL, local, ob, sub

OCTOBER = Period("2026-10", date(2026, 9, 16), date(2026, 10, 15))
#: When the records are made (the CLI's clock, fixed): 5 November 2026, 10:00 in Hanoi.
RECORDING = datetime(2026, 11, 5, 3, tzinfo=UTC)


@pytest.fixture
def home(world: DemoWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr("gateway.cli_paper.now", lambda: RECORDING)
    home = tmp_path / "home"
    world.install(home, b"passphrase")
    db = Database.open(sqlite_url(home / "archive.db"))
    try:
        with db.session() as s:
            for o in (ob("H26.SNV"), ob("H26.STP"), ob("H26.STP", cadence="annual")):
                obligation_store.add(s, o, at=world.at, actor="t")
    finally:
        db.dispose()
    return home


def run(home: Path, *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    assert (result.exit_code == 0) == ok, result.output
    return result


def cell(home: Path, provider: str, *at: str) -> dict[str, Any]:
    args = ("compliance", "status", "--period", "2026-10", "--json", *at)
    report = json.loads(run(home, *args).stdout)
    [found] = [
        c for c in report["cells"] if c["provider"] == provider and c["cadence"] == "monthly"
    ]
    return dict(found)


RECORD = (
    "compliance", "record-paper", "--agency", "H26.STP", "--category", "work-permit",
    "--period", "2026-10", "--cadence", "monthly", "--received", "2026-10-21",
    "--reference", "Công văn số 123/STP-HCTP ngày 20/10/2026",
)  # fmt: skip


def test_a_paper_report_counts_from_when_it_was_recorded_until_it_is_withdrawn(
    home: Path,
) -> None:
    assert cell(home, "H26.STP")["status"] == "missing"
    recorded = json.loads(run(home, *RECORD, "--note", "nộp  tại bộ phận một cửa", "--json").stdout)
    assert recorded["kind"] == "paper" and recorded["via"] == "paper"
    assert (recorded["agency"], recorded["period"], recorded["status"]) == (
        "H26.STP", "2026-10", "accepted",
    )  # fmt: skip
    assert recorded["received_at"] == "2026-10-21T00:00:00+07:00"
    assert recorded["note"] == "nộp tại bộ phận một cửa"
    assert recorded["recorded_by"].endswith("@cli")

    now = cell(home, "H26.STP")
    assert (now["status"], now["late_days"], now["paper"]) == ("on-time", 0, True)
    assert now["document_id"] == "Công văn số 123/STP-HCTP ngày 20/10/2026"
    assert cell(home, "H26.SNV")["paper"] is False
    # As at a moment before it was recorded: what was known then, missing.
    assert cell(home, "H26.STP", "--at", "2026-11-05T09:59+07:00")["status"] == "missing"
    assert cell(home, "H26.STP", "--at", "2026-11-05T10:00+07:00")["status"] == "on-time"
    text = run(home, "compliance", "status", "--period", "2026-10").stdout
    assert "on time (received on paper)  Công văn số 123/STP-HCTP" in text

    listed = json.loads(run(home, "archive", "list", "--kind", "paper", "--json").stdout)
    assert [e["seq"] for e in listed] == [recorded["seq"]]
    run(home, "archive", "verify")

    withdrawn = run(
        home, "compliance", "withdraw-paper", str(recorded["seq"]), "--reason", "nhầm kỳ"
    )
    assert f"withdrew the paper record in entry {recorded['seq']}" in withdrawn.stdout
    assert cell(home, "H26.STP")["status"] == "missing"
    again = run(
        home, "compliance", "withdraw-paper", str(recorded["seq"]), "--reason", "x", ok=False
    )
    assert "was withdrawn already" in again.output
    run(home, "archive", "verify")
    lines = run(home, "archive", "list", "--kind", "paper").stdout.splitlines()
    assert lines[0].endswith(
        "paper    accepted H26.STP work-permit 2026-10  doc Công văn số 123/STP-HCTP ngày 20/10/2026"
    )
    assert lines[1].endswith(
        f"paper    withdrawal H26.STP work-permit 2026-10  withdraws {recorded['seq']}"
    )
    found = run(home, "archive", "search", "--status", "withdrawal", "--json").stdout
    assert [e["withdraws"] for e in json.loads(found)] == [recorded["seq"]]


def test_a_second_record_of_one_period_is_kept_with_a_note_naming_the_first(home: Path) -> None:
    first = json.loads(run(home, *RECORD, "--json").stdout)
    assert first["also_on_paper"] == []
    again = run(home, *RECORD[:-1], "Công văn số 130/STP-HCTP ngày 22/10/2026")
    assert (
        f"note: entry {first['seq']} records this period on paper already (received "
        "2026-10-21, Công văn số 123/STP-HCTP ngày 20/10/2026); both count"
    ) in again.stderr
    second = json.loads(run(home, *RECORD, "--json").stdout)
    assert sorted(second["also_on_paper"]) == [first["seq"], second["seq"] - 1]
    for seq in (first["seq"], second["seq"] - 1, second["seq"]):
        run(home, "compliance", "withdraw-paper", str(seq), "--reason", "nhầm")
    fourth = run(home, *RECORD)
    assert "note:" not in fourth.stderr  # what was withdrawn no longer counts
    other_agency = run(home, *RECORD[:3], "H26.SNV", *RECORD[4:])
    assert "note:" not in other_agency.stderr


def test_no_late_notice_for_a_report_recorded_on_paper(home: Path) -> None:
    def late_for(agency: str) -> list[dict[str, Any]]:
        at = "2026-11-06T09:00+07:00"
        planned = json.loads(run(home, "remind", "--dry-run", "--at", at, "--json").stdout)
        return [
            r for r in planned["planned"] if r["to"] == agency and r["kind"] == "late"
            and r["about"]["period"] == "2026-10"
        ]  # fmt: skip

    assert late_for("H26.STP")
    run(home, *RECORD)
    assert late_for("H26.STP") == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--agency": "H26.NOPE"}, "H26.NOPE owes nothing"),
        ({"--category": "tax"}, "H26.STP owes no tax report (monthly); it owes work-permit"),
        (
            {"--cadence": None, "--period": "2026-11"},
            "owes work-permit for 2026-11 as annual, monthly: say which with --cadence",
        ),
        (
            {"--cadence": "annual"},
            "H26.STP owes no work-permit report (annual) for a period ending in 2026-10: "
            "t-h26-stp-work-permit-annual (annual: a period begins on 16/11; valid … → …)",
        ),
        ({"--received": "2026-09-15"}, "is before the period 2026-09-16 – 2026-10-15 began"),
        ({"--received": "2999-01-01"}, "is in the future"),
        ({"--received": "21/10/2026"}, "is not a date; write it as YYYY-MM-DD"),
        ({"--received": "20261021"}, "is not a date; write it as YYYY-MM-DD"),
        ({"--reference": "số\x7f1"}, "--reference contains control characters"),
        ({"--reference": "  "}, "--reference is empty; give the paper document's number"),
        ({"--reference": "x" * 201}, "--reference has 201 characters; at most 200"),
        ({"--period": "2026-13"}, "--period '2026-13' is not a month"),
    ],
)
def test_what_cannot_be_recorded_is_refused_and_nothing_is_filed(
    home: Path, change: dict[str, str | None], message: str
) -> None:
    args = list(RECORD)
    for option, value in change.items():
        at = args.index(option)
        args[at : at + 2] = [] if value is None else [option, value]
    refused = run(home, *args, ok=False)
    assert message in refused.output and "Traceback" not in refused.output
    assert json.loads(run(home, "archive", "list", "--kind", "paper", "--json").stdout) == []


def test_only_a_paper_record_can_be_withdrawn(home: Path) -> None:
    refused = run(home, "compliance", "withdraw-paper", "0", "--reason", "x", ok=False)
    assert "archive entry 0 is not a record of a report received on paper" in refused.output
    assert "there is no archive entry 999" in (
        run(home, "compliance", "withdraw-paper", "999", "--reason", "x", ok=False).output
    )
    seq = json.loads(run(home, *RECORD, "--json").stdout)["seq"]
    empty = run(home, "compliance", "withdraw-paper", str(seq), "--reason", " ", ok=False)
    assert "--reason is empty; say why the record is withdrawn" in empty.output


def _paper(seq: int, provider: str, received: date, recorded: datetime, **kw: Any) -> Any:
    return sub(seq, provider, paper.received_at(received), via="paper", recorded_at=recorded, **kw)


def test_the_status_judges_a_paper_report_on_its_day_and_counts_it_once_known() -> None:
    o = ob("H26.A")
    late = _paper(1, "H26.A", date(2026, 10, 27), local("11-03"))
    assert status_for(o, OCTOBER, [late], CAL, local("11-02")).status == "missing"
    judged = status_for(o, OCTOBER, [late], CAL, local("11-03", "10:01"))
    assert (judged.status, judged.late_days, judged.paper) == ("late", 3, True)
    report = matrix([o], [late], CAL, "2026-10", local("11-03", "10:01"))
    assert report.cells == (judged,)


def test_a_withdrawn_paper_record_leaves_the_electronic_report_that_came_meanwhile() -> None:
    """Withdrawing a mistaken record is not a revoke of the report in force: the e-mailed
    report that arrived while the paper one was (wrongly) in force counts, on its own day."""
    o = ob("H26.A")
    recorded = _paper(1, "H26.A", date(2026, 10, 20), local("10-20", "11:00"))
    mailed = sub(2, "H26.A", local("10-23"))
    withdrawn = dataclasses.replace(recorded, withdrawn_at=local("10-25"))
    while_in_force = status_for(o, OCTOBER, [withdrawn, mailed], CAL, local("10-24"))
    assert (while_in_force.status, while_in_force.paper) == ("on-time", True)
    after = status_for(o, OCTOBER, [withdrawn, mailed], CAL, local("10-26"))
    assert (after.status, after.late_days, after.paper) == ("late", 1, False)


def test_a_paper_item_refuses_what_cannot_be_so() -> None:
    o = ob("H26.A")
    at = datetime(2026, 11, 5, 3, tzinfo=UTC)
    with pytest.raises(InputError, match="in the future"):
        paper.paper_item(o, OCTOBER, received_on=date(2026, 11, 6), reference="r", note="",
                         actor="a", at=at)  # fmt: skip
    with pytest.raises(InputError, match="control characters"):
        paper.paper_item(o, OCTOBER, received_on=date(2026, 11, 5), reference="số\x0112",
                         note="", actor="a", at=at)  # fmt: skip


def test_the_obligation_covering_the_month_is_the_one_recorded_for(
    home: Path, world: DemoWorld
) -> None:
    """An agency owing a category under an obligation retired and its successor (the preset's
    way): the record is for the one that owes the month."""
    db = Database.open(sqlite_url(home / "archive.db"))
    try:
        with db.session() as s:
            for o in (
                ob("H26.UBND", id="a-retired", valid_to=date(2025, 2, 28)),
                ob("H26.UBND", id="b-successor", valid_from=date(2025, 3, 1)),
            ):
                obligation_store.add(s, o, at=world.at, actor="t")
    finally:
        db.dispose()
    args = [a if a != "H26.STP" else "H26.UBND" for a in RECORD]
    recorded = json.loads(run(home, *args, "--json").stdout)
    assert recorded["obligation"] == "b-successor"
    assert (recorded["cell"]["obligation"], recorded["cell"]["status"]) == (
        "b-successor", "on-time",
    )  # fmt: skip
    assert recorded["cell"]["paper"] is True
    text = run(home, *args).stdout
    assert "status now: on time (received on paper)" in text
    old = [a if a != "2026-10" else "2024-10" for a in args]
    old = [a if a != "2026-10-21" else "2024-10-21" for a in old]
    assert json.loads(run(home, *old, "--json").stdout)["obligation"] == "a-retired"


def test_withdrawing_an_entry_past_the_archive_s_range_is_a_usage_error(home: Path) -> None:
    refused = run(home, "compliance", "withdraw-paper", str(2**63), "--reason", "x", ok=False)
    assert refused.exit_code == 2 and "Traceback" not in refused.output


def test_a_paper_record_fills_in_when_the_e_mailed_report_was_revoked_that_day() -> None:
    """Mailed on 20 October, revoked on the morning of the 28th, handed in on paper that
    afternoon: the paper one is the report, late by its day."""
    o = ob("H26.A")
    mailed = sub(1, "H26.A", local("10-20"), document_id="A,1")
    revoke = sub(2, "H26.A", local("10-28", "09:00"), business="revoke", replaces="A,1")
    on_paper = _paper(3, "H26.A", date(2026, 10, 28), local("11-05"), document_id="CV 9/A")
    cell = status_for(o, OCTOBER, [mailed, revoke, on_paper], CAL, local("11-06"))
    assert (cell.status, cell.late_days, cell.paper, cell.document_id, cell.withdrawn) == (
        "late", 4, True, "CV 9/A", False,
    )  # fmt: skip


def test_an_earlier_copy_on_paper_dates_the_report_and_leaves_the_e_mailed_chain_in_force() -> None:
    """A paper copy received the day before the e-mailed report, recorded after its update:
    the update still corrects the e-mailed report (nothing is 'ignored'), and the data were
    provided on the paper's day."""
    o = ob("H26.A")
    first = sub(1, "H26.A", local("10-23"), document_id="A,1")
    update = sub(2, "H26.A", local("10-30"), business="update", replaces="A,1", document_id="A,2")
    on_paper = _paper(3, "H26.A", date(2026, 10, 22), local("11-05"), document_id="CV 1")
    before = status_for(o, OCTOBER, [first, update, on_paper], CAL, local("11-04"))
    assert (before.status, before.late_days, before.paper) == ("corrected", 1, False)
    after = status_for(o, OCTOBER, [first, update, on_paper], CAL, local("11-06"))
    assert (after.status, after.late_days, after.paper, after.document_id, after.ignored) == (
        "corrected", 0, True, "A,2", (),
    )  # fmt: skip
    later_copy = _paper(3, "H26.A", date(2026, 10, 24), local("11-05"), document_id="CV 1")
    judged = status_for(o, OCTOBER, [first, update, later_copy], CAL, local("11-06"))
    assert (judged.late_days, judged.paper) == (1, False)  # the e-mail came first


def test_matrix_agrees_with_status_for_with_paper_records() -> None:
    """The matrix's shortcut for a lone report must not take a paper record for an e-mailed
    one: random histories with records recorded late and withdrawn."""
    rng = random.Random(11)
    obligations = [ob(f"H26.R{n}") for n in range(40)]
    subs = []
    for n in range(160):
        provider = f"H26.R{rng.randrange(40)}"
        when = local("10-10") + timedelta(hours=rng.randrange(24 * 31))
        if rng.random() < 0.4:
            recorded = when + timedelta(hours=rng.randrange(24 * 10))
            withdrawn = rng.choice([None, recorded + timedelta(hours=rng.randrange(24 * 5))])
            subs.append(
                _paper(n, provider, local_day(when), recorded, withdrawn_at=withdrawn,
                       document_id=f"CV {n}")
            )  # fmt: skip
            continue
        subs.append(
            sub(n, provider, when, rng.choice(["accepted", "accepted", "rejected"]),
                business=rng.choice(["new", "new", "update", "revoke"]),
                replaces=rng.choice([None, f"{provider},2026/10/01,{rng.randrange(n + 1)}/BC"]))
        )  # fmt: skip
    papers = 0
    for now in (local("10-21"), local("10-28"), local("11-05"), local("11-20")):
        report = matrix(obligations, subs, CAL, "2026-10", now)
        for cell in report.cells:
            assert cell == status_for(cell.obligation, cell.period, subs, CAL, now)
            papers += cell.paper
    assert papers  # the histories did exercise paper records


def test_an_e_mailed_correction_may_name_the_paper_report_and_a_revoke_never_withdraws_it() -> None:
    o = ob("H26.A")
    on_paper = _paper(1, "H26.A", date(2026, 10, 20), local("10-20", "12:00"), document_id="CV 7")
    update = sub(2, "H26.A", local("10-27"), business="update", replaces="CV 7", document_id="A,2")
    alone = status_for(o, OCTOBER, [on_paper, update], CAL, local("11-06"))
    assert (alone.status, alone.late_days, alone.corrections, alone.paper, alone.document_id) == (
        "corrected", 0, 1, True, "A,2",
    )  # fmt: skip
    mailed = sub(3, "H26.A", local("10-23"), document_id="A,1")
    both = status_for(o, OCTOBER, [on_paper, mailed, update], CAL, local("11-06"))
    assert (both.status, both.corrections, both.ignored, both.paper) == ("corrected", 1, (), True)
    revoke = sub(4, "H26.A", local("10-28"), business="revoke", replaces="CV 7")
    kept = status_for(o, OCTOBER, [on_paper, revoke], CAL, local("11-06"))
    assert (kept.status, kept.paper, kept.withdrawn) == ("on-time", True, False)
