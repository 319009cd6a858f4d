"""Property-based tests of the whole intake path (the h11 invariant: parse it or say why).

* Any bytes at all → :func:`gateway.pipeline.process` returns a :class:`Verdict`, never raises.
* A valid submission, mutated (bit flips, truncation, insertions, deletions, duplicated or
  rewritten headers, changes to the DER under the base64 body, LF line ends) → a Verdict whose
  errors are all typed; if it is still accepted, it carries exactly the original payload bytes
  (mutations in ignorable places — the Subject, a line ending — may keep it accepted, but no
  mutation may change what is accepted).
* :func:`formats.smime.open_message` on the same mutations raises only ``GatewayError``s.

Examples are drawn as small frozen *mutation* values, so a failure shrinks to a readable recipe.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from formats.errors import GatewayError
from formats.smime import open_message
from gateway.demo import DemoWorld
from gateway.pipeline import Context, process
from gateway.verdict import Verdict
from tests.conftest import WORLD_AT

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Target:
    """The fuzzing target: one valid submission and the context that accepts it."""

    raw: bytes = field(repr=False)
    payload: bytes = field(repr=False)
    ctx: Context = field(repr=False)


@pytest.fixture(scope="module")
def target(world: DemoWorld, world_ctx: Context) -> Target:
    raw = world.submission("H26.SNV")
    verdict = process(raw, world_ctx, at=WORLD_AT)
    assert verdict.accepted, verdict.errors  # the fuzzing starts from a message that passes
    assert verdict.opened is not None
    return Target(raw, verdict.opened.payload, world_ctx)


# --- mutations --------------------------------------------------------------------------------


class Mutation(Protocol):
    def apply(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class FlipBit:
    position: int
    bit: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.position % len(data)
        return data[:i] + bytes([data[i] ^ (1 << self.bit)]) + data[i + 1 :]


@dataclass(frozen=True)
class Truncate:
    keep: int

    def apply(self, data: bytes) -> bytes:
        return data[: self.keep % (len(data) + 1)]


@dataclass(frozen=True)
class Insert:
    position: int
    chunk: bytes

    def apply(self, data: bytes) -> bytes:
        i = self.position % (len(data) + 1)
        return data[:i] + self.chunk + data[i:]


@dataclass(frozen=True)
class Delete:
    position: int
    length: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        i = self.position % len(data)
        return data[:i] + data[i + self.length :]


def _split_head(data: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines) and the rest, for a CRLF message."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return [], data
    fields: list[bytes] = []
    for line in data[:end].split(b"\r\n"):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, data[end:]


def _join_head(fields: list[bytes], rest: bytes) -> bytes:
    return b"\r\n".join(fields) + rest


@dataclass(frozen=True)
class DuplicateHeader:
    index: int

    def apply(self, data: bytes) -> bytes:
        fields, rest = _split_head(data)
        if not fields:
            return data
        i = self.index % len(fields)
        return _join_head([*fields[: i + 1], fields[i], *fields[i + 1 :]], rest)


@dataclass(frozen=True)
class SetHeader:
    name: str
    value: str

    def apply(self, data: bytes) -> bytes:
        fields, rest = _split_head(data)
        new = f"{self.name}: {self.value}".encode()
        prefix = self.name.lower().encode() + b":"
        replaced = [new if f.lower().startswith(prefix) else f for f in fields]
        if replaced == fields:
            replaced.append(new)
        return _join_head(replaced, rest)


@dataclass(frozen=True)
class InBase64Body:
    """Decode the body, apply a byte-level mutation to the DER, re-encode in 76-column lines."""

    inner: FlipBit | Truncate | Insert | Delete

    def apply(self, data: bytes) -> bytes:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return data
        try:
            der = base64.b64decode(re.sub(rb"\s", b"", data[end + 4 :]), validate=True)
        except ValueError:
            return data
        encoded = base64.encodebytes(self.inner.apply(der)).replace(b"\n", b"\r\n")
        return data[: end + 4] + encoded


@dataclass(frozen=True)
class LfLineEnds:
    """A relay that turned CRLF into LF."""

    def apply(self, data: bytes) -> bytes:
        return data.replace(b"\r\n", b"\n")


_positions = st.integers(min_value=0, max_value=1 << 20)
_byte_mutations = st.one_of(
    st.builds(FlipBit, _positions, st.integers(0, 7)),
    st.builds(Truncate, _positions),
    st.builds(Insert, _positions, st.binary(min_size=1, max_size=64)),
    st.builds(Delete, _positions, st.integers(1, 512)),
)
_header_names = st.sampled_from(
    ["Subject", "From", "To", "Date", "Message-ID", "Content-Type", "MIME-Version", "X-Extra"]
)
_header_values = st.one_of(
    st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=80),
    st.sampled_from(
        [
            "vanthu@stp.hanoi.gov.vn",
            '"vanthu@snv.hanoi.gov.vn" <attacker@evil.example>',
            "<dup@snv.hanoi.gov.vn>",
            "application/pkcs7-mime; smime-type=signed-data",
            "multipart/mixed; boundary=x",
            "text/plain",
        ]
    ),
)
mutations = st.lists(
    st.one_of(
        _byte_mutations,
        st.builds(DuplicateHeader, st.integers(0, 20)),
        st.builds(SetHeader, _header_names, _header_values),
        st.builds(InBase64Body, _byte_mutations),  # reaches the CMS layers:
        st.builds(InBase64Body, _byte_mutations),  # listed twice to draw it more often
        st.just(LfLineEnds()),
    ),
    min_size=1,
    max_size=3,
)


def _mutate(raw: bytes, recipe: list[Mutation]) -> bytes:
    for mutation in recipe:
        raw = mutation.apply(raw)
    return raw


# --- (a) any bytes ------------------------------------------------------------------------------

_CONTENT_TYPES = [
    b"application/pkcs7-mime; smime-type=enveloped-data",
    b"application/pkcs7-mime; smime-type=authEnveloped-data",
    b"application/pkcs7-mime",
    b'multipart/signed; protocol="application/pkcs7-signature"; boundary=b',
    b"multipart/mixed; boundary=b",
    b"text/plain",
]


@st.composite
def message_shaped(draw: st.DrawFn) -> bytes:
    """Plausible headers around random (often base64-encoded) bodies: reaches deeper layers."""
    ctype = draw(st.sampled_from(_CONTENT_TYPES))
    body = draw(st.binary(max_size=2048))
    if draw(st.booleans()):
        body = base64.encodebytes(body).replace(b"\n", b"\r\n")
        cte = b"base64"
    else:
        cte = draw(st.sampled_from([b"7bit", b"binary", b"quoted-printable", b"x-unknown"]))
    return (
        b"From: vanthu@snv.hanoi.gov.vn\r\nMessage-ID: <f@snv.hanoi.gov.vn>\r\n"
        b"Content-Type: " + ctype + b"\r\nContent-Transfer-Encoding: " + cte + b"\r\n\r\n" + body
    )


@FUZZ
@example(raw=b"")
@example(raw=b"\r\n\r\n")
@example(raw=b"From: a@b\r\nMessage-ID: <a@b>\r\n\r\n")
@given(raw=st.one_of(st.binary(max_size=4096), message_shaped()))
def test_any_bytes_give_a_verdict(raw: bytes, target: Target) -> None:
    verdict = process(raw, target.ctx, at=WORLD_AT)
    assert isinstance(verdict, Verdict)
    assert not verdict.accepted  # nothing random is a validly signed submission
    assert verdict.errors
    assert all(isinstance(e, GatewayError) and e.message for e in verdict.errors)


# --- (b) mutated valid messages through the pipeline --------------------------------------------


_Test = TypeVar("_Test", bound=Callable[..., Any])

#: Recipes that once crashed the intake (stdlib header-parser exceptions escaping from the From
#: and Subject handling); kept as explicit examples so they are always tried.
_ONCE_CRASHED = (
    [Truncate(13)],  # "From: vanthu@" and nothing else
    [SetHeader("From", "<")],
    [SetHeader("From", "agencies: vanthu@snv.hanoi.gov.vn; attacker")],
    [SetHeader("Subject", "=?utf-8?b?Q?=")],
)


def _with_examples(test: _Test) -> _Test:
    for recipe in reversed(_ONCE_CRASHED):
        test = example(recipe=recipe)(test)
    return test


@FUZZ
@_with_examples
@example(recipe=[SetHeader("Subject", "Re: something else")])
@example(recipe=[LfLineEnds()])
@example(recipe=[DuplicateHeader(0)])
@example(recipe=[InBase64Body(FlipBit(5000, 0))])
@given(recipe=mutations)
def test_mutated_submission_gives_a_typed_verdict(recipe: list[Mutation], target: Target) -> None:
    raw = _mutate(target.raw, recipe)
    verdict = process(raw, target.ctx, at=WORLD_AT)
    assert isinstance(verdict, Verdict)
    event(verdict.errors[0].code if verdict.errors else verdict.disposition)  # coverage stats
    if raw == target.raw:
        assert verdict.accepted
    if verdict.accepted:
        assert verdict.opened is not None
        assert verdict.opened.payload == target.payload, "a mutation changed what was accepted"
    else:
        assert verdict.errors
        assert all(isinstance(e, GatewayError) and e.message for e in verdict.errors)


# --- (c) open_message alone -----------------------------------------------------------------------


@FUZZ
@_with_examples
@given(recipe=mutations)
def test_open_message_raises_only_gateway_errors(recipe: list[Mutation], target: Target) -> None:
    raw = _mutate(target.raw, recipe)
    try:
        opened = open_message(raw, keys=target.ctx.keys, limits=target.ctx.limits)
    except GatewayError:
        return  # a typed refusal is a correct answer
    assert opened.payload == target.payload, "a mutation changed what opens"
