"""Every named hostile sample (tests/hostile.py) through the whole pipeline: its own typed error.

For each sample: the verdict is not ``accepted``; the first error is exactly the sample's class
(STYLE: one error tree, each subclass knows its meaning); its message is non-empty and safe to
show a peer (DESIGN §5 rule 5: no traceback, no internal path); and its archive entry can be
written (every text in it is UTF-8, whatever the message made its decoders produce). The README and the asset
directory are checked against the table so nothing goes undocumented or unused.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from archive.log import canonical
from archive.records import Transport
from formats.errors import GatewayError
from gateway.demo import DemoWorld
from gateway.filing import message_item
from gateway.pipeline import Context, process
from tests.conftest import WORLD_AT
from tests.hostile import ASSETS, SAMPLES, Sample

#: Things a peer-facing message must never contain: traces, source files, local paths.
_INTERNAL = re.compile(
    r"Traceback|File \"|\.py\b|site-packages|/work/|/home/|/tmp/|/usr/|<frozen |"
    r"\b(?:Key|Type|Attribute|Value|Index)Error\b|object at 0x"
)
#: Lines of /etc/passwd (what the XXE samples try to read).
_PASSWD = re.compile(r"root:[^:\n]*:0:0:|/bin/(?:ba)?sh|nologin")


def _params() -> Sequence[object]:
    params = []
    for sample in SAMPLES.values():
        marks: list[pytest.MarkDecorator] = []
        if sample.known_bug:
            marks.append(pytest.mark.xfail(strict=True, reason=sample.known_bug))
        if sample.needs and shutil.which(sample.needs) is None:
            marks.append(pytest.mark.skip(reason=f"needs {sample.needs}"))
        params.append(pytest.param(sample, id=sample.name, marks=marks))
    return params


def _context(base: Context, sample: Sample) -> Context:
    return base if sample.limits is None else dataclasses.replace(base, limits=sample.limits)


def _texts(error: GatewayError) -> list[str]:
    return [str(error), error.message, error.detail or "", error.smtp_reply, error.reason_vi]


@pytest.mark.parametrize("sample", _params())
def test_hostile_sample_gets_its_typed_error(
    sample: Sample, world: DemoWorld, world_ctx: Context
) -> None:
    raw = sample.raw(world)
    verdict = process(raw, _context(world_ctx, sample), at=WORLD_AT)

    assert verdict.disposition != "accepted"
    assert not verdict.accepted
    assert verdict.errors, "a refused message must say why"
    first = verdict.errors[0]
    if sample.exact:
        assert type(first) is sample.error, f"got {type(first).__name__}: {first}"
    else:
        assert isinstance(first, sample.error), f"got {type(first).__name__}: {first}"
    if sample.match is not None:
        assert re.search(sample.match, first.message), first.message

    for error in verdict.errors:
        assert error.message.strip()
        for text in _texts(error):
            assert not _INTERNAL.search(text), f"internal detail leaked: {text!r}"
            assert not _PASSWD.search(text), f"file content leaked: {text!r}"
    assert verdict.smtp_reply.startswith(first.smtp)
    item = message_item(verdict, raw, Transport(WORLD_AT, "smtp", "203.0.113.7"))
    assert canonical(item.fields)  # what filing hashes: raises on text UTF-8 cannot hold


@pytest.mark.parametrize("name", ["xxe-file", "xxe-network", "xinclude"])
def test_external_content_never_leaks(name: str, world: DemoWorld, world_ctx: Context) -> None:
    verdict = process(SAMPLES[name].raw(world), world_ctx, at=WORLD_AT)
    passwd = Path("/etc/passwd")
    secret_lines = (
        [line for line in passwd.read_text(errors="replace").splitlines() if line.strip()]
        if passwd.exists()
        else []
    )
    dumped = repr(verdict.as_dict())
    assert not _PASSWD.search(dumped)
    for line in secret_lines:
        assert line not in dumped


def test_samples_cover_the_required_attacks() -> None:
    required = {
        "efail-cbc-gadget", "encrypted-unsigned", "signed-unencrypted", "two-signers",
        "zero-signers", "unsigned-part-around-signed", "signed-part-as-attachment",
        "self-signed-signer", "foreign-ca-chain", "revoked-signer", "expired-signer",
        "not-yet-valid-signer", "wrong-eku", "from-not-certificate-email", "two-from-headers",
        "display-name-spoof", "payload-from-other-agency", "triple-des", "rsa-1024-signer",
        "sha1-digest", "billion-laughs", "xxe-file", "doctype-only", "deep-nesting-300",
        "huge-text-node", "invalid-base64", "ten-thousand-parts", "header-64k",
        "truncated-cms", "garbage-asn1",
    }  # fmt: skip
    assert required <= SAMPLES.keys(), sorted(required - SAMPLES.keys())
    assert len(SAMPLES) >= 30


def test_every_sample_is_documented_in_the_readme() -> None:
    readme = (ASSETS / "README.md").read_text(encoding="utf-8")
    missing = [name for name in SAMPLES if f"`{name}`" not in readme]
    assert not missing, f"add these samples to tests/assets/README.md: {missing}"
    unknown = set(re.findall(r"^- `([a-z0-9-]+)`", readme, re.MULTILINE)) - SAMPLES.keys()
    assert not unknown, f"README lists samples that do not exist: {sorted(unknown)}"


def test_every_asset_belongs_to_a_sample() -> None:
    used = {asset for sample in SAMPLES.values() for asset in sample.assets}
    present = {
        path.relative_to(ASSETS).as_posix()
        for path in ASSETS.rglob("*")
        if path.is_file() and path.name != "README.md"
    }
    assert not used - present, f"samples name missing assets: {sorted(used - present)}"
    assert not present - used, f"assets no sample uses: {sorted(present - used)}"


@pytest.mark.parametrize(
    "sample", [s for s in SAMPLES.values() if isinstance(s.source, str)], ids=lambda s: s.name
)
def test_static_assets_stay_small(sample: Sample) -> None:
    assert isinstance(sample.source, str)
    assert (ASSETS / sample.source).stat().st_size <= 300 * 1024
