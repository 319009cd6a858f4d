"""A rejected payload's specifics in Vietnamese: libxml2's schema findings, the gateway's own
rules, and what reaches the receipt (formats/wording_vi.py)."""

from __future__ import annotations

import dataclasses
from datetime import date
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import select

from archive import tables as t
from archive.records import Transport
from archive.service import Archive
from formats import wording_vi
from formats.errors import AttachmentMismatch, GatewayError, SchemaInvalid, UnknownRecipient
from formats.payload import Payload
from formats.smime import build_message
from gateway import intake, receipts
from gateway.builder import Builder, Hub
from gateway.demo import HUB_ADDRESS, DemoWorld
from gateway.pipeline import Context
from gateway.worker import Worker
from keys.directory import Directory
from tests.test_outbound import _open_as, _payload

#: A schema with one of each restriction libxml2 words differently.
_XSD = b"""<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
<xs:simpleType name="Count"><xs:restriction base="xs:nonNegativeInteger">
  <xs:pattern value="[0-9]{1,18}"/></xs:restriction></xs:simpleType>
<xs:element name="r"><xs:complexType><xs:sequence>
<xs:element name="a"><xs:simpleType><xs:restriction base="xs:string">
  <xs:maxLength value="3"/></xs:restriction></xs:simpleType></xs:element>
<xs:element name="b"><xs:simpleType><xs:restriction base="xs:string">
  <xs:minLength value="3"/></xs:restriction></xs:simpleType></xs:element>
<xs:element name="c"><xs:simpleType><xs:restriction base="xs:integer">
  <xs:minInclusive value="3"/><xs:maxInclusive value="5"/></xs:restriction></xs:simpleType>
</xs:element>
<xs:element name="d" type="xs:integer"/>
<xs:element name="e" type="xs:date"/>
<xs:element name="f"><xs:complexType><xs:sequence><xs:element name="g" type="xs:string"/>
</xs:sequence><xs:attribute name="q" use="required"/></xs:complexType></xs:element>
<xs:element name="h" type="xs:dateTime"/>
<xs:element name="k"><xs:simpleType><xs:restriction base="xs:string">
  <xs:enumeration value="M"/><xs:enumeration value="F"/></xs:restriction></xs:simpleType>
</xs:element>
<xs:element name="p"><xs:simpleType><xs:restriction base="xs:string">
  <xs:pattern value="[A-Z]{3}"/></xs:restriction></xs:simpleType></xs:element>
<xs:element name="n" type="Count"/>
<xs:element name="o"><xs:complexType><xs:attribute name="n" type="xs:integer"/>
  <xs:attribute name="q" type="xs:integer"/></xs:complexType></xs:element>
<xs:element name="y1" minOccurs="0"/><xs:element name="y2" minOccurs="0"/>
<xs:choice><xs:element name="x1"/><xs:element name="x2"/></xs:choice>
</xs:sequence></xs:complexType></xs:element></xs:schema>"""

_OK = (
    b"<a>a</a><b>bbb</b><c>4</c><d>1</d><e>2020-12-01</e><f q='1'><g/></f>"
    b"<h>2020-12-01T00:00:00Z</h><k>M</k><p>KOR</p><n>7</n><o/><x1/>"
)


def _findings(*replacements: tuple[bytes, bytes]) -> list[str]:
    """libxml2's own messages for ``_OK`` with ``replacements`` made."""
    body = _OK
    for old, new in replacements:
        assert old in body
        body = body.replace(old, new, 1)
    schema = etree.XMLSchema(etree.fromstring(_XSD))
    assert not schema.validate(etree.fromstring(b"<r>" + body + b"</r>"))
    return [str(e.message) for e in schema.error_log]


@pytest.mark.parametrize(
    ("replacements", "wording"),
    [
        ([(b"<a>a</a>", b"<a>abcd</a>")], "phần tử a: dài 4 ký tự, quá mức tối đa 3 ký tự"),
        ([(b"<b>bbb</b>", b"<b>b</b>")], "phần tử b: dài 1 ký tự, chưa đủ mức tối thiểu 3"),
        ([(b"<c>4</c>", b"<c>9</c>")], "phần tử c: giá trị '9' lớn hơn mức tối đa 5"),
        ([(b"<c>4</c>", b"<c>1</c>")], "phần tử c: giá trị '1' nhỏ hơn mức tối thiểu 3"),
        ([(b"<d>1</d>", b"<d>x</d>")], "phần tử d: giá trị 'x' không đúng kiểu dữ liệu integer"),
        ([(b"<e>2020-12-01", b"<e>2020-13-01")], "ngày viết dạng NNNN-TT-NN"),
        ([(b"<f q='1'>", b"<f q='1' z='2'>")], "phần tử f: không được có thuộc tính z"),
        ([(b"<f q='1'>", b"<f>")], "phần tử f: thiếu thuộc tính bắt buộc q"),
        ([(b"<g/>", b"<g/>text")], "chỉ được chứa các phần tử con, không được chứa nội dung chữ"),
        ([(b"<g/>", b"")], "phần tử f: thiếu phần tử con g"),
        ([(b"<h>2020-12-01T00:00:00Z", b"<h><z/>")], "chỉ được chứa giá trị"),
        ([(b"<k>M", b"<k>Q")], "phần tử k: giá trị 'Q' không thuộc các giá trị được phép: 'M'"),
        (
            [(b"<p>KOR", b"<p>KOREA")],
            "giá trị 'KOREA' không đúng khuôn dạng; cần 3 chữ cái in hoa: mã quốc gia",
        ),
        ([(b"<p>KOR", b"<p>")], "phần tử p: không được để trống; cần 3 chữ cái in hoa"),
        # the project's own types are explained too (libxml2 names them, not the built-in)
        (
            [(b"<n>7", b"<n>abc")],
            "phần tử n: giá trị 'abc' không đúng kiểu dữ liệu Count (cần số nguyên không âm",
        ),
        # an attribute's value: the attribute named, whatever the value or the wording hold
        ([(b"<o/>", b"<o n='x'/>")], "phần tử o, thuộc tính n: giá trị 'x' không đúng kiểu"),
        ([(b"<o/>", b"<o q='q1'/>")], "phần tử o, thuộc tính q: giá trị 'q1' không đúng kiểu"),
        ([(b"<e>", b"<extra/><e>")], "phần tử extra: không được phép ở vị trí này; ở đây cần"),
        # "Expected is one of": what may come there, not what must
        ([(b"<x1/>", b"<x3/>")], "ở đây chỉ có thể là: y1, y2, x1, x2"),
        (
            [(b"<x1/>", b"")],
            "phần tử r: thiếu phần tử con bắt buộc; tiếp theo có thể là: y1, y2, x1, x2",
        ),
    ],
)
def test_each_libxml2_finding_is_worded_in_vietnamese(
    replacements: list[tuple[bytes, bytes]], wording: str
) -> None:
    worded = [wording_vi.schema_problem(m) for m in _findings(*replacements)]
    assert None not in worded, _findings(*replacements)
    assert any(wording in w for w in worded if w), worded


def test_every_pattern_of_the_packaged_schemas_is_explained() -> None:
    """A pattern added to an XSD without its wording would be quoted as a regex to the clerk."""
    schemas = Path(wording_vi.__file__).parent / "schemas"
    found = {
        str(p)
        for xsd in schemas.rglob("*.xsd")
        for p in etree.parse(str(xsd)).xpath(
            "//xs:pattern/@value", namespaces={"xs": "http://www.w3.org/2001/XMLSchema"}
        )
    }
    assert found and found <= set(wording_vi.PATTERNS), found - set(wording_vi.PATTERNS)


def test_a_quoted_value_is_short_and_on_one_line() -> None:
    assert wording_vi.shown("a\nb\tc") == "'a\\nb\\tc'"
    assert wording_vi.shown("x" * 100) == "'" + "x" * 59 + "…'"


def test_a_finding_with_no_wording_is_none_and_the_receipt_quotes_the_english() -> None:
    assert wording_vi.schema_problem("Element 'r': Something libxml2 may say one day.") is None
    assert wording_vi.schema_problem("not an element finding") is None
    reasons = [{"code": "schema-invalid", "message": "line 3: what libxml2 said",
                "reason_vi": SchemaInvalid.reason_vi}]  # fmt: skip
    text = receipts.description("rejected", 7, reasons)
    assert f"- {SchemaInvalid.reason_vi}: line 3: what libxml2 said" in text


@pytest.fixture
def xml(world: DemoWorld) -> str:
    return world.payload("H26.SNV").to_xml().decode()


def _refusal(xml: str, old: str, new: str) -> GatewayError:
    assert old in xml
    with pytest.raises(GatewayError) as caught:
        Payload.from_xml(xml.replace(old, new, 1).encode())
    return caught.value


@pytest.mark.parametrize(
    ("old", "new", "vietnamese"),
    [
        # the XSD's findings, located
        ("<DateOfBirth>1988-03-14", "<DateOfBirth>1988-13-14",
         "dòng 36, cột 7: phần tử DateOfBirth: giá trị '1988-13-14' không đúng kiểu dữ liệu Date"),
        ("<Sex>F</Sex>", "<Sex>Q</Sex>",
         "phần tử Sex: giá trị 'Q' không thuộc các giá trị được phép: 'M', 'F', 'X'"),
        # the gateway's own rules
        ("<PeriodEnd>2026-10-15", "<PeriodEnd>2026-10-14",
         "dòng 28, cột 5: kỳ báo cáo hằng tháng có mốc số liệu từ ngày 16 tháng trước đến ngày "
         "15 tháng tiếp theo (QĐ 18/2017 Điều 8.4.a), nhưng kỳ này từ 2026-09-16 đến 2026-10-14; "
         "kỳ 10/2026 là từ 2026-09-16 đến 2026-10-15"),
        ("<DocumentId>H26.SNV,", "<DocumentId>H26.XXX,",
         "DocumentId ghi cơ quan ban hành H26.XXX nhưng From/OrganId là H26.SNV"),
        ("<Business>0</Business>",
         "<Business>3</Business>",
         "Business 3 (thay thế) cần ReplacesDocumentId"),
        ("<Cadence>monthly</Cadence>\n    <PeriodStart>2026-09-16</PeriodStart>",
         "<Cadence>monthly</Cadence>",
         "cần có cả PeriodStart và PeriodEnd, hoặc bỏ cả hai"),
        # what the reader finds once the XSD has passed
        ("<DocumentId>H26.SNV,2026/11/02", "<DocumentId>H26.SNV,2026/02/30",
         "DocumentId: giá trị 'H26.SNV,2026/02/30,1/SNV-VLATLĐ' không phải mã văn bản"),
        ("<DateOfBirth>1988-03-14", "<DateOfBirth>1988-03-14 ",
         "DateOfBirth: giá trị '1988-03-14 ' không hợp lệ; cần ngày viết dạng NNNN-TT-NN"),
        ("<Category>work-permit", "<Category>foo", "không có loại thông tin 'foo'"),
        ("<Body>", "<Body>\n</Body><X>",
         "dòng 63, cột 10: XML sai cú pháp, phát hiện tại đây: thẻ mở <X> ở dòng 32 không khớp "
         "với thẻ đóng </Body>"),
        ("<Subject>Thông tin", "<Subject>A & B",
         "XML sai cú pháp, phát hiện tại đây: ký tự & đứng một mình; trong nội dung hãy viết "
         "nó là &amp;"),
        ("<Subject>Thông tin", "<Subject>&nbsp;Thông tin",
         "dữ liệu XML dùng thực thể &nbsp;, là cấu trúc bị cấm"),
        ("<Subject>Thông tin", "<Subject><?php x?>Thông tin",
         "dữ liệu XML có chỉ thị xử lý <?php?>, là cấu trúc bị cấm"),
        # a long value is shortened: what is wrong still fits in the receipt
        ("<FullName>Nguyen", "<FullName> " + "A" * 1500 + "Nguyen",
         "phần tử FullName: giá trị ' " + "A" * 58 + "…' không đúng khuôn dạng; cần nội dung "
         "không để trống, không có khoảng trắng ở đầu và cuối"),
    ],
)  # fmt: skip
def test_a_refused_payload_says_what_and_where_in_vietnamese(
    xml: str, old: str, new: str, vietnamese: str
) -> None:
    refusal = _refusal(xml, old, new)
    assert refusal.message_vi is not None and vietnamese in refusal.message_vi
    assert refusal.as_dict()["message_vi"] == refusal.message_vi
    text = receipts.description("rejected", 9, [refusal.as_dict()])
    vietnamese_half, english_half = text.split(receipts.REJECTED_EN.format(seq=9))
    assert f"- {refusal.reason_vi}: {refusal.message_vi}" in vietnamese_half
    assert refusal.message in english_half and refusal.message not in vietnamese_half


def test_an_undeliverable_recipient_and_an_attachment_mismatch_are_worded_too(
    world: DemoWorld,
) -> None:
    """Said by the pipeline, not the payload's reader (gateway/pipeline.py): the directory's
    reasons (not in it, ceased) and the manifest's, both languages."""
    stp = world.directory.get("H26.STP")
    assert stp is not None
    ceased = dataclasses.replace(stp, valid_to=date(2026, 6, 30))
    directory = Directory.of([a for a in world.directory if a is not stp] + [ceased])
    problems = directory.undeliverable(["H26.NOPE", "H26.SNV", "H26.STP"], date(2026, 11, 1))
    assert problems == [
        ("H26.NOPE is not an agency in the hub's directory",
         "H26.NOPE không có trong danh bạ của cổng"),
        ("H26.STP (Hanoi Department of Justice) ceased after 2026-06-30",
         "H26.STP (Sở Tư pháp thành phố Hà Nội) đã thôi hoạt động sau ngày 2026-06-30"),
    ]  # fmt: skip
    for cls in (UnknownRecipient, AttachmentMismatch):
        assert cls("x", message_vi="y").as_dict()["message_vi"] == "y"


def test_the_receipt_of_a_refused_payload_carries_its_vietnamese_specifics(
    archive: Archive, world: DemoWorld, world_ctx: Context, hub: Hub, xml: str, tmp_path: Path
) -> None:
    """Through the worker, the archive entry and the builder, opened with ``openssl cms``:
    what the sender's clerk reads."""
    agency = world.agencies["H26.SNV"]
    wrong = xml.replace("<PeriodEnd>2026-10-15", "<PeriodEnd>2026-10-14", 1).encode()
    raw = build_message(
        wrong,
        signer_cert=agency.cert,
        signer_key=agency.key,
        recipients=[world.hub.cert],
        from_addr="vanthu@snv.hanoi.gov.vn",
        to_addrs=[HUB_ADDRESS],
        message_id="<period@snv.hanoi.gov.vn>",
        date=world.at,
    )
    intake.accept(archive.db, raw, Transport(world.at, "smtp", "127.0.0.1"))
    [outcome] = Worker(archive, lambda: world_ctx, clock=lambda: world.at, name="w").run_once()
    assert outcome.disposition == "rejected" and outcome.archive_seq is not None
    Builder(archive, hub, lambda: world.directory, clock=lambda: world.at, name="b").run_once()
    with archive.db.session(read_only=True) as s:
        [reason] = archive.log.entry(s, outcome.archive_seq).fields["reasons"]
        receipt = s.scalar(
            select(t.Outbox.message).where(t.Outbox.key == f"receipt:{outcome.archive_seq}")
        )
    assert receipt is not None
    assert reason["message_vi"].startswith("dòng 28, cột 5: kỳ báo cáo hằng tháng")
    [record] = _payload(_open_as(receipt, world, "H26.SNV", tmp_path)[1]).records
    vietnamese, english = str(record["Description"]).split("Rejected (archive entry")
    assert f"- {SchemaInvalid.reason_vi}: {reason['message_vi']}" in vietnamese
    assert reason["message"] in english


@pytest.mark.parametrize(
    ("old", "new", "english", "vietnamese"),
    [
        # libxml2's own words between two quotes are no value: nothing is cut
        ("<Body>", "<Body>stray text",
         "Character content other than whitespace is not allowed because the content type is "
         "'element-only'", "chỉ được chứa các phần tử con, không được chứa nội dung chữ"),
        # a long pattern is no value either: its explanation stays
        ("<DocumentId>H26.SNV,", "<DocumentId>H26.SNV ",
         "The value 'H26.SNV 2026/11/02,1/SNV-VLATLĐ' is not accepted by the pattern",
         "cần mã văn bản dạng MãCơQuan,NNNN/TT/NN,số/ký hiệu"),
        # a value with line breaks and 1,500 characters: on one line, shortened, in both
        ("<FullName>Nguyen", "<FullName> \n" + "A" * 1500,
         "The value ' \\n" + "A" * 56 + "…' is not accepted",
         "cần nội dung không để trống, không có khoảng trắng ở đầu và cuối"),
        # a value past libxml2's own 64 KB: the message it cut, cut shorter
        ("<PassportNumber>M", "<PassportNumber> M" + "A" * 70_000,
         "[facet 'pattern'] The value ' MA", "không hợp lệ (ràng buộc pattern; giá trị quá dài"),
    ],
)  # fmt: skip
def test_what_libxml2_quotes_is_shortened_through_the_validator(
    xml: str, old: str, new: str, english: str, vietnamese: str
) -> None:
    refusal = _refusal(xml, old, new)
    assert english in refusal.message and len(refusal.message) < 700
    assert refusal.message_vi is not None and vietnamese in refusal.message_vi
    assert refusal.detail is not None and len(refusal.detail) < 700
