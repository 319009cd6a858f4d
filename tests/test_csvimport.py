"""CSV layouts: one per category, errors naming row and column, and the docs list them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from formats.categories import CATEGORIES
from formats.csvimport import records_from_csv
from formats.errors import InputError
from tests.payload_samples import sample_payload, to_csv

DOCS = Path(__file__).resolve().parent.parent / "docs" / "payloads.md"


@pytest.mark.parametrize("code", list(CATEGORIES))
def test_csv_round_trip_every_category(code: str) -> None:
    category = CATEGORIES[code]
    payload = sample_payload(code)
    records = records_from_csv(code, to_csv(category, payload))
    assert records == payload.records
    assert sample_payload(code, records=records) == payload


def test_docs_list_every_category_and_column() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for category in CATEGORIES.values():
        section = docs.split(f"### `{category.code}`", 1)
        assert len(section) == 2, f"docs/payloads.md has no section for {category.code}"
        body = section[1].split("\n### ", 1)[0]
        if category.point:
            assert category.point in body
        assert category.title_vi in body
        assert category.xsd in body
        for field in category.fields:
            assert f"| `{field.name}` |" in body, f"{category.code}.{field.name} not documented"
            for choice in field.choices:
                assert f"`{choice}`" in body


def test_header_in_any_order_optional_columns_may_be_left_out_bom_and_blank_rows() -> None:
    text = "\ufeffText,Outcome\r\n\r\n  Đã cung cấp  ,provided\r\n,\r\n"
    (record,) = records_from_csv("reply", text)
    assert record.fields == (("Outcome", "provided"), ("Text", "Đã cung cấp"))


def test_quoted_cells_with_commas_and_newlines() -> None:
    text = 'DocumentType,Summary,PageCount\nCông văn,"Về việc, phối hợp\ndòng hai",2\n'
    (record,) = records_from_csv("document", text)
    assert record["Summary"] == "Về việc, phối hợp\ndòng hai"
    assert record["PageCount"] == 2


@pytest.mark.parametrize(
    ("code", "text", "message"),
    [
        ("reply", "", "empty; row 1 must be the header: Outcome,Text"),
        ("reply", "Outcome,Text,Mood\nprovided,x,happy\n",
         "row 1: column 'Mood' is not part of the reply layout; expected columns: Outcome,Text"),
        ("reply", "Outcome\nprovided\n", "row 1: required column 'Text' is missing"),
        ("reply", "Outcome,Text,Text\nprovided,x,y\n", "row 1: column 'Text' appears more than once"),
        ("reply", "Outcome,Text\nprovided,x\nmaybe,y\n",
         "row 3, column Outcome: 'maybe' is not valid; expected one of provided, partial"),
        ("reply", "Outcome,Text\nprovided,\n", "row 2, column Text: empty, but Text is required"),
        ("reply", "Outcome,Text\nprovided,x,extra\n", "row 2: has 3 cells but the header has 2"),
        ("reply", "Outcome,Text\nprovided,x\npartial,y\n", "has 2 records; at most 1 allowed"),
        ("reply", "Outcome,Text\n", "has 0 records; at least 1 needed"),
        ("tax", "Kind,TaxCode,Name,AsOf\ntax-debt,0101,ACME,16/03/2024\n",
         "row 2, column AsOf: '16/03/2024' is not valid; expected a date as YYYY-MM-DD"),
        ("tax", "Kind,TaxCode,Name,AsOf\ntax-debt,0101,ACME,2024-02-30\n",
         "row 2, column AsOf: '2024-02-30' is not valid"),
        ("tax", "Kind,TaxCode,Name,AsOf,Amount\ntax-debt,0101,ACME,2024-02-01,1e5\n",
         "row 2, column Amount: '1e5' is not valid; expected a decimal number"),
        ("tax", "Kind,TaxCode,Name,AsOf,Nationality\ntax-debt,0101,ACME,2024-02-01,kr\n",
         "row 2, column Nationality: 'kr' is not valid; expected an ISO 3166-1 alpha-3"),
        ("tax", "Kind,TaxCode,Name,AsOf\ntax-debt,01 01,ACME,2024-02-01\n",
         "row 2, column TaxCode: '01 01' is not valid; expected 1-64 characters without spaces"),
        ("tax", "Kind,TaxCode,Name,AsOf\ntax-debt,0101,AC\x07ME,2024-02-01\n",
         "row 2, column Name: .* is not valid"),
        ("visa", "A\n1\n", "unknown category 'visa'; known categories: residence-card"),
        ("reply", 'Outcome,Text\nprovided,"x\n', "not valid CSV"),
    ],
)  # fmt: skip
def test_errors_name_row_column_and_expectation(code: str, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        records_from_csv(code, text)
