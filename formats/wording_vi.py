"""The specifics of a payload fault in Vietnamese, for the clerk who corrects it (pure).

A receipt that rejects a payload says what is wrong in Vietnamese first, then in English. The
category of the fault (``reason_vi`` of :mod:`formats.errors`) is always Vietnamese; the
specifics (which element, on which line, which value, what the rule is) are too for the faults
a clerk fixes by hand, the payload's fields: the XSD's findings, read from libxml2's English
(:func:`schema_problem`), and the rules the gateway checks itself (:mod:`formats.payload_rules`,
which words each of its own). Element names, values and patterns stay as written: they are
what the clerk looks for in the file.

A libxml2 message with no wording here gets none (``None``): the receipt then quotes the English.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final

#: How a date and a moment are written (xs:date, xs:dateTime), told with a type error.
_WRITTEN: Final = {
    "date": "ngày viết dạng NNNN-TT-NN, ví dụ 2026-10-15",
    "datetime": "thời điểm viết dạng NNNN-TT-NNTgg:pp:ss+07:00, ví dụ 2026-10-15T08:30:00+07:00",
    "gyearmonth": "tháng viết dạng NNNN-TT, ví dụ 2026-10",
    "integer": "số nguyên, chỉ gồm chữ số",
    "nonnegativeinteger": "số nguyên không âm, chỉ gồm chữ số",
    "positiveinteger": "số nguyên dương, chỉ gồm chữ số",
    "decimal": "số, phần thập phân sau dấu chấm",
}


#: What a value of each field kind (:mod:`formats.categories`) looks like.
_KIND: Final = {
    "text": "1–2000 ký tự, không có khoảng trắng ở đầu và cuối",
    "code": "1–64 ký tự, không có khoảng trắng",
    "country": "mã quốc gia ISO 3166-1 gồm 3 chữ cái in hoa, ví dụ KOR",
    "currency": "mã tiền tệ ISO 4217 gồm 3 chữ cái in hoa, ví dụ VND",
    "count": "số nguyên không âm, chỉ gồm chữ số",
    "amount": "số, phần thập phân sau dấu chấm, ví dụ 1500.50",
    "sha256": "64 chữ số hệ mười sáu viết thường (SHA-256)",
    "date": _WRITTEN["date"] + ", không có khoảng trắng",
    "datetime": _WRITTEN["datetime"],
}


def not_value(name: str, text: str, kind: str, choices: Sequence[str] = ()) -> str:
    """Field ``name``'s value ``text`` is not one of its ``kind``."""
    wanted = "một trong: " + ", ".join(choices) if choices else _KIND.get(kind, "đúng khuôn dạng")
    return f"{name}: giá trị {text!r} không hợp lệ; cần {wanted}"


def not_document_id(name: str, text: str) -> str:
    """``text`` in ``name`` is no edXML DocumentId."""
    return (
        f"{name}: giá trị {text!r} không phải mã văn bản dạng MãCơQuan,NNNN/TT/NN,số/ký hiệu "
        "với ngày có thật, ví dụ 000.00.00.H26,2024/03/16,15/CAHN-PA08"
    )


def where(line: int, column: int) -> str:
    """A place in the payload file, as the English ``line L, column C``."""
    return f"dòng {line}, cột {column}"


def _type(m: re.Match[str]) -> str:
    name = m["type"].rpartition(":")[2]
    written = _WRITTEN.get(name.lower())
    hint = f" ({written})" if written else ""
    return f"giá trị '{m['value']}' không đúng kiểu dữ liệu {name}{hint}"


_Wording = Callable[[re.Match[str]], str]

#: libxml2's schema messages (Clark namespaces already removed) after "Element 'NAME': ".
_PROBLEMS: Final[tuple[tuple[re.Pattern[str], _Wording], ...]] = tuple(
    (re.compile(pattern, re.DOTALL), wording)
    for pattern, wording in (
        (
            r"This element is not expected\. Expected is one of \( (?P<x>.+) \)\.",
            lambda m: f"không được phép ở vị trí này; tại đây cần một trong: {m['x']}",
        ),
        (
            r"This element is not expected\. Expected is \( (?P<x>.+) \)\.",
            lambda m: f"không được phép ở vị trí này; tại đây cần phần tử {m['x']}",
        ),
        (r"This element is not expected\.", lambda m: "không được phép ở vị trí này"),
        (
            r"Missing child element\(s\)\. Expected is one of \( (?P<x>.+) \)\.",
            lambda m: f"thiếu phần tử con; cần một trong: {m['x']}",
        ),
        (
            r"Missing child element\(s\)\. Expected is \( (?P<x>.+) \)\.",
            lambda m: f"thiếu phần tử con {m['x']}",
        ),
        (
            r"\[facet 'enumeration'\] The value '(?P<value>.*)' is not an element of the set "
            r"\{(?P<set>.*)\}\.",
            lambda m: f"giá trị '{m['value']}' không thuộc các giá trị được phép: {m['set']}",
        ),
        (
            r"\[facet 'pattern'\] The value '(?P<value>.*)' is not accepted by the pattern "
            r"'(?P<pattern>.*)'\.",
            lambda m: (
                f"giá trị '{m['value']}' không đúng khuôn dạng quy định (mẫu {m['pattern']})"
                if m["value"]
                else f"không được để trống (mẫu {m['pattern']})"
            ),
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
            lambda m: f"giá trị '{m['value']}' nhỏ hơn mức tối thiểu {m['least']}",
        ),
        (
            r"\[facet 'maxInclusive'\] The value '(?P<value>.*)' is greater than the maximum "
            r"value allowed \('(?P<most>.*)'\)\.",
            lambda m: f"giá trị '{m['value']}' lớn hơn mức tối đa {m['most']}",
        ),
        (r"'(?P<value>.*)' is not a valid value of the atomic type '(?P<type>[^']+)'\.", _type),
        (
            r"'(?P<value>.*)' is not a valid value of the (?:local )?(?:atomic|list|union) type\.",
            lambda m: f"giá trị '{m['value']}' không đúng kiểu dữ liệu quy định",
        ),
        (
            r"Character content other than whitespace is not allowed because the content type "
            r"is 'element-only'\.",
            lambda m: "chỉ được chứa các phần tử con, không được chứa văn bản",
        ),
        (
            r"Element content is not allowed, because the (?:content type is a simple type "
            r"definition|type definition is simple)\.",
            lambda m: "chỉ được chứa giá trị, không được chứa phần tử con",
        ),
        (
            r"The attribute '(?P<attr>[^']+)' is not allowed\.",
            lambda m: f"không được có thuộc tính {m['attr']}",
        ),
        (
            r"The attribute '(?P<attr>[^']+)' is required but missing\.",
            lambda m: f"thiếu thuộc tính bắt buộc {m['attr']}",
        ),
        (
            r"No matching global declaration available for the validation root\.",
            lambda m: "không phải phần tử gốc của dữ liệu (cần Payload)",
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
            said = wording(found)
            subject = f"phần tử {head['name']}"
            if head["attr"] and head["attr"] not in said:
                subject += f", thuộc tính {head['attr']}"
            return f"{subject}: {said}"
    return None
