"""``gateway agencies …`` against a real SQLite database in a temporary home (click's runner)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from archive.db import Database, sqlite_url
from gateway.cli import actor, cli
from gateway.demo import DEMO_AGENCIES
from gateway.loading import dump_directory
from keys import capabilities, store

Run = Callable[..., Result]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def run(home: Path) -> Run:
    def invoke(*args: str | Path, ok: bool = True) -> Result:
        result = CliRunner().invoke(cli, ["--home", str(home), *map(str, args)])
        if ok:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code != 0, result.output
        return result

    return invoke


def listing(run: Run, *args: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(run("agencies", "list", "--json", *args).stdout)
    return out


def events(home: Path) -> list[tuple[str, str, str]]:
    """(actor, action, subject) of every admin event, read straight from the database."""
    db = Database.open(sqlite_url(home / "archive.db"))
    try:
        with db.session() as s:
            return [(e.actor, e.action, e.subject) for e in store.events(s)]
    finally:
        db.dispose()


def snapshot(run: Run, home: Path) -> tuple[list[dict[str, Any]], int]:
    return listing(run), len(events(home))


# --- add, show, list, update, retire ---------------------------------------------------------


def test_show_says_how_the_hub_encrypts_to_the_agency_and_why(run: Run, home: Path) -> None:
    """AES-256-CBC by default; what its newest signed message advertised once one is filed
    (keys.capabilities, which the worker calls; tests/test_capabilities.py files real ones)."""
    run("agencies", "add", "H26.STP", "--name-vi", "Sở Tư pháp")
    shown = json.loads(run("agencies", "show", "H26.STP", "--json").stdout)
    assert shown["encryption"] == {
        "cipher": "aes256_cbc",
        "advertised": None,
        "entry_seq": None,
        "received_at": None,
        "updated_at": None,
    }
    assert "AES-256-CBC (the default: no signed message of it filed yet)" in (
        run("agencies", "show", "H26.STP").stdout
    )
    at = datetime(2026, 11, 2, 3, 4, tzinfo=UTC)
    db = Database.open(sqlite_url(home / "archive.db"))
    try:
        with db.session() as s:
            capabilities.record(s, {"H26.STP": (at, 41, ("aes256_gcm", "aes256_cbc"))}, at)
    finally:
        db.dispose()
    shown = json.loads(run("agencies", "show", "H26.STP", "--json").stdout)
    assert shown["encryption"] == {
        "cipher": "aes256_gcm",
        "advertised": ["aes256_gcm", "aes256_cbc"],
        "entry_seq": 41,
        "received_at": "2026-11-02T03:04:00+00:00",
        "updated_at": "2026-11-02T03:04:00+00:00",
    }
    text = run("agencies", "show", "H26.STP").stdout
    assert (
        "encryption:  AES-256-GCM (its newest message, archive entry 41, advertised: aes256_gcm, "
        "aes256_cbc)"
    ) in text


def test_add_show_list_update_retire(run: Run, home: Path) -> None:
    run("agencies", "add", "H26.UBND", "--name-vi", "Ủy ban nhân dân thành phố Hà Nội")
    added = json.loads(
        run(
            "agencies", "add", "H26.STP", "--name-vi", "Sở Tư pháp", "--name-en", "Justice",
            "--email", "VanThu@STP.Hanoi.gov.vn", "--email", "pa@stp.hanoi.gov.vn",
            "--supervisor", "H26.UBND", "--contact", "Phòng Hành chính", "--valid-from",
            "2017-07-01", "--json",
        ).stdout
    )  # fmt: skip
    assert added == {
        "status": "added",
        "agency": {
            "organ_id": "H26.STP",
            "name_vi": "Sở Tư pháp",
            "name_en": "Justice",
            "emails": ["VanThu@stp.hanoi.gov.vn", "pa@stp.hanoi.gov.vn"],
            "supervisor": "H26.UBND",
            "valid_from": "2017-07-01",
            "valid_to": None,
            "contact": "Phòng Hành chính",
        },
    }
    shown = json.loads(run("agencies", "show", "H26.STP", "--json").stdout)
    assert shown["history"][0]["action"] == "agency.add"
    assert json.loads(run("agencies", "show", "H26.UBND", "--json").stdout)["supervises"] == [
        "H26.STP"
    ]
    text = run("agencies", "show", "H26.STP").stdout
    assert "H26.UBND (Ủy ban nhân dân thành phố Hà Nội)" in text and "2017-07-01 → …" in text

    updated = run(
        "agencies", "update", "H26.STP", "--add-email", "new@stp.hanoi.gov.vn",
        "--remove-email", "pa@stp.hanoi.gov.vn", "--contact", "", "--json",
    )  # fmt: skip
    agency = json.loads(updated.stdout)["agency"]
    assert agency["emails"] == ["VanThu@stp.hanoi.gov.vn", "new@stp.hanoi.gov.vn"]
    assert agency["contact"] is None
    same = run("agencies", "update", "H26.STP", "--name-en", "Justice", "--json")
    assert json.loads(same.stdout)["status"] == "unchanged"

    retired = run("agencies", "retire", "H26.STP", "--on", "2025-06-30", "--json")
    assert json.loads(retired.stdout)["agency"]["valid_to"] == "2025-06-30"
    assert [a["organ_id"] for a in listing(run, "--active-on", "2025-07-01")] == ["H26.UBND"]
    assert [a["organ_id"] for a in listing(run, "--active-on", "2025-06-30")] == [
        "H26.STP",
        "H26.UBND",
    ]
    table = run("agencies", "list").stdout.splitlines()
    assert table[0].split() == ["CODE", "NAME", "(VI)", "E-MAILS", "VALID"]
    assert "VanThu@stp.hanoi.gov.vn, new@stp.hanoi.gov.vn" in table[1]
    assert table[1].endswith("2017-07-01 → 2025-06-30")

    me = actor()
    assert events(home) == [
        (me, "agency.add", "H26.UBND"),
        (me, "agency.add", "H26.STP"),
        (me, "agency.update", "H26.STP"),
        (me, "agency.retire", "H26.STP"),
    ]


def test_update_replaces_emails_and_clears_fields(run: Run) -> None:
    run("agencies", "add", "H26.UBND", "--name-vi", "UBND")
    run("agencies", "add", "H26.X", "--name-vi", "X", "--email", "a@x.vn", "--supervisor",
        "H26.UBND", "--valid-to", "2025-06-30")  # fmt: skip
    result = run("agencies", "update", "H26.X", "--email", "b@x.vn", "--email", "c@x.vn",
                 "--supervisor", "", "--valid-to", "", "--name-vi", " Sở X ")  # fmt: skip
    assert result.stdout.startswith("updated H26.X (Sở X), valid always")
    (x,) = [a for a in listing(run) if a["organ_id"] == "H26.X"]
    assert (x["emails"], x["supervisor"], x["valid_to"]) == (["b@x.vn", "c@x.vn"], None, None)


def test_retire_defaults_to_today_in_vietnam(
    run: Run, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("agencies", "add", "H26.X", "--name-vi", "X")
    # 18:00 UTC on 30 June is already 1 July in Hanoi (UTC+7)
    monkeypatch.setattr(
        "gateway.cli_agencies.now", lambda: datetime(2025, 6, 30, 18, 0, tzinfo=UTC)
    )
    run("agencies", "retire", "H26.X")
    assert listing(run)[0]["valid_to"] == "2025-07-01"
    again = json.loads(run("agencies", "retire", "H26.X", "--json").stdout)
    assert again["status"] == "unchanged" and len(events(home)) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "H26.A", "--name-vi", "A again"], "agency H26.A already exists; use"),
        (["add", "H26.B"], "--name-vi is required"),
        (["add", "H26.B", "--name-vi", "B", "--supervisor", "H26.NONE"], "supervising body"),
        (["add", "H26.B", "--name-vi", "B", "--valid-to", "2025-02-30"], "--valid-to '2025-"),
        (["add", "H26.B", "--name-vi", "B", "--email", "a@x.vn"], "e-mail a@x.vn is claimed"),
        (["add", "H26.B", "--name-vi", "B", "--email", "nope"], "is not a bare e-mail"),
        (
            ["add", "H26.B", "--name-vi", "B", "--email", "thư@x.vn"],
            "agency H26.B: 'thư@x.vn' is not an ASCII e-mail address: the gateway sends mail "
            "without SMTPUTF8 (RFC 6531), so every mailbox must be ASCII",
        ),
        (
            ["update", "H26.A", "--add-email", "a@thư.vn"],
            "agency H26.A: 'a@thư.vn' is not an ASCII e-mail address",
        ),
        (["update", "H26.A"], "nothing to change for H26.A"),
        (["update", "H26.A", "--remove-email", "b@x.vn"], "H26.A has no e-mail b@x.vn"),
        (["update", "H26.NONE", "--name-en", "x"], "no agency 'H26.NONE' in the directory"),
        (["retire", "H26.A", "--on", "2016-12-31"], "H26.A starts on 2017-01-01"),
        (["show", "H26.NONE"], "no agency 'H26.NONE'"),
        (["list", "--active-on", "tomorrow"], "--active-on 'tomorrow' is not a date"),
    ],
)
def test_refused_changes_say_why_and_change_nothing(
    run: Run, home: Path, args: list[str], message: str
) -> None:
    run("agencies", "add", "H26.A", "--name-vi", "A", "--email", "a@x.vn", "--valid-from",
        "2017-01-01")  # fmt: skip
    before = snapshot(run, home)
    result = run("agencies", *args, ok=False)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert snapshot(run, home) == before


# --- the Hanoi preset --------------------------------------------------------------------------

#: Every body Decision 18/2017/QĐ-UBND Điều 8 names (with Điều 11 and 13 for the City People's
#: Committee and the police's coordinating role), spelt as in the regulation.
ARTICLE_8 = (
    "Công an Thành phố",
    "Sở Lao động - Thương binh và Xã hội",
    "Ban Quản lý các khu công nghiệp và chế xuất Hà Nội",
    "Sở Kế hoạch và Đầu tư",
    "Sở Công thương",
    "Sở Y tế",
    "Sở Giáo dục và Đào tạo",
    "Sở Văn hóa và Thể thao",
    "Sở Du lịch",
    "Sở Ngoại vụ",
    "Sở Giao thông vận tải",
    "Sở Khoa học và Công nghệ",
    "Cục Thuế thành phố Hà Nội",
    "Cục Thống kê thành phố Hà Nội",
    "Sở Thông tin và Truyền thông",
    "Sở Tư pháp",
    "Sở Tài chính",
    "Sở Xây dựng",
    "Ngân hàng Nhà nước Việt Nam",  # "… thành phố Hà Nội" (8.2.h)
    "Ủy ban nhân dân Thành phố",
)
#: Ủy ban nhân dân cấp huyện: the 12 quận, 1 thị xã and 17 huyện of Hanoi, 2017–2025.
DISTRICTS = (
    *(f"quận {n}" for n in ("Ba Đình", "Hoàn Kiếm", "Tây Hồ", "Long Biên", "Cầu Giấy",
                            "Đống Đa", "Hai Bà Trưng", "Hoàng Mai", "Thanh Xuân",
                            "Nam Từ Liêm", "Bắc Từ Liêm", "Hà Đông")),
    "thị xã Sơn Tây",
    *(f"huyện {n}" for n in ("Ba Vì", "Chương Mỹ", "Đan Phượng", "Đông Anh", "Gia Lâm",
                             "Hoài Đức", "Mê Linh", "Mỹ Đức", "Phú Xuyên", "Phúc Thọ",
                             "Quốc Oai", "Sóc Sơn", "Thạch Thất", "Thanh Oai", "Thanh Trì",
                             "Thường Tín", "Ứng Hòa")),
)  # fmt: skip
#: Merged or reorganised on 1 March 2025 → the entry that took over.
SUCCESSORS = {
    "H26.SKHDT": "H26.STC",
    "H26.SLDTBXH": "H26.SNV",
    "H26.SNGV": "H26.VPUBND",
    "H26.SGTVT": "H26.SXD",
    "H26.STTTT": "H26.SKHCN",
    "H26.BQLKCN": "H26.BQLKCNC",
    "H26.CTHUE": "H26.CCTKV1",
    "H26.CTK": "H26.CCTK",
    "H26.NHNN": "H26.NHNNKV1",
}
CENTRAL = {"H26.CATP", "H26.CTHUE", "H26.CCTKV1", "H26.CTK", "H26.CCTK", "H26.NHNN", "H26.NHNNKV1"}


def test_the_hanoi_preset_has_every_article_8_body(run: Run, home: Path) -> None:
    result = json.loads(run("agencies", "import", "--preset", "hanoi", "--json").stdout)
    assert len(result["added"]) == 56 and result["updated"] == result["unchanged"] == []
    agencies = {a["organ_id"]: a for a in listing(run)}
    names = [a["name_vi"].casefold() for a in agencies.values()]
    for body in ARTICLE_8:
        assert any(body.casefold() in n for n in names), body
    for district in DISTRICTS:
        assert f"ủy ban nhân dân {district}".casefold() in names, district
    assert len(DISTRICTS) == 30

    assert {"H26.CATP", "H26.SNV", "H26.STP", "H26.UBND"} <= set(agencies)  # the demo's codes
    assert all(not a["emails"] for a in agencies.values())  # admins add the real mailboxes
    assert all(a["name_en"] for a in agencies.values())
    for organ_id, a in agencies.items():
        expected = None if organ_id in CENTRAL | {"H26.UBND"} else "H26.UBND"
        assert a["supervisor"] == expected, organ_id
    for old, new in SUCCESSORS.items():
        assert agencies[old]["valid_to"] == "2025-02-28", old
        assert agencies[new]["valid_to"] is None and agencies[new]["valid_from"] in (
            None,
            "2025-03-01",
        )
    districts = [a for a in agencies.values() if a["name_vi"].startswith("Ủy ban nhân dân ")]
    assert sum(a["valid_to"] == "2025-06-30" for a in districts) == 30
    active = {a["organ_id"] for a in listing(run, "--active-on", "2025-07-01")}
    assert len(active) == 56 - 30 - len(SUCCESSORS)
    assert {"H26.CATP", "H26.STP", "H26.SNV", "H26.STC", "H26.CCTKV1"} <= active


def test_the_preset_is_idempotent_and_keeps_admin_edits(run: Run, home: Path) -> None:
    run("agencies", "import", "--preset", "hanoi")
    first = snapshot(run, home)
    again = run("agencies", "import", "--preset", "hanoi").stdout
    assert "0 added, 0 updated, 56 unchanged" in again
    assert snapshot(run, home) == first  # no change, not even an event

    run("agencies", "update", "H26.STP", "--add-email", "vanthu@stp.hanoi.gov.vn")
    run("agencies", "update", "H26.SYT", "--name-en", "Health", "--contact", "0243")
    run("agencies", "retire", "H26.SDL", "--on", "2030-12-31")
    edited = snapshot(run, home)
    rerun = run("agencies", "import", "--preset", "hanoi").stdout
    assert "kept, differs from preset: H26.SDL (valid_to)" in rerun
    assert "kept, differs from preset: H26.SYT (name_en)" in rerun
    assert "54 unchanged, 2 kept" in rerun  # the added e-mail is the admin's: not a difference
    assert snapshot(run, home) == edited

    dry = run("agencies", "import", "--preset", "hanoi", "--overwrite", "--dry-run", "--json")
    assert json.loads(dry.stdout)["updated"] == ["H26.SYT", "H26.SDL"]
    assert snapshot(run, home) == edited
    run("agencies", "import", "--preset", "hanoi", "--overwrite")
    after = {a["organ_id"]: a for a in listing(run)}
    assert after["H26.SYT"]["name_en"] == "Hanoi Department of Health"
    assert after["H26.SYT"]["contact"] == "0243"  # contact and e-mails stay the admin's
    assert after["H26.SDL"]["valid_to"] is None
    assert after["H26.STP"]["emails"] == ["vanthu@stp.hanoi.gov.vn"]
    assert [e[1] for e in events(home)[edited[1] :]] == [
        "agency.update",
        "agency.update",
        "agency.import",
    ]


# --- import and export -------------------------------------------------------------------------


def _populate(run: Run) -> None:
    run("agencies", "import", "--preset", "hanoi")
    run("agencies", "update", "H26.STP", "--add-email", "vanthu@stp.hanoi.gov.vn",
        "--add-email", "pa08@stp.hanoi.gov.vn", "--contact", 'Ms "Lan", ext. 12; room 3')  # fmt: skip
    run("agencies", "add", "H26.TEST", "--name-vi", "Đơn vị, thử", "--email", "a@b.vn",
        "--valid-from", "2026-01-01", "--valid-to", "2026-12-31")  # fmt: skip


@pytest.mark.parametrize("fmt", ["csv", "toml"])
def test_export_then_import_round_trips_exactly(
    run: Run, home: Path, tmp_path: Path, fmt: str
) -> None:
    _populate(run)
    original = listing(run)
    out = tmp_path / f"directory.{fmt}"
    report = json.loads(run("agencies", "export", "--out", out, "--json").stdout)
    assert report == {"out": str(out), "format": fmt, "agencies": len(original)}
    assert run("agencies", "export", "--format", fmt).stdout == out.read_text(encoding="utf-8")

    same = json.loads(run("agencies", "import", out, "--json").stdout)
    assert (same["added"], same["updated"], len(same["unchanged"])) == ([], [], len(original))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = CliRunner().invoke(cli, ["--home", str(fresh), "agencies", "import", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{len(original)} added, 0 updated, 0 unchanged" in result.stdout
    again = CliRunner().invoke(cli, ["--home", str(fresh), "agencies", "list", "--json"])
    assert json.loads(again.stdout) == original


def test_import_adds_updates_and_reports(run: Run, home: Path, tmp_path: Path) -> None:
    old_file = tmp_path / "agencies.toml"  # the directory file format used before the database
    old_file.write_text(dump_directory(DEMO_AGENCIES), encoding="utf-8")
    n = len(DEMO_AGENCIES)
    dry = run("agencies", "import", old_file, "--dry-run").stdout
    assert "would import" in dry and f"{n} added" in dry and "nothing written" in dry
    assert listing(run) == [] and events(home) == []
    assert f"{n} added, 0 updated, 0 unchanged" in run("agencies", "import", old_file).stdout
    assert [a["organ_id"] for a in listing(run)] == sorted(a.organ_id for a in DEMO_AGENCIES)

    csv_file = tmp_path / "changes.txt"
    csv_file.write_text(
        "organ_id,name_vi,emails,valid_to\n"
        "H26.SNV,Sở Nội vụ thành phố Hà Nội,vanthu@snv.hanoi.gov.vn moi@snv.hanoi.gov.vn,\n",
        encoding="utf-8",
    )
    result = json.loads(run("agencies", "import", csv_file, "--format", "csv", "--json").stdout)
    assert result["updated"] == ["H26.SNV"]
    snv = next(a for a in listing(run) if a["organ_id"] == "H26.SNV")
    assert snv["emails"] == ["moi@snv.hanoi.gov.vn", "vanthu@snv.hanoi.gov.vn"]
    assert snv["supervisor"] is None and snv["name_en"] == ""  # the file is the whole entry
    actions = [e[1] for e in events(home)]
    assert actions.count("agency.import") == 2 and actions.count("agency.add") == n


def test_one_import_can_hand_a_mailbox_to_a_successor(run: Run, home: Path, tmp_path: Path) -> None:
    run("agencies", "add", "H26.SKHDT", "--name-vi", "Sở Kế hoạch và Đầu tư", "--email",
        "vanthu@skhdt.hanoi.gov.vn")  # fmt: skip
    run("agencies", "add", "H26.A", "--name-vi", "A", "--email", "shared@x.vn")
    run("agencies", "add", "H26.B", "--name-vi", "B")
    merger = tmp_path / "merger.csv"
    merger.write_text(
        "organ_id,name_vi,emails,valid_from,valid_to\n"
        "H26.STC,Sở Tài chính,vanthu@skhdt.hanoi.gov.vn,2025-03-01,\n"
        "H26.SKHDT,Sở Kế hoạch và Đầu tư,vanthu@skhdt.hanoi.gov.vn,,2025-02-28\n"
        "H26.B,B,shared@x.vn,,\n"
        "H26.A,A,,,\n",
        encoding="utf-8",
    )
    assert "1 added, 3 updated" in run("agencies", "import", merger).stdout
    emails = {a["organ_id"]: a["emails"] for a in listing(run)}
    assert emails["H26.B"] == ["shared@x.vn"] and emails["H26.A"] == []
    assert emails["H26.STC"] == emails["H26.SKHDT"] == ["vanthu@skhdt.hanoi.gov.vn"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad-date.csv",
            "organ_id,name_vi,valid_to\nH26.STP,Sở Tư pháp,2025-06-31\n",
            "bad-date.csv: row 2: valid_to '2025-06-31' is not a date; write it as YYYY-MM-DD",
        ),
        (
            "no-name.csv",
            "organ_id,name_vi\nH26.UBND,UBND\nH26.X,\n",
            "no-name.csv: row 3: name_vi of H26.X is empty; give its Vietnamese name",
        ),
        (
            "twice.csv",
            "organ_id,name_vi\nH26.Y,Y\nH26.Y,Y again\n",
            "twice.csv: row 3: OrganId H26.Y already appears at row 2; keep one entry per",
        ),
        (
            "taken.csv",
            "organ_id,name_vi,emails\nH26.Y,Y,\nH26.Z,Z,vanthu@stp.hanoi.gov.vn\n",
            "taken.csv: row 3: e-mail vanthu@stp.hanoi.gov.vn of H26.Z is already used by "
            "H26.STP (Sở Tư pháp thành phố Hà Nội) over overlapping dates; remove it here, or "
            "first `gateway agencies update H26.STP --remove-email vanthu@stp.hanoi.gov.vn`",
        ),
        (
            "boss.csv",
            "organ_id,name_vi,supervisor\nH26.Y,Y,H26.UBND\nH26.Z,Z,H26.NOBODY\n",
            "boss.csv: row 3: supervisor H26.NOBODY of H26.Z is neither in the directory nor "
            "in this file; add that agency first",
        ),
        (
            "mailbox.csv",
            "organ_id,name_vi,emails\nH26.Y,Y,vanthu@y.vn\nH26.Z,Z,văn-thư@z.vn\n",
            "mailbox.csv: row 3: agency H26.Z: 'văn-thư@z.vn' is not an ASCII e-mail address",
        ),
        (
            "column.csv",
            "organ_id,name_vi,email\nH26.Y,Y,y@x.vn\n",
            "column.csv: row 1: unknown column 'email'; the columns are organ_id,name_vi,",
        ),
        (
            "latin1.csv",
            "organ_id,name_vi\nH26.Y,S\xf4 Y t\xea\n".encode("latin-1"),
            "latin1.csv: line 2: not UTF-8 text (byte 0xf4 at offset 24); save the file as UTF-8",
        ),
        (
            "bad.toml",
            '[[agency]]\norgan_id = "H26.Y"\nname_vi = "Y"\n\n[[agency]]\norgan_id = "H26.Z"\n'
            'name_vi = "Z"\nvalid_from = "1/3/2025"\n',
            "bad.toml: line 5: valid_from '1/3/2025' is not a date",
        ),
        (
            "dir.xlsx",
            "organ_id,name_vi\n",
            "dir.xlsx: cannot tell the format from the file name; name it .csv or .toml",
        ),
    ],
)
def test_bad_files_are_refused_with_one_clear_line_and_nothing_written(
    run: Run, home: Path, tmp_path: Path, name: str, content: str | bytes, message: str
) -> None:
    run("agencies", "import", "--preset", "hanoi")
    run("agencies", "update", "H26.STP", "--add-email", "vanthu@stp.hanoi.gov.vn")
    before = snapshot(run, home)
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    result = run("agencies", "import", path, ok=False)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {tmp_path}/{message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(run, home) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give either FILE or --preset NAME"),
        (["x.csv", "--preset", "hanoi"], "give either FILE or --preset NAME"),
        (["x.csv", "--overwrite"], "--overwrite applies to --preset only"),
        (["missing.csv"], "missing.csv: cannot read"),
    ],
)
def test_import_usage_errors(run: Run, args: list[str], message: str) -> None:
    result = run("agencies", "import", *args, ok=False)
    assert message in result.stderr


def test_export_json_needs_a_file_and_empty_directory_exports_a_header(run: Run) -> None:
    assert "--json reports on a file" in run("agencies", "export", "--json", ok=False).stderr
    assert run("agencies", "export", "--format", "csv").stdout.startswith("organ_id,name_vi,")
    assert "no agencies" in run("agencies", "list").stdout
    assert listing(run) == []
