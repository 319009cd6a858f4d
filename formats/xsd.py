"""The packaged XSD files: loaded once, validated against, errors located by line and column.

Schemas come only from the ``formats/schemas`` package data, read with ``importlib.resources``;
``xs:include`` is answered from the same place and nothing else (no file system, no network).

libxml2 reports schema errors with a line but no column. :func:`validate` finds the column
itself: the offending element's start tag on that line, located by the error's node path. The
first error becomes the message (``line L, column C: ...``); all of them, one per line, the
``detail`` of :class:`SchemaInvalid`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, cast

from lxml import etree

from formats import wording_vi
from formats.errors import SchemaInvalid

NAMESPACE = "urn:hanoi:gov:official-mail:payload:1"
#: Schema problems reported at most (a broken file can produce thousands).
_MAX_PROBLEMS = 100
#: A namespace in Clark notation ("{urn:…}Name"): a URI, so a colon, no quote, comma or space.
#: (Braces of another kind stay: a facet's set "{'M', 'F'}", a pattern's "[A-Z]{3}".)
_CLARK = re.compile(r"\{[^{}\s',]*:[^{}\s',]*\}")
_ELEMENT_IN_MESSAGE = re.compile(r"Element '(?:\{[^}]*\})?([^']+)'")


def _read(relative: str) -> bytes:
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"schema path {relative!r} must stay inside formats/schemas")
    try:
        root: Traversable = resources.files("formats")
    except (NotADirectoryError, TypeError):
        # ``formats`` imported as a namespace package (a stale editable install): the
        # package-data directory is still the one beside this module.
        root = Path(__file__).resolve().parent
    return root.joinpath("schemas", *parts).read_bytes()


class _PackageResolver(etree.Resolver):
    """Answers ``xs:include`` from package data; anything else is refused."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self._base = base

    def resolve(  # type: ignore[override]  # lxml passes a context the stubs omit
        self, system_url: str, public_id: str, context: Any
    ) -> Any:
        name = system_url.rsplit("/", 1)[-1]
        for candidate in (name, f"{self._base}/{name}"):
            try:
                data = _read(candidate)
            except (FileNotFoundError, ValueError):
                continue
            return self.resolve_string(data, context, base_url=f"pkg:/{candidate}")
        raise OSError(f"schema {system_url!r} is not packaged in formats/schemas")


@cache
def load_schema(relative: str) -> etree.XMLSchema:
    """The compiled schema for ``formats/schemas/<relative>`` (compiled once, then cached)."""
    parser = etree.XMLParser(no_network=True, resolve_entities=False, load_dtd=False)
    base = relative.rsplit("/", 1)[0] if "/" in relative else ""
    parser.resolvers.add(_PackageResolver(base))
    document = etree.fromstring(_read(relative), parser, base_url=f"pkg:/{relative}")
    return etree.XMLSchema(document)


def validate(root: etree._Element, schema: etree.XMLSchema, source: bytes) -> None:
    """Validate ``root`` (parsed from ``source``) or raise :class:`SchemaInvalid`, its first
    problem also in Vietnamese when :func:`formats.wording_vi.schema_problem` words it."""
    if schema.validate(root):
        return
    lines = source.decode("utf-8", "replace").splitlines()
    found = [
        (entry.line, _column(root, entry, lines), _shortened(_CLARK.sub("", entry.message)))
        for entry in list(cast(Iterable[Any], schema.error_log))[:_MAX_PROBLEMS]
    ]
    problems = [f"line {line}, column {column}: {message}" for line, column, message in found]
    line, column, first = found[0]
    vietnamese = wording_vi.schema_problem(first)
    raise SchemaInvalid(
        f"{problems[0]}; correct the payload to match the category XSD",
        detail="\n".join(problems),
        message_vi=f"{wording_vi.where(line, column)}: {vietnamese}" if vietnamese else None,
    )


#: A value libxml2 quotes, where it quotes one: after "The value " (facets) or right after the
#: element's (or attribute's) name (types), up to what it says of it.
_QUOTED_VALUE = re.compile(
    r"(?P<head>The value |^Element '[^']*'(?:, attribute '[^']*')?: )'(?P<value>.*?)'"
    r"(?P<tail> is (?:not|less|greater) )",
    re.DOTALL,
)
#: Longest finding kept: libxml2 cuts its own messages at about 64 KB, closing quote and all,
#: and a finding must leave room in the receipt for the others.
MAX_FINDING = 600


def _shortened(message: str) -> str:
    """libxml2's ``message`` with the value it quotes shortened and on one line
    (:func:`wording_vi.shown`): the sender's own value can run to megabytes, and the receipt
    has 2000 characters for every reason in two languages. A message still too long (libxml2
    cut it inside the value) is cut at :data:`MAX_FINDING` characters."""
    text = _QUOTED_VALUE.sub(
        lambda m: m["head"] + wording_vi.shown(m["value"]) + m["tail"], message
    )
    if len(text) > MAX_FINDING:
        text = text[: MAX_FINDING - 1].replace("\n", "\\n") + "…"
    return text


def located(element: etree._Element, source: bytes, message: str) -> str:
    """``message`` prefixed with the line and column of ``element``'s start tag in ``source``."""
    line, column = position(element, source)
    return f"line {line}, column {column}: {message}"


def located_pair(
    element: etree._Element, source: bytes, message: str, message_vi: str
) -> tuple[str, str]:
    """:func:`located` in English and in Vietnamese (``dòng L, cột C: …``), the place found
    once."""
    line, column = position(element, source)
    return (
        f"line {line}, column {column}: {message}",
        f"{wording_vi.where(line, column)}: {message_vi}",
    )


def position(element: etree._Element, source: bytes) -> tuple[int, int]:
    """The line and column of ``element``'s start tag in ``source``."""
    lines = source.decode("utf-8", "replace").splitlines()
    line = _line(element) or 1
    return line, _tag_column(element, line, lines)


def _line(element: etree._Element) -> int:
    line = getattr(element, "sourceline", None)
    return line if isinstance(line, int) else 0


def _column(root: etree._Element, entry: Any, lines: list[str]) -> int:
    element = _find(root, entry.path)
    if element is None or _line(element) != entry.line:
        match = _ELEMENT_IN_MESSAGE.search(entry.message)
        return _first_tag_column(lines, entry.line, match.group(1) if match else None)
    return _tag_column(element, entry.line, lines)


def _find(root: etree._Element, path: str) -> etree._Element | None:
    namespaces = {
        prefix: uri for el in root.iter(etree.Element) for prefix, uri in el.nsmap.items() if prefix
    }
    try:
        found = root.getroottree().xpath(path, namespaces=namespaces)
    except etree.XPathError:
        return None
    if isinstance(found, list) and found and isinstance(found[0], etree._Element):
        return found[0]
    return None


def _tag_column(element: etree._Element, line: int, lines: list[str]) -> int:
    """1-based column of ``element``'s start tag: the n-th tag of its name on its line."""
    local = etree.QName(element).localname
    same_line_before = 0
    for other in element.getroottree().getroot().iter(element.tag):
        if other is element:
            break
        if _line(other) == line:
            same_line_before += 1
    return _first_tag_column(lines, line, local, skip=same_line_before)


def _first_tag_column(lines: list[str], line: int, local: str | None, *, skip: int = 0) -> int:
    if not 1 <= line <= len(lines):
        return 1
    text = lines[line - 1]
    name = re.escape(local) if local else r"[^\s/>!?]+"
    starts = [m.start() for m in re.finditer(rf"<(?:[\w.\-]+:)?{name}(?=[\s/>])", text)]
    if not starts:
        stripped = len(text) - len(text.lstrip())
        return stripped + 1
    return starts[min(skip, len(starts) - 1)] + 1
