"""The hardened parser against hostile input: every attack gets its own typed error."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from formats import xmlsafe
from formats.errors import LimitExceeded, PayloadError, XmlForbidden, XmlMalformed
from formats.limits import Limits
from formats.payload import Payload
from formats.xmlsafe import parse_xml
from tests.payload_samples import XML_ASSETS as ASSETS


def asset(name: str) -> bytes:
    return (ASSETS / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("billion-laughs.xml", XmlForbidden),
        ("xxe-file.xml", XmlForbidden),
        ("xxe-network.xml", XmlForbidden),
        ("doctype-only.xml", XmlForbidden),
        ("deep-nesting-300.xml", LimitExceeded),
        ("xinclude.xml", XmlForbidden),
    ],
)
def test_hostile_sample_gets_its_typed_error(name: str, error: type[PayloadError]) -> None:
    with pytest.raises(error) as caught:
        parse_xml(asset(name))
    assert type(caught.value) is error
    # Payload.from_xml refuses it the same way.
    with pytest.raises(error):
        Payload.from_xml(asset(name))


def test_every_hostile_asset_is_documented() -> None:
    readme = (ASSETS / "README.md").read_text(encoding="utf-8")
    for path in ASSETS.glob("*.xml"):
        assert f"`{path.name}`" in readme


@pytest.mark.parametrize("name", ["xxe-file.xml", "xinclude.xml"])
def test_file_content_never_leaks(name: str) -> None:
    with pytest.raises(XmlForbidden) as caught:
        parse_xml(asset(name))
    text = f"{caught.value} {caught.value.detail}"
    assert "root:" not in text
    assert "/bin/" not in text


def test_doctype_refusal_says_where_and_why() -> None:
    with pytest.raises(XmlForbidden, match=r"line 2, column 1: .*DOCTYPE"):
        parse_xml(asset("doctype-only.xml"))


@pytest.mark.parametrize(
    "name", ["billion-laughs.xml", "xxe-file.xml", "xxe-network.xml", "doctype-only.xml"]
)
def test_tree_check_refuses_doctype_without_the_byte_scan(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth: with step 3 (the byte scan) switched off, libxml2 still loads and
    # resolves nothing, and step 5 finds the DOCTYPE in the parsed tree.
    monkeypatch.setattr(xmlsafe, "_refuse_in_bytes", lambda data: None)
    with pytest.raises(XmlForbidden, match=r"DOCTYPE|entit") as caught:
        parse_xml(asset(name))
    assert "root:" not in str(caught.value)


@pytest.mark.parametrize("name", ["billion-laughs.xml", "xxe-file.xml", "xxe-network.xml"])
def test_pull_parser_is_hardened_like_parse_xml(name: str) -> None:
    # The streaming reader gets the byte scan first too; without it, its parser still loads,
    # fetches and expands nothing.
    parser = xmlsafe.pull_parser(events=("end",))
    try:
        parser.feed(asset(name))
        root = parser.close()
    except etree.XMLSyntaxError:
        return
    text = etree.tostring(root)
    assert b"root:" not in text
    assert len(text) < 2 * len(asset(name))


def test_stylesheet_processing_instruction_is_refused() -> None:
    data = b'<?xml version="1.0"?>\n<?xml-stylesheet href="x.xsl"?>\n<a/>'
    with pytest.raises(XmlForbidden, match="processing instruction"):
        parse_xml(data)


def test_entity_reference_without_dtd_is_forbidden() -> None:
    with pytest.raises(XmlForbidden, match=r"line 2, column \d+: .*Entity 'foo' not defined"):
        parse_xml(b"<a>\n<b>&foo;</b></a>")


def test_predefined_and_character_references_are_fine() -> None:
    root = parse_xml(b"<a>&lt;&amp;&#x41;&#66;</a>")
    assert root.text == "<&AB"


def test_bare_ampersand_is_malformed_not_forbidden() -> None:
    with pytest.raises(XmlMalformed):
        parse_xml(b"<a>fish & chips</a>")


def test_not_well_formed_reports_line_and_column() -> None:
    with pytest.raises(XmlMalformed) as caught:
        parse_xml(b"<a>\n  <b></c>\n</a>")
    assert str(caught.value).startswith("line 2, column ")


def test_size_is_checked_before_parsing() -> None:
    limits = Limits(max_xml_bytes=100)
    with pytest.raises(LimitExceeded, match="over the limit of 100"):
        parse_xml(b"<a>" + b"x" * 200 + b"</a>", limits=limits)


def test_our_depth_cap_is_smaller_than_libxml2s() -> None:
    ok = b"<a>" * 32 + b"</a>" * 32
    parse_xml(ok)
    with pytest.raises(LimitExceeded, match="deeper than the limit of 32"):
        parse_xml(b"<a>" * 33 + b"</a>" * 33)
    with pytest.raises(LimitExceeded, match="limit of 3"):
        parse_xml(b"<a><b><c><d/></c></b></a>", limits=Limits(max_xml_depth=3))


def test_twenty_megabyte_text_node_is_refused() -> None:
    data = b"<a>" + b"x" * (20 * 1024 * 1024) + b"</a>"
    with pytest.raises(LimitExceeded, match="10 MB"):
        parse_xml(data)


def test_utf16_is_refused() -> None:
    data = '<?xml version="1.0" encoding="UTF-16"?><a/>'.encode("utf-16")
    with pytest.raises(XmlForbidden, match="UTF-8"):
        parse_xml(data)


def test_declared_non_utf8_encoding_is_refused() -> None:
    with pytest.raises(XmlForbidden, match="ISO-8859-1"):
        parse_xml(b'<?xml version="1.0" encoding="ISO-8859-1"?><a>\xe9</a>')


def test_processing_instruction_inside_is_refused() -> None:
    with pytest.raises(XmlForbidden, match=r"<\?php\?>"):
        parse_xml(b"<a><?php echo 1; ?></a>")


def test_comments_are_kept() -> None:
    root = parse_xml(b"<a><!-- note --><b/></a>")
    assert len(root) == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_a_payload_error(data: bytes) -> None:
    with contextlib.suppress(XmlForbidden, XmlMalformed, LimitExceeded):
        parse_xml(data)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="<>/!?&;=\"' abxDOCTYPEENTITY[]-:\n", max_size=120))
def test_markup_soup_parses_or_raises_a_payload_error(text: str) -> None:
    with contextlib.suppress(XmlForbidden, XmlMalformed, LimitExceeded):
        parse_xml(text.encode("utf-8"))


# --- the tree checks (step 5 and 6) on any shape ----------------------------------------------

#: A tree as nested lists of children; each element goes on a line of its own.
_TREES = st.recursive(st.just([]), lambda kids: st.lists(kids, max_size=3), max_leaves=25)


def _xml(children: list[object], out: list[bytes], starts: list[int], depth: int = 1) -> None:
    """Write the tree one tag a line; ``starts`` gets each start tag's depth, by line."""
    out.append(b"<e>\n")
    starts.append(depth)
    for child in children:
        _xml(child, out, starts, depth + 1)  # type: ignore[arg-type]
    out.append(b"</e>\n")
    starts.append(0)  # an end tag


@settings(max_examples=200, deadline=None)
@given(tree=_TREES, limit=st.integers(1, 8))
def test_depth_cap_refuses_exactly_the_trees_deeper_than_it(tree: list[object], limit: int) -> None:
    out: list[bytes] = []
    starts: list[int] = []
    _xml(tree, out, starts)
    data = b"".join(out)
    expected = next((n for n, depth in enumerate(starts, 1) if depth > limit), None)
    if expected is None:
        assert parse_xml(data, limits=Limits(max_xml_depth=limit)).tag == "e"
    else:
        with pytest.raises(LimitExceeded, match=f"^line {expected}: .* limit of {limit} levels"):
            parse_xml(data, limits=Limits(max_xml_depth=limit))


@pytest.mark.parametrize("namespace", sorted(xmlsafe.XINCLUDE_NAMESPACES))
@pytest.mark.parametrize(
    ("template", "line"),
    [
        (b'<x:include xmlns:x="{ns}" href="a"/>', 1),  # the root itself
        (b'<a>\n<b>\n<c><include xmlns="{ns}" href="a"/></c></b></a>', 3),  # default namespace
        (b'<a xmlns:x="{ns}">\n<b/>\n<x:fallback/>\n<x:include href="a"/></a>', 3),  # the first
    ],
)
def test_xinclude_elements_are_refused_wherever_they_are(
    namespace: str, template: bytes, line: int
) -> None:
    data = template.replace(b"{ns}", namespace.encode())
    with pytest.raises(XmlForbidden, match=f"^line {line}: .*XInclude element"):
        parse_xml(data)
