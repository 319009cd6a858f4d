"""A field's specialised parser (``Field.parser``, used to read records) answers exactly as
``Field.parse``: the same value, or the same ValueError; and a field of a verbatim kind, which the
record reader takes as its text once the XSD has passed it, is one ``Field.parse`` accepts as it
is."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from lxml import etree

from formats.categories import CATEGORIES, KINDS, VERBATIM_KINDS, Category, Field, Value
from formats.xsd import NAMESPACE, load_schema
from tests.payload_samples import sample_payload

FIELDS = [
    Field(f"F{kind}", kind, "m", choices=("A", "B c") if kind == "enum" else ()) for kind in KINDS
]

#: Text near each kind's edges: digits, dashes, colons, offsets, spaces at the ends, characters
#: XML cannot carry, long runs.
_ALPHABET = st.sampled_from(list("0123456789-:T.Z+ ABCabcfKORVND\t\n\x00\x0b\ufffe\u0663é"))
TEXTS = st.one_of(
    st.text(_ALPHABET, max_size=40),
    st.text(max_size=30),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "7", " "]), st.integers(60, 2100)),
)


def answer(parse: object, text: str) -> tuple[str, Value | str]:
    try:
        return "value", parse(text)  # type: ignore[operator]
    except ValueError as err:
        return "error", str(err)


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.kind)
@given(text=TEXTS)
@example(text="2024-02-30")
@example(text="2024-03-16T24:00:00+07:00")
@example(text="2024-03-16T09:30:00+07:00")
@example(text="00012")
@example(text="-1.500000")
@example(text="A")
@example(text="B c")
@example(text="x" * 2001)
@example(text="a\x0bb")
def test_the_specialised_parser_answers_as_parse(field: Field, text: str) -> None:
    fast = answer(field.parser(), text)
    assert fast == answer(field.parse, text)
    assert type(fast[1]) is type(answer(field.parse, text)[1])


def _first_of_kind(kind: str) -> tuple[Category, Field] | None:
    for category in CATEGORIES.values():
        for field in category.fields:
            if field.kind == kind:
                return category, field
    return None  # no category has such a field (sha256: attachments only)


#: One (category, field) of every verbatim kind a record can have.
VERBATIM = [found for kind in sorted(VERBATIM_KINDS) if (found := _first_of_kind(kind))]


@pytest.mark.parametrize(("category", "field"), VERBATIM, ids=lambda x: getattr(x, "name", ""))
@given(text=TEXTS)
@example(text="KOR")
@example(text=" KOR")
@example(text="a b")
@example(text="x" * 2000)
@example(text="x" * 2001)
def test_what_the_xsd_accepts_in_a_verbatim_field_parse_takes_as_it_is(
    category: Category, field: Field, text: str
) -> None:
    root = etree.fromstring(sample_payload(category.code).to_xml())
    element = root.find(f".//{{{NAMESPACE}}}{field.name}")
    assert element is not None
    try:
        element.text = text
    except ValueError:  # a character XML cannot carry: no payload can hold it
        return
    if load_schema(category.xsd).validate(root):
        assert answer(field.parse, text) == ("value", text)
    else:
        assert answer(field.parse, text)[0] == "error"  # and the other way round
