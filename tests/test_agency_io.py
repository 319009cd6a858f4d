"""keys.agency_io: agencies from and to CSV/TOML, and the plan of an import (pure)."""

from __future__ import annotations

import unicodedata
from dataclasses import replace
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from formats.errors import InputError
from gateway.demo import DEMO_AGENCIES
from gateway.loading import dump_directory
from keys import agency_io, presets
from keys.agency_io import Entry, plan_import, read_csv, read_toml
from keys.directory import Agency

UBND = Agency(
    "H26.UBND", "Ủy ban nhân dân thành phố Hà Nội", "Hanoi People's Committee", frozenset()
)
STP = Agency(
    "H26.STP",
    "Sở Tư pháp thành phố Hà Nội",
    "Hanoi Department of Justice",
    frozenset({"vanthu@stp.hanoi.gov.vn"}),
    supervisor="H26.UBND",
)
HEADER = "organ_id,name_vi,name_en,emails,supervisor,valid_from,valid_to,contact\n"


def entries(*agencies: Agency) -> list[Entry]:
    return [Entry(a, f"row {n}") for n, a in enumerate(agencies, start=2)]


# --- reading ---------------------------------------------------------------------------------


def test_csv_reads_every_column_and_both_email_separators() -> None:
    text = (
        "\ufeff"  # a spreadsheet's byte-order mark
        + HEADER
        + "H26.STP, Sở Tư pháp ,Justice,a@STP.hanoi.gov.vn; b@stp.hanoi.gov.vn c@x.vn,"
        "H26.UBND,2017-07-01,2025-06-30,Phòng PA08\n"
        "\n"  # blank rows are skipped
        "H26.UBND,Ủy ban nhân dân,,,,,,\n"
    )
    stp, ubnd = read_csv(text, source="a.csv")
    assert stp.where == "row 2" and ubnd.where == "row 4"
    assert stp.agency == Agency(
        "H26.STP",
        "Sở Tư pháp",
        "Justice",
        frozenset({"a@stp.hanoi.gov.vn", "b@stp.hanoi.gov.vn", "c@x.vn"}),
        supervisor="H26.UBND",
        valid_from=date(2017, 7, 1),
        valid_to=date(2025, 6, 30),
        contact="Phòng PA08",
    )
    assert ubnd.agency == Agency("H26.UBND", "Ủy ban nhân dân", "", frozenset())


def test_columns_may_come_in_any_order_and_optional_ones_may_be_left_out() -> None:
    (entry,) = read_csv("name_vi,organ_id\nSở Y tế,H26.SYT\n", source="a.csv")
    assert entry.agency == Agency("H26.SYT", "Sở Y tế", "", frozenset())


def test_decomposed_diacritics_are_stored_precomposed() -> None:
    nfd = unicodedata.normalize("NFD", "Sở Tư pháp")
    (entry,) = read_csv(f"organ_id,name_vi\nH26.STP,{nfd}\n", source="a.csv")
    assert entry.agency.name_vi == "Sở Tư pháp"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("organ_id,name_vi,phone\n", "a.csv: row 1: unknown column 'phone'; the columns are"),
        ("organ_id,name_en\n", "a.csv: row 1: required column 'name_vi' is missing"),
        ("organ_id,name_vi,name_vi\n", "a.csv: row 1: column 'name_vi' appears twice"),
        ("", "a.csv: the file is empty; row 1 must be the header"),
        (
            "organ_id,name_vi,valid_to\nH26.X,X,2025-02-30\n",
            "a.csv: row 2: valid_to '2025-02-30' is not a date; write it as YYYY-MM-DD",
        ),
        (
            "organ_id,name_vi,valid_to\nH26.X,X,30/06/2025\n",
            "a.csv: row 2: valid_to '30/06/2025' is not a date",
        ),
        ("organ_id,name_vi\nH26.X,  \n", "a.csv: row 2: name_vi of H26.X is empty; give its"),
        ("organ_id,name_vi\n,Sở\n", "a.csv: row 2: organ_id is empty; give the agency's code"),
        ("organ_id,name_vi\nH26.X,X,extra\n", "a.csv: row 2: has 3 cells but the header has 2"),
        ("organ_id,name_vi,emails\nH26.X,X,not-an-address\n", "a.csv: row 2: agency H26.X:"),
        (
            "organ_id,name_vi,emails\nH26.X,X,a@x.vn;nguyễn@x.vn\n",
            "a.csv: row 2: agency H26.X: 'nguyễn@x.vn' is not an ASCII e-mail address",
        ),
        (
            "organ_id,name_vi,valid_from,valid_to\nH26.X,X,2025-03-01,2025-02-28\n",
            "a.csv: row 2: agency H26.X: valid_to 2025-02-28 is before valid_from",
        ),
        ('organ_id,name_vi\nH26.X,"X\n', "a.csv: not valid CSV"),
    ],
)
def test_csv_problems_name_the_row_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        read_csv(text, source="a.csv")
    assert caught.value.message.startswith(message), caught.value.message


def test_non_utf8_names_the_line_and_the_fix() -> None:
    data = HEADER.encode() + "H26.STP,S\xf4 T\xfd,,,,,,\n".encode("latin-1")
    with pytest.raises(InputError, match=r"^a\.csv: line 2: not UTF-8 text .* save the file as"):
        agency_io.read(data, source="a.csv", fmt="csv")


def test_toml_reads_the_old_directory_file_format() -> None:
    text = dump_directory(DEMO_AGENCIES)  # what gateway.loading wrote before the database
    assert [e.agency for e in read_toml(text, source="agencies.toml")] == list(DEMO_AGENCIES)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[agency]]\norganId = "X"\n',
            "a.toml: line 1: unknown key 'organId'; the keys are organ_id,",
        ),
        (
            '\n[[agency]]\norgan_id = "A"\nname_vi = "A"\n\n[[agency]]\norgan_id = "B"\n'
            'name_vi = "B"\nvalid_to = "2025-6-30"\n',
            "a.toml: line 6: valid_to '2025-6-30' is not a date",
        ),
        (
            '[[agency]]\norgan_id = "A"\nname_vi = "A"\nvalid_to = 2025-06-30T00:00:00\n',
            "a.toml: line 1: valid_to must be a date without a time",
        ),
        ('[[agency]]\norgan_id = "A"\n', "a.toml: line 1: name_vi of A is empty"),
        ('[[agency]]\norgan_id = "A"\nname_vi = 5\n', "a.toml: line 1: name_vi must be text"),
        ('[hub]\naddress = "x"\n', "a.toml: unknown top-level key 'hub'"),
        ("[[agency]\n", "a.toml: not valid TOML: "),
    ],
)
def test_toml_problems_name_the_line_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        read_toml(text, source="a.toml")
    assert caught.value.message.startswith(message), caught.value.message


def test_format_from_suffix_or_explicit() -> None:
    assert agency_io.format_of("x.CSV") == "csv"
    assert agency_io.format_of("x.toml") == "toml"
    assert agency_io.format_of("x.txt", "csv") == "csv"
    with pytest.raises(InputError, match=r"x\.txt: cannot tell the format .* --format csv\|toml"):
        agency_io.format_of("x.txt")


# --- writing: a round trip through each format -------------------------------------------------

_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
).map(agency_io.clean)
_email = st.from_regex(r"[a-z0-9.+_-]{1,8}@[a-z0-9]{1,8}\.vn", fullmatch=True)
_day = st.none() | st.dates(date(1990, 1, 1), date(2100, 1, 1))


@st.composite
def _agency(draw: st.DrawFn) -> Agency:
    valid_from, valid_to = draw(_day), draw(_day)
    if valid_from and valid_to and valid_to < valid_from:
        valid_from, valid_to = valid_to, valid_from
    return Agency(
        organ_id=draw(_text.filter(bool)),
        name_vi=draw(_text.filter(bool)),
        name_en=draw(_text),
        emails=frozenset(draw(st.lists(_email, max_size=3))),
        supervisor=draw(_text) or None,
        valid_from=valid_from,
        valid_to=valid_to,
        contact=draw(_text) or None,
    )


@given(st.lists(_agency(), max_size=4, unique_by=lambda a: a.organ_id))
def test_export_then_read_gives_back_the_same_agencies(agencies: list[Agency]) -> None:
    csv_back = read_csv(agency_io.to_csv(agencies), source="x.csv")
    toml_back = read_toml(agency_io.to_toml(agencies), source="x.toml")
    assert [e.agency for e in csv_back] == agencies
    assert [e.agency for e in toml_back] == agencies


def test_toml_escapes_quotes_backslashes_and_control_characters() -> None:
    odd = replace(STP, name_en='a "quoted" \\ name\twith\ttabs', contact="line 1\nline 2\x01")
    (back,) = read_toml(agency_io.to_toml([odd]), source="x.toml")
    assert back.agency == odd


# --- planning ----------------------------------------------------------------------------------


def test_plan_sorts_new_agencies_so_supervisors_come_first() -> None:
    district = Agency("H26.Q.X", "UBND quận X", "", frozenset(), supervisor="H26.STP")
    plan = plan_import([], entries(district, STP, UBND), source="f")
    assert [a.organ_id for a in plan.add] == ["H26.UBND", "H26.STP", "H26.Q.X"]


def test_plan_counts_added_updated_and_unchanged() -> None:
    renamed = replace(STP, name_en="Justice")
    new = Agency("H26.SYT", "Sở Y tế", "", frozenset(), supervisor="H26.UBND")
    plan = plan_import([UBND, STP], entries(UBND, renamed, new), source="f")
    assert (plan.add, plan.update, plan.unchanged) == ((new,), (renamed,), ("H26.UBND",))


def test_preset_plan_keeps_admin_edits_and_never_touches_emails() -> None:
    preset_stp = replace(STP, emails=frozenset())
    edited = replace(STP, name_en="Justice", contact="0243")
    plan = plan_import([UBND, edited], entries(UBND, preset_stp), source="p", preset=True)
    assert plan.update == () and plan.kept == (("H26.STP", ("name_en",)),)
    plan = plan_import(
        [UBND, edited], entries(UBND, preset_stp), source="p", preset=True, overwrite=True
    )
    assert plan.update == (replace(edited, name_en=STP.name_en),)  # e-mails and contact stay


@pytest.mark.parametrize(
    ("existing", "incoming", "message"),
    [
        (
            [],
            [UBND, replace(UBND, name_en="again")],
            "f: row 3: OrganId H26.UBND already appears at row 2; keep one entry per agency",
        ),
        (
            [UBND, STP],
            [replace(UBND, emails=frozenset({"vanthu@stp.hanoi.gov.vn"}))],
            "f: row 2: e-mail vanthu@stp.hanoi.gov.vn of H26.UBND is already used by H26.STP "
            "(Sở Tư pháp thành phố Hà Nội) over overlapping dates; remove it here, or first "
            "`gateway agencies update H26.STP --remove-email vanthu@stp.hanoi.gov.vn`",
        ),
        (
            [],
            [UBND, STP, replace(STP, organ_id="H26.STP2")],
            "f: row 4: e-mail vanthu@stp.hanoi.gov.vn of H26.STP2 is also given to H26.STP at "
            "row 3 over overlapping dates",
        ),
        (
            [],
            [STP],
            "f: row 2: supervisor H26.UBND of H26.STP is neither in the directory nor in this "
            "file; add that agency first",
        ),
        (
            [],
            [replace(UBND, supervisor="H26.STP"), STP],
            "f: row 2: supervisors go round in a loop (H26.UBND → H26.STP → H26.UBND)",
        ),
    ],
)
def test_plan_refuses_an_inconsistent_result(
    existing: list[Agency], incoming: list[Agency], message: str
) -> None:
    with pytest.raises(InputError) as caught:
        plan_import(existing, entries(*incoming), source="f")
    assert caught.value.message.startswith(message), caught.value.message


def test_a_successor_may_take_the_mailbox_once_the_old_window_ends() -> None:
    old = replace(STP, valid_to=date(2025, 2, 28))
    successor = replace(STP, organ_id="H26.NEW", valid_from=date(2025, 3, 1))
    plan = plan_import([UBND, STP], entries(old, successor), source="f")
    assert plan.add == (successor,) and plan.update == (old,)


def test_the_hanoi_preset_reads_and_plans_cleanly() -> None:
    read = agency_io.read(presets.data("hanoi"), source="preset hanoi", fmt="toml")
    plan = plan_import([], read, source="preset hanoi", preset=True)
    assert len(plan.add) == len(read) and all(not a.emails for a in plan.add)
    with pytest.raises(InputError, match="no preset 'paris'; the presets are: hanoi"):
        presets.data("paris")
