"""The specifics of a payload fault in Vietnamese, for the clerk who corrects it (pure).

A receipt that rejects a payload says what is wrong in Vietnamese first, then in English. The
category of the fault (``reason_vi`` of :mod:`formats.errors`) is always Vietnamese; the
specifics (which element, on which line, which value, what the rule is) are too for the faults
a clerk fixes by hand, the payload's fields: the XSD's findings, read from libxml2's English
(:func:`schema_problem`), the XML parser's commonest complaints (:func:`parse_problem`), and the
rules the gateway checks itself (:mod:`formats.payload_rules`, which words each of its own).
Element names stay as written, and so do values, shortened to :data:`SHOWN` characters with
line breaks made visible: they are what the clerk looks for in the file.

A message with no wording here gets none (``None``): the receipt then quotes the English.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final

#: Characters of a quoted value shown (the rest is "…"): the explanation after it must fit in
#: the receipt's share for the reason.
SHOWN: Final = 60

#: What a value of each of the payload's types looks like, by type name in lower case: XSD's
#: built-in ones, the envelope's own (envelope-v1.xsd: Date, Count …), which are also the field
#: kinds of :mod:`formats.categories`.
_LOOKS: Final = {
    "date": "ngày viết dạng NNNN-TT-NN, ví dụ 2026-10-15",
    "datetime": "thời điểm viết dạng NNNN-TT-NNTgg:pp:ss+07:00, ví dụ 2026-10-15T08:30:00+07:00",
    "gyearmonth": "tháng viết dạng NNNN-TT, ví dụ 2026-10",
    "integer": "số nguyên, chỉ gồm chữ số",
    "nonnegativeinteger": "số nguyên không âm, chỉ gồm chữ số",
    "positiveinteger": "số nguyên dương, chỉ gồm chữ số",
    "decimal": "số, phần thập phân sau dấu chấm",
    "text": "1–2000 ký tự, không có khoảng trắng ở đầu và cuối",
    "code": "1–64 ký tự, không có khoảng trắng",
    "country": "mã quốc gia ISO 3166-1 gồm 3 chữ cái in hoa, ví dụ KOR",
    "currency": "mã tiền tệ ISO 4217 gồm 3 chữ cái in hoa, ví dụ VND",
    "count": "số nguyên không âm, chỉ gồm chữ số, tối đa 18 chữ số",
    "amount": "số, phần thập phân (tối đa 6 chữ số) sau dấu chấm, ví dụ 1500.50",
    "sha256": "64 chữ số hệ mười sáu viết thường (SHA-256)",
}

#: The envelope's patterns (envelope-v1.xsd), as libxml2 quotes them, and what they ask for.
#: (tests/test_wording_vi.py checks that every pattern of the packaged XSDs is here.)
PATTERNS: Final = {
    r"[^ \t\n\r]([\s\S]*[^ \t\n\r])?": "nội dung không để trống, không có khoảng trắng ở đầu "
    "và cuối",
    r"[^ \t\n\r]{1,64}": _LOOKS["code"],
    r"[A-Z]{3}": "3 chữ cái in hoa: mã quốc gia (ví dụ KOR) hoặc mã tiền tệ (ví dụ VND)",
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}": _LOOKS["date"],
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"(Z|[+\-][0-9]{2}:[0-9]{2})": _LOOKS["datetime"],
    r"[0-9]{1,18}": _LOOKS["count"],
    r"-?[0-9]{1,20}(\.[0-9]{1,6})?": _LOOKS["amount"],
    r"[0-9a-f]{64}": _LOOKS["sha256"],
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}": "mã UUID viết thường, "
    "dạng xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
    r"1\.[0-9]{1,3}": "phiên bản dạng 1.0",
    r"[0-9A-Za-z][0-9A-Za-z.\-]{0,31}": "mã cơ quan gồm chữ, số, dấu chấm và gạch ngang, tối "
    "đa 32 ký tự, ví dụ 000.00.00.H26",
    r"[^@ \t\n\r<>,;]+@[^@ \t\n\r<>,;]+": "một địa chỉ thư điện tử, dạng ten@ten-mien",
    r"[0-9A-Za-z][0-9A-Za-z.\-]{0,31},[0-9]{4}/[0-9]{2}/[0-9]{2},[0-9]{1,18}/[^,/ \t\n\r]"
    r"[^, \t\n\r]{0,63}": "mã văn bản dạng MãCơQuan,NNNN/TT/NN,số/ký hiệu, ví dụ "
    "000.00.00.H26,2024/03/16,15/CAHN-PA08",
    r"[a-z][a-z0-9\-]{0,39}": "mã loại thông tin viết thường, ví dụ work-permit",
    r"[^/\\:\t\n\r]{1,255}": "tên tệp 1–255 ký tự, không có / \\ : hay dấu xuống dòng",
    r"[a-z0-9][a-z0-9!#$&^_.+\-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+\-]{0,63}": "kiểu tệp dạng "
    "loại/kiểu viết thường, ví dụ application/pdf",
}


def shown(value: str) -> str:
    """``value`` quoted for a clerk: line breaks and tabs made visible, at most :data:`SHOWN`
    characters."""
    text = value.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    if len(text) > SHOWN:
        text = text[: SHOWN - 1] + "…"
    return f"'{text}'"


def not_value(name: str, text: str, kind: str, choices: Sequence[str] = ()) -> str:
    """Field ``name``'s value ``text`` is not one of its ``kind``."""
    wanted = "một trong: " + ", ".join(choices) if choices else _LOOKS.get(kind, "đúng khuôn dạng")
    return f"{name}: giá trị {shown(text)} không hợp lệ; cần {wanted}"


def not_document_id(name: str, text: str) -> str:
    """``text`` in ``name`` is no edXML DocumentId."""
    return (
        f"{name}: giá trị {shown(text)} không phải mã văn bản dạng MãCơQuan,NNNN/TT/NN,số/ký "
        "hiệu với ngày có thật, ví dụ 000.00.00.H26,2024/03/16,15/CAHN-PA08"
    )


def where(line: int, column: int) -> str:
    """A place in the payload file, as the English ``line L, column C``."""
    return f"dòng {line}, cột {column}"


def _type(m: re.Match[str]) -> str:
    name = m["type"].rpartition(":")[2]
    looks = _LOOKS.get(name.lower())
    hint = f" (cần {looks})" if looks else ""
    return f"giá trị {shown(m['value'])} không đúng kiểu dữ liệu {name}{hint}"


def _pattern(m: re.Match[str]) -> str:
    asked = PATTERNS.get(m["pattern"])
    wanted = f"cần {asked}" if asked else f"mẫu {m['pattern']}"
    if not m["value"]:
        return f"không được để trống; {wanted}"
    return f"giá trị {shown(m['value'])} không đúng khuôn dạng; {wanted}"


_Wording = Callable[[re.Match[str]], str]
#: libxml2 lists at most this many names after "Expected is one of" (xmlschemas.c).
_LISTED = 10


def _candidates(m: re.Match[str]) -> str:
    """libxml2's "Expected is one of ( … )": what may come there (optional ones included, at
    most ten), not what must."""
    names = m["x"]
    more = " …" if len(names.split(", ")) >= _LISTED else ""
    return f"{names}{more}"


#: libxml2's schema messages (Clark namespaces already removed) after "Element 'NAME': ".
_PROBLEMS: Final[tuple[tuple[re.Pattern[str], _Wording], ...]] = tuple(
    (re.compile(pattern, re.DOTALL), wording)
    for pattern, wording in (
        (
            r"This element is not expected\. Expected is one of \( (?P<x>.+) \)\.",
            lambda m: f"không được phép ở vị trí này; ở đây chỉ có thể là: {_candidates(m)}",
        ),
        (
            r"This element is not expected\. Expected is \( (?P<x>.+) \)\.",
            lambda m: f"không được phép ở vị trí này; ở đây cần phần tử {m['x']}",
        ),
        (r"This element is not expected\.", lambda m: "không được phép ở vị trí này"),
        (
            r"Missing child element\(s\)\. Expected is one of \( (?P<x>.+) \)\.",
            lambda m: f"thiếu phần tử con bắt buộc; tiếp theo có thể là: {_candidates(m)}",
        ),
        (
            r"Missing child element\(s\)\. Expected is \( (?P<x>.+) \)\.",
            lambda m: f"thiếu phần tử con {m['x']}",
        ),
        (
            r"\[facet 'enumeration'\] The value '(?P<value>.*)' is not an element of the set "
            r"\{(?P<set>.*)\}\.",
            lambda m: f"giá trị {shown(m['value'])} không thuộc các giá trị được phép: {m['set']}",
        ),
        (
            r"\[facet 'pattern'\] The value '(?P<value>.*)' is not accepted by the pattern "
            r"'(?P<pattern>.*)'\.",
            _pattern,
        ),
        (
            r"\[facet 'maxLength'\] The value has a length of '(?P<n>\d+)'; this "
            r"exceeds the allowed maximum length of '(?P<most>\d+)'\.",
            lambda m: f"dài {m['n']} ký tự, quá mức tối đa {m['most']} ký tự",
        ),
        (
            r"\[facet 'minLength'\] The value has a length of '(?P<n>\d+)'; this "
            r"underruns the allowed minimum length of '(?P<least>\d+)'\.",
            lambda m: f"dài {m['n']} ký tự, chưa đủ mức tối thiểu {m['least']} ký tự",
        ),
        (
            r"\[facet 'minInclusive'\] The value '(?P<value>.*)' is less than the minimum value "
            r"allowed \('(?P<least>.*)'\)\.",
            lambda m: f"giá trị {shown(m['value'])} nhỏ hơn mức tối thiểu {m['least']}",
        ),
        (
            r"\[facet 'maxInclusive'\] The value '(?P<value>.*)' is greater than the maximum "
            r"value allowed \('(?P<most>.*)'\)\.",
            lambda m: f"giá trị {shown(m['value'])} lớn hơn mức tối đa {m['most']}",
        ),
        (r"'(?P<value>.*)' is not a valid value of the atomic type '(?P<type>[^']+)'\.", _type),
        (
            r"'(?P<value>.*)' is not a valid value of the (?:local )?(?:atomic|list|union) type\.",
            lambda m: f"giá trị {shown(m['value'])} không đúng kiểu dữ liệu quy định",
        ),
        (
            r"Character content other than whitespace is not allowed because the content type "
            r"is 'element-only'\.",
            lambda m: "chỉ được chứa các phần tử con, không được chứa nội dung chữ",
        ),
        (
            r"Element content is not allowed, because the (?:content type is a simple type "
            r"definition|type definition is simple)\.",
            lambda m: "chỉ được chứa giá trị, không được chứa phần tử con",
        ),
        (
            r"The attribute '(?P<attribute>[^']+)' is not allowed\.",
            lambda m: f"không được có thuộc tính {m['attribute']}",
        ),
        (
            r"The attribute '(?P<attribute>[^']+)' is required but missing\.",
            lambda m: f"thiếu thuộc tính bắt buộc {m['attribute']}",
        ),
        (
            r"No matching global declaration available for the validation root\.",
            lambda m: "không phải phần tử gốc của dữ liệu (cần Payload)",
        ),
        # A facet's message cut inside a huge value (libxml2 stops at about 64 KB): the facet
        # is known, the rest of what it says is lost.
        (
            r"\[facet '(?P<facet>[^']+)'\] The value '(?P<value>.*)",
            lambda m: (
                f"giá trị {shown(m['value'])} không hợp lệ (ràng buộc {m['facet']}; giá trị "
                "quá dài để nói rõ hơn)"
            ),
        ),
    )
)

_ELEMENT: Final = re.compile(r"Element '(?P<name>[^']+)'(?:, attribute '(?P<attr>[^']+)')?: ")


def schema_problem(message: str) -> str | None:
    """libxml2's schema ``message`` (``Element 'X': …``) in Vietnamese, or ``None``."""
    head = _ELEMENT.match(message)
    if head is None:
        return None
    rest = message[head.end() :].strip()
    for pattern, wording in _PROBLEMS:
        found = pattern.fullmatch(rest)
        if found is not None:
            subject = f"phần tử {head['name']}"
            if head["attr"] and "attribute" not in found.groupdict():  # (not named in it)
                subject += f", thuộc tính {head['attr']}"
            return f"{subject}: {wording(found)}"
    return None


#: libxml2's commonest complaints about XML that is not well-formed, and what to do.
_PARSE: Final[tuple[tuple[re.Pattern[str], _Wording], ...]] = tuple(
    (re.compile(pattern), wording)
    for pattern, wording in (
        (
            r"xmlParseEntityRef: no name",
            lambda m: "ký tự & đứng một mình; trong nội dung hãy viết nó là &amp;",
        ),
        (
            r"Entity '(?P<name>[^']+)' not defined",
            lambda m: f"dùng thực thể &{m['name']};",
        ),
        (
            r"Opening and ending tag mismatch: (?P<open>\S+) line (?P<line>\d+) and (?P<end>\S+)",
            lambda m: (
                f"thẻ mở <{m['open']}> ở dòng {m['line']} không khớp với thẻ đóng </{m['end']}>"
            ),
        ),
        (
            r"Premature end of data in tag (?P<tag>\S+) line (?P<line>\d+)",
            lambda m: f"dữ liệu kết thúc khi thẻ <{m['tag']}> mở ở dòng {m['line']} chưa đóng",
        ),
        (
            r"StartTag: invalid element name",
            lambda m: "tên phần tử không hợp lệ; trong nội dung, ký tự < phải viết là &lt;",
        ),
        (
            r"Extra content at the end of the document",
            lambda m: "có nội dung sau khi phần tử gốc đã đóng",
        ),
        (
            r"Start tag expected, '<' not found",
            lambda m: "không tìm thấy phần tử gốc (dữ liệu không phải XML)",
        ),
        (
            r"Document is empty",
            lambda m: "dữ liệu XML rỗng",
        ),
    )
)


def parse_problem(text: str) -> str | None:
    """The XML parser's complaint ``text`` (libxml2's English) in Vietnamese, or ``None``."""
    for pattern, wording in _PARSE:
        found = pattern.match(text)
        if found is not None:
            return wording(found)
    return None
