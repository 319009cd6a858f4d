"""The streaming read of a payload: bounded trees, and the values and errors of the tree path.

``Payload.from_xml`` reads a valid payload over ``WHOLE_TREE_BYTES`` with
:mod:`formats.payload_stream` and falls back to the whole tree only to explain what is wrong.
Here every payload is over it (:func:`stream_always`). These tests hold the stream to three
promises: a valid payload never builds the whole tree, the trees hold a chunk's records at
most, and no input is accepted, or refused differently, than by the tree path
(``Payload._from_tree``). The last two tests check the choice of road itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from formats import payload as payload_module
from formats import payload_stream
from formats.categories import CATEGORIES
from formats.errors import GatewayError, LimitExceeded, SchemaInvalid, XmlForbidden, XmlMalformed
from formats.limits import DEFAULT_LIMITS, Limits
from formats.payload import WHOLE_TREE_BYTES as DEFAULT_THRESHOLD
from formats.payload import Payload, Record
from formats.payload_stream import CHUNK, PAYLOAD_DEPTH, read_stream
from formats.payload_xml import Parts
from tests.payload_samples import sample_payload, sample_values

WORK_PERMIT = CATEGORIES["work-permit"]
#: Records in the "big" payload: enough for hundreds of chunks, quick to build.
N = 3000


def permits(n: int) -> Payload:
    """A valid work-permit payload of ``n`` distinct people."""
    base = sample_payload("work-permit")
    records = tuple(
        Record.of(
            WORK_PERMIT,
            sample_values(WORK_PERMIT)
            | {
                "FullName": f"Nguyễn Văn {i}",
                "PassportNumber": f"P{i:08d}",
                "PermitNumber": f"HN-{i}",
            },
        )
        for i in range(n)
    )
    return Payload(base.header, base.exchange, records)


@pytest.fixture(scope="module")
def big() -> tuple[Payload, bytes]:
    payload = permits(N)
    return payload, payload.to_xml()


@pytest.fixture(autouse=True)
def stream_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every payload is too big for the whole tree: ``Payload.from_xml`` streams."""
    monkeypatch.setattr(payload_module, "WHOLE_TREE_BYTES", 0)


def _no_tree(data: bytes, **_: object) -> etree._Element:
    raise AssertionError("the whole tree was built for a valid payload")


@pytest.fixture
def no_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the tree path unusable: only the stream can answer."""
    monkeypatch.setattr(payload_module, "parse_xml", _no_tree)


def outcome(data: bytes, *, tree: bool = False) -> tuple[str, object]:
    try:
        read = Payload._from_tree(data, DEFAULT_LIMITS) if tree else Payload.from_xml(data)
    except GatewayError as err:
        return (type(err).__name__, (err.message, err.detail))
    return ("accepted", read)


def position(data: bytes, at: int) -> tuple[int, int]:
    return data.count(b"\n", 0, at) + 1, at - (data.rfind(b"\n", 0, at) + 1) + 1


# --- the happy path streams, in bounded memory ------------------------------------------------


@pytest.mark.usefixtures("no_tree")
def test_big_payload_round_trips_without_the_tree(big: tuple[Payload, bytes]) -> None:
    payload, xml = big
    again = Payload.from_xml(xml)
    assert again == payload
    assert len(again.records) == N
    assert again.records[-1]["FullName"] == f"Nguyễn Văn {N - 1}"


@pytest.mark.usefixtures("no_tree")
@pytest.mark.parametrize("code", list(CATEGORIES))
def test_every_category_streams(code: str) -> None:
    payload = sample_payload(code)
    assert Payload.from_xml(payload.to_xml()) == payload


def test_trees_hold_one_chunk_of_records(big: tuple[Payload, bytes]) -> None:
    payload, xml = big
    live: list[int] = []
    parts = read_stream(xml, limits=DEFAULT_LIMITS, observe=lambda body: live.append(len(body)))
    assert Payload(*parts) == payload
    assert len(live) == 2 * N  # every record pruned from the reader's tree and the validator's
    per_chunk = CHUNK // (len(xml) // N) + 3
    assert max(live) <= per_chunk
    assert per_chunk < N // 50  # independent of the number of records


def test_chunk_boundaries_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    # 7-byte chunks split tags, text, character references and UTF-8 sequences.
    monkeypatch.setattr(payload_stream, "CHUNK", 7)
    payload = permits(30)
    xml = payload.to_xml().replace(b"</WorkPermit>", b"</WorkPermit><!-- between -->")
    live: list[int] = []
    parts = read_stream(xml, limits=DEFAULT_LIMITS, observe=lambda body: live.append(len(body)))
    assert Payload(*parts) == payload
    assert max(live) <= 2


@pytest.mark.usefixtures("no_tree")
def test_comments_cdata_and_prefixes_stream() -> None:
    payload = sample_payload("tax")
    xml = payload.to_xml()
    xml = xml.replace(b"<Body>", b"<Body><!-- records follow -->")
    xml = xml.replace(b"<Nationality>KOR</Nationality>", b"<Nationality>K<!--x-->OR</Nationality>")
    xml = xml.replace(b"<PassportNumber>B1234567<", b"<PassportNumber><![CDATA[B1234567]]><")
    prefixed = xml.replace(b'xmlns="urn:', b'xmlns:p="urn:')
    prefixed = re.sub(rb"<(/?)(?=[A-Za-z])", rb"<\1p:", prefixed)
    assert Payload.from_xml(xml) == payload
    assert Payload.from_xml(prefixed) == payload


# --- errors: the tree path's, located ---------------------------------------------------------


def test_late_schema_error_in_a_big_payload_is_located() -> None:
    xml = permits(4200).to_xml()
    assert xml.count(b"\n") > 65535  # beyond 16-bit line numbers
    at = xml.rindex(b"<Sex>M</Sex>")
    bad = xml[:at] + b"<Sex>Q</Sex>" + xml[at + 12 :]
    with pytest.raises(SchemaInvalid) as caught:
        Payload.from_xml(bad)
    line, column = position(bad, at)
    assert str(caught.value).startswith(f"line {line}, column {column}: Element 'Sex'")


def test_late_field_error_in_a_big_payload_is_located(big: tuple[Payload, bytes]) -> None:
    _, xml = big
    # xs:date collapses whitespace, Field.parse does not: only the record reader refuses it.
    at = xml.rindex(b"<ValidUntil>")
    end = xml.index(b"</ValidUntil>", at)
    bad = xml[:end] + b"\n" + xml[end:]
    with pytest.raises(SchemaInvalid) as caught:
        Payload.from_xml(bad)
    line, column = position(bad, at)
    assert str(caught.value).startswith(f"line {line}, column {column}: ValidUntil: ")


def test_rule_violation_in_a_big_payload_is_located() -> None:
    xml = permits(500).to_xml().replace(b"<Business>0<", b"<Business>3<")
    with pytest.raises(SchemaInvalid, match="requires ReplacesDocumentId") as caught:
        Payload.from_xml(xml)
    line, column = position(xml, xml.index(b"<Business>"))
    assert str(caught.value).startswith(f"line {line}, column {column}: ")


def test_header_date_with_whitespace_is_a_located_schema_error() -> None:
    # Once an uncaught ValueError: the XSD lets it through, date.fromisoformat does not.
    xml = sample_payload("work-permit").to_xml()
    bad = xml.replace(b"<PeriodStart>2024-02-16<", b"<PeriodStart>2024-02-16\n<")
    with pytest.raises(SchemaInvalid, match=r"line \d+, column 5: PeriodStart: .* is not a date"):
        Payload.from_xml(bad)


def _valid() -> bytes:
    return sample_payload("work-permit").to_xml()


#: A valid payload made hostile in one place, and the error the tree path gives it.
HOSTILE = {
    "pi-in-a-record": (_valid().replace(b"<Sex>", b"<?php x?><Sex>", 1), XmlForbidden),
    "pi-after-the-root": (_valid() + b"<?later?>", XmlForbidden),
    "xinclude-in-body": (
        _valid().replace(
            b"<Body>",
            b'<Body><xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="/etc/passwd"/>',
        ),
        XmlForbidden,
    ),
    "doctype": (_valid().replace(b"?>\n", b"?>\n<!DOCTYPE Payload>\n", 1), XmlForbidden),
    "latin-1": (_valid().replace(b"encoding='UTF-8'", b"encoding='ISO-8859-1'"), XmlForbidden),
    "undeclared-entity": (_valid().replace(b"<Sex>F", b"<Sex>&f;", 1), XmlForbidden),
    # With a schema plugged in, lxml takes these three for well-formed; the reader does not.
    "truncated": (_valid()[: _valid().rindex(b"</Body>")], XmlMalformed),
    "empty-namespace-prefix": (
        _valid().replace(b"<Payload ", b'<Payload xmlns:a="" '),
        XmlMalformed,
    ),
    "xml-prefix-rebound": (
        _valid().replace(b"<Payload ", b'<Payload xmlns:xml="urn:x" '),
        XmlMalformed,
    ),
    "another-categorys-records": (
        _valid().replace(b">work-permit<", b">tax<"),
        SchemaInvalid,
    ),
    "record-outside-body": (
        _valid().replace(b"</Exchange>", b"</Exchange><WorkPermit/>"),
        SchemaInvalid,
    ),
    "no-category": (re.sub(rb"<Category>.*</Category>", b"", _valid()), SchemaInvalid),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_edit_gets_the_tree_paths_error(name: str) -> None:
    data, error = HOSTILE[name]
    with pytest.raises(error) as caught:
        Payload.from_xml(data)
    assert type(caught.value) is error
    assert outcome(data) == outcome(data, tree=True)


def test_no_truncation_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payload_stream, "CHUNK", 61)
    xml = _valid()
    end = xml.rindex(b"</Payload>") + len(b"</Payload>")
    for cut in range(0, end, 23):
        with pytest.raises((XmlMalformed, XmlForbidden)):
            Payload.from_xml(xml[:cut])


def test_depth_limit_below_the_payloads_own_depth() -> None:
    xml = _valid()
    Payload.from_xml(xml, limits=Limits(max_xml_depth=PAYLOAD_DEPTH))
    with pytest.raises(LimitExceeded, match="deeper than the limit of 3"):
        Payload.from_xml(xml, limits=Limits(max_xml_depth=PAYLOAD_DEPTH - 1))


XS = "{http://www.w3.org/2001/XMLSchema}"


def _xsd(path: str) -> etree._Element:
    return etree.fromstring(resources.files("formats").joinpath("schemas", path).read_bytes())


def _depth(
    element: etree._Element, types: dict[str, etree._Element], seen: frozenset[str] = frozenset()
) -> int:
    """How deep instances of the declaration ``element`` can nest (itself counted)."""
    named = (element.get("type") or "").removeprefix("p:")
    assert named not in seen, f"{named} is recursive"
    content = types.get(named, element.find(f"{XS}complexType"))
    inner = seen | {named} if named else seen
    return 1 + max((_depth(c, types, inner) for c in _declared(content)), default=0)


def _declared(content: etree._Element | None) -> Iterator[etree._Element]:
    """The element declarations of a content model, not those nested inside them."""
    for child in () if content is None else content.iterchildren(etree.Element):
        if child.tag == f"{XS}element":
            yield child
        else:
            yield from _declared(child)


@pytest.mark.parametrize("code", list(CATEGORIES))
def test_every_xsd_nests_at_most_payload_depth(code: str) -> None:
    # The stream leaves the depth cap to the XSD (plan step 5): prove the XSDs keep it.
    schemas = (_xsd("envelope-v1.xsd"), _xsd(CATEGORIES[code].xsd))
    assert all(s.find(f".//{XS}any") is None for s in schemas)
    types = {str(t.get("name")): t for s in schemas for t in s.iter(f"{XS}complexType")}
    root = schemas[1].find(f"{XS}element[@name='Payload']")
    assert root is not None
    assert _depth(root, types) == PAYLOAD_DEPTH


# --- any edit: the stream and the tree path agree ----------------------------------------------

EDITS = [
    b"<!-- c -->", b"<?pi x?>", b"<!DOCTYPE a>", b"&amp;", b"&foo;", b"<![CDATA[x]]>", b"&#65;",
    b'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="x"/>', b' xmlns:q="urn:x"',
    b"<Category>tax</Category>", b"<Body/>", b"</Body>", b"<Body>", b"<Header/>", b"\n", b" ",
    b"<Sex>M</Sex>", b"<", b">", b"x", b"</Payload>", b'<Payload xmlns="urn:x">', b"\xc3\xa9",
    b"<WorkPermit/>", b"<Attachments/>",
]  # fmt: skip
SEEDS = [sample_payload(code).to_xml() for code in ("work-permit", "status", "document")]


def _edited(seed: int, where: int, edit: bytes, cut: int) -> bytes:
    xml = SEEDS[seed]
    at = where % (len(xml) + 1)
    return xml[:at] + edit + xml[at + cut :]


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, len(SEEDS) - 1),
    where=st.integers(0, 10**6),
    edit=st.sampled_from(EDITS),
    cut=st.integers(0, 40),
)
def test_stream_and_tree_agree_on_any_edit(seed: int, where: int, edit: bytes, cut: int) -> None:
    data = _edited(seed, where, edit, cut)
    assert outcome(data) == outcome(data, tree=True)


# --- which road: the whole tree up to WHOLE_TREE_BYTES, the stream beyond ----------------------


def test_a_payload_up_to_the_threshold_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = permits(40)
    xml = payload.to_xml()
    monkeypatch.setattr(payload_module, "WHOLE_TREE_BYTES", len(xml))

    def refuse(data: bytes, **_: object) -> Parts:
        raise AssertionError("a payload small enough for the whole tree was streamed")

    monkeypatch.setattr(payload_module, "read_stream", refuse)
    assert Payload.from_xml(xml) == payload


def test_a_payload_over_the_threshold_streams(
    monkeypatch: pytest.MonkeyPatch, big: tuple[Payload, bytes]
) -> None:
    payload = permits(40)
    xml = payload.to_xml()
    monkeypatch.setattr(payload_module, "WHOLE_TREE_BYTES", len(xml) - 1)
    monkeypatch.setattr(payload_module, "parse_xml", _no_tree)
    assert Payload.from_xml(xml) == payload
    # By default a payload of tens of KB is read whole, one of 2 MB streams.
    assert len(xml) < DEFAULT_THRESHOLD < len(big[1])
