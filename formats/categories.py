"""The categories of information exchanged, from Article 8 of Hanoi Decision 18/2017/QĐ-UBND.

QĐ 18/2017 Điều 8 lists, body by body, which information each one provides to which others.
Every point of that list is one category here, with a stable lowercase-hyphen code, one versioned
XSD (``schemas/categories/<code>-v1.xsd``) and one CSV layout whose columns are the record's
fields in order. Four generic categories (``document``, ``request``, ``reply``, ``status``) carry
letters, ad-hoc requests, their replies and receipts.

A field's *kind* fixes its XSD type, its Python type and its CSV spelling:

=========  ==================  ==========  =========================================
kind       XSD type            Python      CSV / XML text
=========  ==================  ==========  =========================================
text       p:Text              str         1-2000 characters, no surrounding spaces
code       p:Code              str         1-64 characters, no spaces
country    p:Country           str         ISO 3166-1 alpha-3, e.g. ``KOR``
currency   p:Currency          str         ISO 4217, e.g. ``VND``
date       p:Date              date        ``YYYY-MM-DD``
datetime   p:DateTime          datetime    ISO 8601 with offset, e.g. ``...T09:30:00+07:00``
count      p:Count             int         non-negative integer
amount     p:Amount            Decimal     ``-?digits[.digits]``, no exponent
sha256     p:Sha256            str         64 lowercase hex digits
enum       inline enumeration  str         one of the field's choices
=========  ==================  ==========  =========================================
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Final

#: Python value of one record field.
Value = str | int | date | datetime | Decimal

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
_PATTERNS: Final[Mapping[str, tuple[re.Pattern[str], str]]] = {
    "text": (re.compile(r"[^ \t\n\r](?:.*[^ \t\n\r])?", re.DOTALL), "1-2000 characters, trimmed"),
    "code": (re.compile(r"[^ \t\n\r]{1,64}"), "1-64 characters without spaces"),
    "country": (re.compile(r"[A-Z]{3}"), "an ISO 3166-1 alpha-3 country code such as KOR"),
    "currency": (re.compile(r"[A-Z]{3}"), "an ISO 4217 currency code such as VND"),
    "count": (re.compile(r"[0-9]{1,18}"), "a non-negative whole number"),
    "amount": (re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,6})?"), "a decimal number such as 1500.50"),
    "sha256": (re.compile(r"[0-9a-f]{64}"), "64 lowercase hexadecimal digits (SHA-256)"),
}
KINDS: Final = (*_PATTERNS, "date", "datetime", "enum")
#: Kinds whose value is the text itself and whose XSD type (an ``xs:string`` pattern or
#: enumeration, whitespace preserved) accepts exactly the texts :meth:`Field.parse` accepts: a
#: reader of XSD-valid XML takes their text as it is. (``xs:date``, ``xs:dateTime``,
#: ``xs:nonNegativeInteger`` and ``xs:decimal`` collapse whitespace first; ``parse`` does not.)
VERBATIM_KINDS: Final = frozenset({"text", "code", "country", "currency", "sha256", "enum"})
#: Characters XML 1.0 cannot carry (§2.2 Char production).
NOT_XML_CHAR: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
TEXT_MAX = 2000


@dataclass(frozen=True, slots=True)
class Field:
    """One typed field of a category's record (an XML element and a CSV column)."""

    name: str
    kind: str
    meaning: str
    required: bool = True
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name}: unknown kind {self.kind!r}; use one of {KINDS}")
        if (self.kind == "enum") != bool(self.choices):
            raise ValueError(f"field {self.name}: choices go with kind 'enum' and only with it")

    @property
    def expected(self) -> str:
        """What a valid value looks like, for error messages."""
        if self.kind == "enum":
            return "one of " + ", ".join(self.choices)
        if self.kind == "date":
            return "a date as YYYY-MM-DD"
        if self.kind == "datetime":
            return "a date and time with offset, e.g. 2024-03-16T09:30:00+07:00"
        return _PATTERNS[self.kind][1]

    def parse(self, text: str) -> Value:
        """Convert the lexical form to the Python value; ``ValueError`` names what is expected."""
        try:
            value = self._parse(text)
        except ValueError:
            value = None
        if value is None:
            raise ValueError(f"{text!r} is not {self.expected}")
        return value

    def parser(self) -> Callable[[str], Value]:
        """:meth:`parse`, specialised to this field's kind: the same value for what is valid,
        found with one or two C calls (a payload of a million bytes has ~10,000 fields). What
        the quick test does not pass goes to :meth:`parse`, which explains it."""
        slow = self.parse
        kind = self.kind
        if kind == "enum":
            choices = frozenset(self.choices)
            return lambda text: text if text in choices else slow(text)
        if kind in ("date", "datetime"):
            shape = (_DATE if kind == "date" else _DATETIME).fullmatch
            convert = date.fromisoformat if kind == "date" else datetime.fromisoformat

            def dated(text: str) -> Value:
                if shape(text) is not None:
                    try:
                        return convert(text)
                    except ValueError:
                        pass
                return slow(text)

            return dated
        match = _PATTERNS[kind][0].fullmatch
        if kind in ("text", "code"):  # the patterns let through characters XML cannot carry
            bad = NOT_XML_CHAR.search
            longest = TEXT_MAX if kind == "text" else 64
            return lambda text: (
                text
                if len(text) <= longest and match(text) is not None and bad(text) is None
                else slow(text)
            )
        make: Callable[[str], Value] = {"count": int, "amount": Decimal}.get(kind, str)
        return lambda text: make(text) if match(text) is not None else slow(text)

    def _parse(self, text: str) -> Value | None:
        if NOT_XML_CHAR.search(text):
            return None
        if self.kind == "enum":
            return text if text in self.choices else None
        if self.kind == "date":
            return date.fromisoformat(text) if _DATE.fullmatch(text) else None
        if self.kind == "datetime":
            return datetime.fromisoformat(text) if _DATETIME.fullmatch(text) else None
        if not _PATTERNS[self.kind][0].fullmatch(text):
            return None
        if self.kind == "text" and len(text) > TEXT_MAX:
            return None
        if self.kind == "count":
            return int(text)
        if self.kind == "amount":
            try:
                return Decimal(text)
            except InvalidOperation:
                return None
        return text

    def format(self, value: Value) -> str:
        """The lexical form written to XML and CSV (the inverse of :meth:`parse`)."""
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, date):
            return value.isoformat()
        if isinstance(value, Decimal):
            return format(value, "f")
        return str(value)


@dataclass(frozen=True, slots=True)
class Category:
    """One kind of information exchanged, with its legal source and its record layout."""

    code: str
    #: Point of QĐ 18/2017 Điều 8 it comes from (``None`` for the generic categories).
    point: str | None
    title_vi: str
    title_en: str
    #: Which body provides it to which bodies, as Article 8 says.
    provider: str
    #: Name of the record element inside ``Body``.
    record_element: str
    fields: tuple[Field, ...]
    min_records: int = 0
    max_records: int | None = None

    @property
    def xsd(self) -> str:
        """The XSD file, relative to ``formats/schemas``."""
        return f"categories/{self.code}-v1.xsd"

    @property
    def columns(self) -> tuple[str, ...]:
        """CSV header row: the record's field names, in XML order."""
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def _f(name: str, kind: str, meaning: str, *, optional: bool = False) -> Field:
    return Field(name, kind, meaning, required=not optional)


def _e(name: str, choices: str, meaning: str, *, optional: bool = False) -> Field:
    return Field(name, "enum", meaning, required=not optional, choices=tuple(choices.split()))


def _person(*, optional_birth: bool = False) -> tuple[Field, ...]:
    return (
        _f("FullName", "text", "full name as in the passport"),
        _f("Nationality", "country", "nationality, ISO 3166-1 alpha-3"),
        _f("PassportNumber", "code", "passport or travel-document number"),
        _f("DateOfBirth", "date", "date of birth", optional=optional_birth),
        _e("Sex", "M F X", "sex as in the passport (M, F or X)", optional=optional_birth),
    )


_EVENT = "established amended revoked dissolved"
_POLICE = "Công an Thành phố (City Police)"

_ALL: tuple[Category, ...] = (
    Category(
        "residence-card",
        "8.1.đ (first dash)",
        "Người nước ngoài được cấp thẻ tạm trú, thị thực, gia hạn tạm trú",
        "Foreigners granted temporary-residence cards, visas or stay extensions",
        f"{_POLICE} to the Departments of Labour, Planning and Investment, Industry and Trade, "
        "Health, Education, Culture and Sports, Tourism, Foreign Affairs, Transport, Science and "
        "Technology, the Industrial Zones Board and the City Tax Department",
        "ResidenceDocument",
        (
            *_person(),
            _e("DocumentType", "residence-card visa stay-extension", "what was granted"),
            _f("DocumentNumber", "code", "number of the card, visa or extension"),
            _f("IssuedOn", "date", "date of issue"),
            _f("ValidUntil", "date", "last day of validity"),
            _f("Purpose", "code", "purpose symbol of the visa or card, e.g. LĐ1, DN1"),
            _f("SponsorOrganisation", "text", "organisation that invited or sponsors the person"),
            _f("Address", "text", "address of residence in Hanoi", optional=True),
        ),
    ),
    Category(
        "temporary-residence",
        "8.1.đ (second dash)",
        "Người nước ngoài khai báo tạm trú",
        "Temporary-residence declarations by foreigners",
        f"{_POLICE} to the Department of Tourism, the City Statistics Office and the district "
        "People's Committees",
        "ResidenceDeclaration",
        (
            *_person(optional_birth=True),
            _f("ArrivalDate", "date", "date of arrival at the accommodation"),
            _f("DepartureDate", "date", "expected or actual departure date", optional=True),
            _f("AccommodationName", "text", "hotel, guest house or host household"),
            _f("AccommodationAddress", "text", "address of the accommodation"),
            _f("District", "text", "urban or rural district of the accommodation"),
            _f("DeclaredOn", "date", "date the stay was declared"),
        ),
    ),
    Category(
        "foreign-organisation",
        "8.2.a",
        "Tổ chức có yếu tố nước ngoài; nhà đầu tư nước ngoài",
        "Organisations with foreign elements and foreign investors",
        "Department of Planning and Investment to the City Police, the Departments of Labour, "
        "Health, Education, Culture and Sports, Tourism, Science and Technology, the City Tax "
        "Department, the City Statistics Office and the district People's Committees",
        "ForeignOrganisation",
        (
            _f("EnterpriseCode", "code", "enterprise or investment-registration code"),
            _f("Name", "text", "registered name"),
            _f("NameForeign", "text", "name in a foreign language", optional=True),
            _e("Event", _EVENT, "what happened to the registration"),
            _f("EventDate", "date", "date of the event"),
            _f("Address", "text", "head-office address"),
            _f("LegalRepresentative", "text", "legal representative", optional=True),
            _f("InvestorName", "text", "foreign investor"),
            _f("InvestorNationality", "country", "investor's country, ISO 3166-1 alpha-3"),
            _f("InvestmentCapital", "amount", "registered investment capital", optional=True),
            _f("Currency", "currency", "currency of the capital, ISO 4217", optional=True),
            _f("BusinessLines", "text", "main business lines", optional=True),
        ),
    ),
    Category(
        "foreign-affairs",
        "8.2.b",
        "Tổ chức phi chính phủ nước ngoài, tình nguyện viên, hiệp hội, đoàn quốc tế, báo chí",
        "Foreign NGOs, volunteers, associations, delegations, foreigners at city bodies, press",
        "Department of Foreign Affairs to the City Police, the Departments of Planning and "
        "Investment and of Information and Communications and the district People's Committees",
        "ForeignAffairsEntry",
        (
            _e(
                "Kind",
                "ngo volunteer business-association delegation city-body-staff award "
                "diplomatic-member press-office correspondent",
                "kind of entry",
            ),
            _f("Name", "text", "organisation, delegation or person"),
            _f("Nationality", "country", "country, ISO 3166-1 alpha-3", optional=True),
            _f("PassportNumber", "code", "passport number of a person", optional=True),
            _f("Organisation", "text", "sending or host organisation", optional=True),
            _f("Activity", "text", "programme, project, conference or assignment"),
            _f("Location", "text", "where the activity takes place", optional=True),
            _f("StartDate", "date", "first day of the activity"),
            _f("EndDate", "date", "last day of the activity", optional=True),
            _f("ForeignMembers", "count", "number of foreigners taking part", optional=True),
        ),
    ),
    Category(
        "work-permit",
        "8.2.c",
        "Người nước ngoài được cấp giấy phép lao động, xác nhận miễn giấy phép lao động",
        "Work permits and work-permit exemptions granted to foreigners",
        "Department of Labour, Invalids and Social Affairs to the City Police, the Departments of "
        "Industry and Trade, Health, Education, Culture and Sports, Tourism, Science and "
        "Technology, the City Tax Department and the district People's Committees",
        "WorkPermit",
        (
            *_person(),
            _e(
                "Decision",
                "issued reissued extended exemption-confirmed revoked",
                "what was decided",
            ),
            _f("PermitNumber", "code", "number of the permit or exemption confirmation"),
            _f("IssuedOn", "date", "date of the decision"),
            _f("ValidFrom", "date", "first day of validity"),
            _f("ValidUntil", "date", "last day of validity"),
            _f("Position", "text", "job title"),
            _f("Employer", "text", "employing organisation"),
            _f("EmployerTaxCode", "code", "employer's tax code", optional=True),
            _f("WorkplaceAddress", "text", "address of the workplace"),
        ),
    ),
    Category(
        "industrial-zone",
        "8.2.d",
        "Doanh nghiệp, lao động, người nước ngoài tạm trú tại khu công nghiệp và chế xuất",
        "Industrial-zone enterprises, work permits and foreign residents",
        "Hanoi Industrial and Export Processing Zones Board to the City Police, the Departments "
        "of Labour, Planning and Investment, Science and Technology, the City Tax Department and "
        "the district People's Committees",
        "IndustrialZoneEntry",
        (
            _e("Kind", "enterprise work-permit permit-exemption resident", "kind of entry"),
            _f("ZoneName", "text", "industrial or export-processing zone"),
            _f("EnterpriseCode", "code", "enterprise code", optional=True),
            _f("EnterpriseName", "text", "enterprise concerned"),
            _e(
                "Event",
                "established amended revoked dissolved issued extended declared",
                "what happened",
            ),
            _f("EventDate", "date", "date of the event"),
            _f("FullName", "text", "foreigner's full name", optional=True),
            _f("Nationality", "country", "foreigner's nationality", optional=True),
            _f("PassportNumber", "code", "foreigner's passport number", optional=True),
            _f("PermitNumber", "code", "work-permit or exemption number", optional=True),
            _f("ValidUntil", "date", "last day of validity", optional=True),
            _f("Address", "text", "address in the zone", optional=True),
        ),
    ),
    Category(
        "trader-office",
        "8.2.đ",
        "Văn phòng đại diện, chi nhánh của thương nhân nước ngoài; cụm công nghiệp",
        "Representative offices and branches of foreign traders; industrial clusters",
        "Department of Industry and Trade to the City Police, the Department of Labour, the City "
        "Tax Department and the district People's Committees",
        "TraderOffice",
        (
            _e("Kind", "representative-office branch industrial-cluster", "kind of establishment"),
            _f("LicenceNumber", "code", "licence number"),
            _f("Name", "text", "name of the office, branch or cluster"),
            _f("ParentTrader", "text", "foreign trader it belongs to"),
            _f("ParentCountry", "country", "trader's country, ISO 3166-1 alpha-3"),
            _e("Event", "established adjusted reissued extended revoked", "what happened"),
            _f("EventDate", "date", "date of the licence decision"),
            _f("ValidUntil", "date", "licence expiry", optional=True),
            _f("Address", "text", "address"),
            _f("HeadFullName", "text", "head of the office", optional=True),
            _f("HeadNationality", "country", "nationality of the head", optional=True),
            _f("HeadPassportNumber", "code", "passport number of the head", optional=True),
        ),
    ),
    Category(
        "judicial-civil",
        "8.2.e",
        "Lý lịch tư pháp, quốc tịch, kết hôn, con nuôi có yếu tố nước ngoài",
        "Judicial records, nationality, marriage and adoption with foreign elements",
        "Department of Justice to the City Police, the Department of Labour and the Industrial "
        "Zones Board",
        "CivilStatusEntry",
        (
            _e("Kind", "judicial-record nationality marriage adoption", "kind of file"),
            *_person(optional_birth=True),
            _f("RecordNumber", "code", "number of the record or decision"),
            _f("DecidedOn", "date", "date of issue or decision"),
            _f("Outcome", "text", "result, e.g. granted, refused", optional=True),
            _f("Counterpart", "text", "spouse or adopted child", optional=True),
            _f(
                "CounterpartNationality", "country", "nationality of the counterpart", optional=True
            ),
        ),
    ),
    Category(
        "licence",
        "8.2.f",
        "Giấy phép ngành nghề có điều kiện, giấy phép lái xe, nhà thầu",
        "Licences for conditional business lines, driving licences and contractors",
        "Departments of Health, Education, Culture and Sports, Tourism, Science and Technology, "
        "Transport and Construction to the City Police, the Departments of Labour and of "
        "Planning and Investment and the district People's Committees",
        "Licence",
        (
            _e(
                "Kind",
                "conditional-business driving-licence contractor foreign-worker",
                "kind of licence",
            ),
            _f("HolderName", "text", "organisation or person holding it"),
            _f("HolderNationality", "country", "holder's nationality", optional=True),
            _f("PassportNumber", "code", "holder's passport number", optional=True),
            _f("LicenceNumber", "code", "licence number"),
            _f("LicenceClass", "text", "class or business line licensed", optional=True),
            _e("Event", "issued extended revoked", "what happened"),
            _f("IssuedOn", "date", "date of the decision"),
            _f("ValidUntil", "date", "licence expiry", optional=True),
            _f("Issuer", "text", "department that decided"),
            _f("Address", "text", "address of the holder or site", optional=True),
        ),
    ),
    Category(
        "tax",
        "8.2.g",
        "Ngừng kinh doanh không thông báo, nợ thuế, trốn thuế có yếu tố nước ngoài",
        "Foreign-element taxpayers: business stopped without notice, tax debts, tax evasion",
        "City Tax Department to the City Police, the Departments of Planning and Investment, "
        "Labour, Industry and Trade, Health, Education, Culture and Sports, Tourism and the "
        "district People's Committees",
        "TaxCase",
        (
            _e("Kind", "stopped-without-notice tax-debt tax-evasion", "kind of case"),
            _f("TaxCode", "code", "taxpayer's tax code"),
            _f("Name", "text", "taxpayer"),
            _f("Nationality", "country", "taxpayer's country", optional=True),
            _f("Address", "text", "registered address", optional=True),
            _f("Amount", "amount", "amount owed or evaded", optional=True),
            _f("Currency", "currency", "currency of the amount", optional=True),
            _f("AsOf", "date", "date the situation was established"),
            _f("Note", "text", "remarks", optional=True),
        ),
    ),
    Category(
        "bank-transaction",
        "8.2.h",
        "Giao dịch chuyển tiền nghi vấn, nợ xấu của tổ chức, cá nhân nước ngoài",
        "Suspicious transfers and bad debts of foreign organisations and persons",
        "State Bank of Vietnam, Hanoi branch, to the City Police",
        "BankCase",
        (
            _e("Kind", "suspicious-transfer bad-debt", "kind of case"),
            _e(
                "Suspicion",
                "terrorism-financing money-laundering transnational-crime other",
                "what a transfer is suspected of",
                optional=True,
            ),
            _f("CustomerName", "text", "organisation or person"),
            _f("CustomerNationality", "country", "customer's country", optional=True),
            _f("IdentityNumber", "code", "passport or registration number", optional=True),
            _f("Bank", "text", "reporting credit institution"),
            _f("TransactionDate", "date", "date of the transfer or of the debt", optional=True),
            _f("Amount", "amount", "amount"),
            _f("Currency", "currency", "currency, ISO 4217"),
            _f("Note", "text", "remarks", optional=True),
        ),
    ),
    Category(
        "local-activity",
        "8.2.i",
        "Tổ chức, cá nhân có yếu tố nước ngoài hoạt động thực tế tại địa phương",
        "Foreign-element organisations and persons actually active in the district",
        "District People's Committees to the city departments",
        "LocalActivity",
        (
            _e("Kind", "organisation individual", "organisation or individual"),
            _f("Name", "text", "name"),
            _f("Nationality", "country", "country, ISO 3166-1 alpha-3", optional=True),
            _f("PassportNumber", "code", "passport number of a person", optional=True),
            _f("Activity", "text", "what is done locally"),
            _f("Address", "text", "where"),
            _f("District", "text", "urban or rural district"),
            _f("ObservedFrom", "date", "first day observed"),
            _f("ObservedUntil", "date", "last day observed", optional=True),
            _f("Note", "text", "remarks", optional=True),
        ),
    ),
    Category(
        "document",
        None,
        "Công văn",
        "Official letter (with attachments)",
        "Any body to any body",
        "Letter",
        (
            _f("DocumentType", "text", "kind of document, e.g. Công văn, Báo cáo"),
            _f("Summary", "text", "summary of the content"),
            _f("PageCount", "count", "number of pages", optional=True),
        ),
        min_records=1,
        max_records=1,
    ),
    Category(
        "request",
        None,
        "Yêu cầu cung cấp thông tin đột xuất",
        "Ad-hoc request for information or opinion (with a deadline)",
        "Any body to any body (QĐ 18/2017 Điều 8.4.a: 'hoặc khi có yêu cầu đột xuất')",
        "InformationRequest",
        (
            _f("Topic", "text", "what the request is about"),
            _f(
                "RequestedCategory",
                "code",
                "category code of the information wanted",
                optional=True,
            ),
            _f("Question", "text", "the information or opinion asked for"),
        ),
        min_records=1,
        max_records=1,
    ),
    Category(
        "reply",
        None,
        "Trả lời yêu cầu",
        "Reply to a request",
        "The body asked, to the body that asked",
        "Answer",
        (
            _e("Outcome", "provided partial not-held declined", "how the request was met"),
            _f("Text", "text", "the answer"),
        ),
        min_records=1,
        max_records=1,
    ),
    Category(
        "status",
        None,
        "Thông báo tình trạng (biên nhận)",
        "Status receipt",
        "The receiving gateway, to the sender",
        "Status",
        (
            _e(
                "StatusCode",
                "01 02 03 04 05 06 90",
                "edXML status: 01 arrived, 02 rejected, 03 accepted, 04 assigned, 05 in progress, "
                "06 completed; 90 deemed consent (ours)",
            ),
            _f("Description", "text", "what happened, in words"),
            _f("Timestamp", "datetime", "when it happened, with offset"),
            _f("ReceivedDigest", "sha256", "SHA-256 of the payload received"),
            _f("ArchiveSequence", "count", "archive sequence number", optional=True),
        ),
        min_records=1,
        max_records=1,
    ),
)

#: Status code of our own: no answer within the deadline counts as consent.
STATUS_DEEMED_CONSENT: Final = "90"

CATEGORIES: Mapping[str, Category] = MappingProxyType({c.code: c for c in _ALL})


def get_category(code: str) -> Category:
    """The category for ``code``; ``KeyError`` with the known codes otherwise."""
    try:
        return CATEGORIES[code]
    except KeyError:
        raise KeyError(
            f"unknown category {code!r}; known categories: {', '.join(CATEGORIES)}"
        ) from None
