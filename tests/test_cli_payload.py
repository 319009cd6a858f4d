"""``gateway payload``: build from CSV, validate, list categories — through click's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from formats.categories import CATEGORIES
from formats.payload import Payload
from gateway.cli_payload import payload
from tests.payload_samples import XML_ASSETS, sample_payload, to_csv

MID = "6e3092e7-8648-4107-9a1b-0123456789ab"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _build(runner: CliRunner, tmp_path: Path, code: str, *extra: str) -> tuple[int, str, Path]:
    csv_file = tmp_path / f"{code}.csv"
    csv_file.write_text(to_csv(CATEGORIES[code], sample_payload(code)), encoding="utf-8")
    out = tmp_path / f"{code}.xml"
    result = runner.invoke(payload, [
        "build", "--category", code, "--from-csv", str(csv_file),
        "--from", "000.00.00.H26:pa08@hanoi.gov.vn:Công an Thành phố Hà Nội",
        "--to", "000.00.00.G22", "--to", "000.00.00.T01:thue@hanoi.gov.vn",
        "--document-number", "15/CAHN-PA08", "--issued-on", "2024-03-16",
        "--message-id", MID, "--out", str(out), *extra,
    ])  # fmt: skip
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else ""), out


def test_build_then_validate(runner: CliRunner, tmp_path: Path) -> None:
    code, output, out = _build(runner, tmp_path, "work-permit", "--period", "2024-03")
    assert code == 0, output
    assert "wrote" in output
    built = Payload.from_xml(out.read_bytes())
    assert built.records == sample_payload("work-permit").records
    assert built.header.recipients[1].email == "thue@hanoi.gov.vn"
    assert built.header.sender.name == "Công an Thành phố Hà Nội"
    assert str(built.header.message_id) == MID

    result = runner.invoke(payload, ["validate", str(out)])
    assert result.exit_code == 0
    assert result.output.strip().startswith(
        f"OK {out}: category=work-permit period=2024-02-16..2024-03-15 records=2"
    )
    result = runner.invoke(payload, ["validate", "--json", str(out)])
    assert json.loads(result.output)["records"] == 2


def test_build_request_with_due_date_and_attachment(runner: CliRunner, tmp_path: Path) -> None:
    attachment = tmp_path / "letter.pdf"
    attachment.write_bytes(b"%PDF-1.7 test")
    code, output, out = _build(
        runner, tmp_path, "request", "--due-date", "2024-03-30", "--attach", str(attachment)
    )
    assert code == 0, output
    (entry,) = Payload.from_xml(out.read_bytes()).attachments
    assert (entry.name, entry.media_type, entry.size) == ("letter.pdf", "application/pdf", 13)


def test_build_error_is_one_line_without_traceback(runner: CliRunner, tmp_path: Path) -> None:
    code, output, _ = _build(runner, tmp_path, "request")
    assert code == 1
    assert "Error: the request payload built is invalid" in output
    assert "must carry a deadline" in output
    assert "Traceback" not in output


def test_build_reports_csv_row_and_column(runner: CliRunner, tmp_path: Path) -> None:
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("Outcome,Text\nmaybe,x\n", encoding="utf-8")
    result = runner.invoke(payload, [
        "build", "--category", "reply", "--from-csv", str(csv_file), "--from", "A1", "--to", "B2",
        "--response-for", "B2,2024/03/01,1/X",
    ])  # fmt: skip
    assert result.exit_code == 1
    assert "row 2, column Outcome: 'maybe' is not valid" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_build_rejects_non_utf8_csv(runner: CliRunner, tmp_path: Path) -> None:
    csv_file = tmp_path / "latin1.csv"
    csv_file.write_bytes("Outcome,Text\nprovided,café\n".encode("latin-1"))
    result = runner.invoke(payload, [
        "build", "--category", "reply", "--from-csv", str(csv_file), "--from", "A1", "--to", "B2",
    ])  # fmt: skip
    assert result.exit_code == 1
    assert "is not UTF-8" in result.output


def test_validate_invalid_prints_located_errors(runner: CliRunner, tmp_path: Path) -> None:
    xml = sample_payload("tax").to_xml().replace(b"<Currency>VND<", b"<Currency>vnd<")
    bad = tmp_path / "bad.xml"
    bad.write_bytes(xml)
    result = runner.invoke(payload, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "INVALID: line " in result.output
    assert "Element 'Currency'" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(payload, ["validate", "--json", str(bad)])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "schema-invalid"
    assert error["detail"].startswith("line ")


@pytest.mark.parametrize(
    ("name", "code"),
    [("xxe-file.xml", "xml-forbidden"), ("deep-nesting-300.xml", "limit-exceeded")],
)
def test_validate_hostile_files(runner: CliRunner, name: str, code: str) -> None:
    result = runner.invoke(payload, ["validate", "--json", str(XML_ASSETS / name)])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == code
    assert "root:" not in result.output


def test_validate_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(payload, ["validate", str(tmp_path / "nope.xml")])
    assert result.exit_code == 1
    assert "cannot read" in result.output


def test_categories(runner: CliRunner) -> None:
    result = runner.invoke(payload, ["categories"])
    assert result.exit_code == 0
    assert "work-permit" in result.output
    assert "8.2.c" in result.output
    rows = json.loads(runner.invoke(payload, ["categories", "--json"]).output)
    assert [r["code"] for r in rows] == list(CATEGORIES)
    assert rows[0]["columns"][0] == "FullName"
