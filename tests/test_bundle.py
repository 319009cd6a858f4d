"""The evidence bundle: built from a real archive of real verdicts, checked offline, by us and
by openssl; every tampering fails with the check that caught it named.

The archive holds what the pipeline decided on DemoWorld submissions — accepted, rejected
(authenticated, wrong agency in the payload) and quarantined (tampered ciphertext, never
decrypted) — filed with :func:`gateway.filing.message_item`, a receipt for the accepted one,
and a checkpoint signed by the demo hub key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from archive import bundle, bundle_check
from archive import checkpoint as cp
from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database
from archive.log import Item
from archive.records import Transport
from archive.service import Archive
from formats import cms_signed
from gateway import cli
from gateway.demo import HUB_ADDRESS, DemoWorld, tamper
from gateway.filing import message_item
from gateway.pipeline import process
from keys.issuing import Issued, issue_agency, issue_hub, make_intermediate, make_root
from tests.conftest import WORLD_AT

RECEIVED = WORLD_AT + timedelta(minutes=5)
RECEIPT = b"From: hub@exchange.hanoi.gov.vn\r\nSubject: receipt\r\n\r\nStatusCode 01\r\n"


def submissions(world: DemoWorld) -> dict[str, bytes]:
    """One message for each disposition the archive must keep."""
    return {
        "accepted": world.submission("H26.SNV"),
        "rejected": world.submission("H26.SNV", payload_from="H26.STP", number=2),
        "quarantined": tamper(world.submission("H26.SNV", number=3)),
    }


def file_messages(archive: Archive, world: DemoWorld) -> dict[str, int]:
    """File the three verdicts, a receipt for the accepted one, then sign a checkpoint."""
    ctx = world.context()
    items, names = [], []
    for n, (name, raw) in enumerate(submissions(world).items()):
        verdict = process(raw, ctx, at=RECEIVED)
        assert verdict.disposition == name
        transport = Transport(
            RECEIVED + timedelta(seconds=n),
            protocol="smtp",
            peer="203.0.113.7",
            helo="mail.snv.hanoi.gov.vn",
            mail_from="vanthu@snv.hanoi.gov.vn",
            rcpt_to=(HUB_ADDRESS,),
            tls="TLSv1.3",
        )
        items.append(message_item(verdict, raw, transport))
        names.append(name)
    entries = archive.file(items)
    seqs = {name: e.seq for name, e in zip(names, entries, strict=True)}
    receipt = Item(
        bundle.RECEIPT_KIND,
        RECEIVED + timedelta(seconds=10),
        {bundle.RECEIPT_FOR: seqs["accepted"], "status": "01"},
        {bundle.RECEIPT_BLOB: RECEIPT},
    )
    seqs["receipt"] = archive.file([receipt])[0].seq
    archive.checkpoint(RECEIVED + timedelta(minutes=1))
    return seqs


def file_revoked(archive: Archive, world: DemoWorld) -> int:
    """A message signed with a revoked certificate: decrypted, but its signer's path did not
    validate, so its entry has no chain. Filed after the others, under a new checkpoint."""
    raw = world.submission("H26.STP", signer=world.revoked["H26.STP"], number=4)
    verdict = process(raw, world.context(), at=RECEIVED)
    assert verdict.disposition == "quarantined" and verdict.opened is not None
    at = RECEIVED + timedelta(seconds=20)
    (entry,) = archive.file([message_item(verdict, raw, Transport(at, "smtp", "203.0.113.7"))])
    archive.checkpoint(RECEIVED + timedelta(minutes=2))
    return entry.seq


@dataclass
class Filed:
    archive: Archive
    seqs: dict[str, int]
    hub_chain: list[x509.Certificate]

    def contents(self, seq: int) -> bundle.Contents:
        """What `gateway archive export` gathers, read straight from the archive."""
        a = self.archive
        with a.db.session() as s:
            entry = a.log.entry(s, seq)
            row = s.scalars(select(t.Checkpoint).order_by(t.Checkpoint.id.desc())).first()
            assert row is not None
            receipt_record, receipt, receipt_path = a.receipt_for(s, seq, row.size)
            return bundle.Contents(
                record=entry.record,
                blobs={n: a.blobs.get(s, addr) for n, addr in entry.blobs.items()},
                size=row.size,
                audit_path=a.log.inclusion(s, seq, row.size),
                checkpoint_body=row.body,
                checkpoint_signature=row.signature,
                hub_chain=self.hub_chain,
                receipt_record=receipt_record,
                receipt=receipt,
                receipt_path=receipt_path,
            )


@pytest.fixture(scope="module")
def filed(world: DemoWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filed]:
    path = tmp_path_factory.mktemp("bundle") / "archive.db"
    db = Database.open(f"sqlite:///{path}")
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    archive = Archive(db, BlobStore(os.urandom(32)), HUB_ADDRESS, signer=(world.hub.cert, key))
    seqs = file_messages(archive, world)
    seqs["revoked"] = file_revoked(archive, world)
    filed = Filed(archive, seqs, [world.hub.cert, world.root.cert])
    yield filed
    db.dispose()


@pytest.fixture(scope="module")
def zips(filed: Filed) -> dict[str, bytes]:
    return {
        name: bundle.build(filed.contents(filed.seqs[name]))
        for name in ("accepted", "rejected", "quarantined", "revoked")
    }


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def rezip(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def statuses(report: bundle_check.Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


# --- building --------------------------------------------------------------------------------


def test_layout_is_fixed_and_deterministic(filed: Filed, zips: dict[str, bytes]) -> None:
    again = bundle.build(filed.contents(filed.seqs["accepted"]))
    assert again == zips["accepted"]  # same entry and checkpoint: the same bytes
    with zipfile.ZipFile(io.BytesIO(zips["accepted"])) as z:
        names = [i.filename for i in z.infolist()]
        assert {i.date_time for i in z.infolist()} == {RECEIVED.timetuple()[:6]}
    assert names == [
        "VERIFY.txt", "entry.json", "proof.json", "checkpoint.txt", "checkpoint.p7s", "hub.pem",
        "raw.eml", "decrypted.eml", "payload.xml", "chain.pem", "evidence/1.crl",
        "receipt.json", "receipt.eml", "receipt-proof.json",
    ]  # fmt: skip
    files = members(zips["accepted"])
    with filed.archive.db.session() as s:
        assert files["entry.json"] == filed.archive.log.entry(s, filed.seqs["accepted"]).record
    proof = json.loads(files["proof.json"])
    assert set(proof) >= {"seq", "size", "leaf_hash", "audit_path", "root"}
    assert files["receipt.eml"] == RECEIPT


def test_a_message_never_decrypted_has_no_decrypted_part(zips: dict[str, bytes]) -> None:
    files = members(zips["quarantined"])
    assert "decrypted.eml" not in files
    assert "receipt.eml" not in files
    text = files["VERIFY.txt"].decode()
    assert "keeps no decrypted copy of this message: it was never decrypted, or" in text
    assert "No receipt entry for this message" in text


def test_build_refuses_values_that_would_not_verify(filed: Filed) -> None:
    c = filed.contents(filed.seqs["accepted"])
    with pytest.raises(bundle.BundleError, match="does not hash to its address"):
        bundle.build(bundle.Contents(**{**c.__dict__, "blobs": {**c.blobs, "raw": b"other"}}))
    with pytest.raises(bundle.BundleError, match="does not lead to the checkpoint"):
        bundle.build(bundle.Contents(**{**c.__dict__, "audit_path": c.audit_path[1:]}))


# --- verifying -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["accepted", "rejected", "quarantined"])
def test_bundles_verify_offline(world: DemoWorld, zips: dict[str, bytes], name: str) -> None:
    report = bundle_check.verify_bundle(
        zips[name], anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
    )
    assert report.ok, report.as_dict()
    got = statuses(report)
    assert got["leaf hash"] == got["inclusion proof"] == got["checkpoint signature"] == "pass"
    assert got["hub chain"] == "pass"
    assert got["blob raw.eml"] == "pass"
    assert report.entry["status"] == name
    if name == "quarantined":
        assert got["agency signature"] == "skip"
        [why] = [c.detail for c in report.checks if c.name == "agency signature"]
        assert "not decrypted, or its signature did not verify on receipt" in why
    else:
        assert got["agency signature"] == got["agency chain"] == "pass"
        assert got["blob evidence/1.crl"] == "pass"


def test_without_an_anchor_the_chains_are_skipped_not_passed(zips: dict[str, bytes]) -> None:
    report = bundle_check.verify_bundle(zips["accepted"])
    assert report.ok
    assert statuses(report)["hub chain"] == statuses(report)["agency chain"] == "skip"
    assert statuses(report)["receipt"] == "pass"


def test_a_signer_whose_path_did_not_validate_is_never_shown_as_trusted(
    world: DemoWorld, zips: dict[str, bytes]
) -> None:
    """A revoked certificate's message was decrypted and its signature checks, but the entry
    holds no chain: the report says the chain was not checked, whatever anchor is given."""
    assert "chain.pem" not in members(zips["revoked"])
    report = bundle_check.verify_bundle(
        zips["revoked"], anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
    )
    assert report.ok and report.entry["status"] == "quarantined"
    checks = {c.name: c for c in report.checks}
    assert checks["agency signature"].status == "pass"
    assert "the certificate the message carries" in checks["agency signature"].detail
    assert checks["agency chain"].status == "skip"
    assert "did not validate" in checks["agency chain"].detail


def test_another_anchor_fails_both_chains(zips: dict[str, bytes]) -> None:
    other = make_root("Some Other Root", at=WORLD_AT - timedelta(days=30))
    got = statuses(
        bundle_check.verify_bundle(
            zips["accepted"], anchors=[other.cert], hub_addresses=[HUB_ADDRESS]
        )
    )
    assert got["hub chain"] == got["agency chain"] == "fail"


def _flip_payload(f: dict[str, bytes]) -> None:
    data = f["payload.xml"]
    f["payload.xml"] = data[:100] + bytes([data[100] ^ 1]) + data[101:]


def _edit_entry(f: dict[str, bytes]) -> None:
    f["entry.json"] = f["entry.json"].replace(b'"accepted"', b'"rejected"')


def _drop_proof_hash(f: dict[str, bytes]) -> None:
    proof = json.loads(f["proof.json"])
    proof["audit_path"] = proof["audit_path"][:-1]
    f["proof.json"] = json.dumps(proof).encode()


def _forge_checkpoint_size(f: dict[str, bytes]) -> None:
    body = f["checkpoint.txt"].decode()
    size = body.split("size: ")[1].split("\r\n")[0]
    f["checkpoint.txt"] = body.replace(f"size: {size}", f"size: {int(size) + 1}").encode()


def _other_hub_certificate(world: DemoWorld) -> Callable[[dict[str, bytes]], None]:
    def change(f: dict[str, bytes]) -> None:
        f["hub.pem"] = world.agencies["H26.CATP"].cert_pem() + world.root.cert_pem()

    return change


TAMPERING: dict[str, tuple[Callable[[DemoWorld], Callable[[dict[str, bytes]], None]], str]] = {
    "change a payload byte": (lambda _w: _flip_payload, "blob payload.xml"),
    "change entry.json": (lambda _w: _edit_entry, "leaf hash"),
    "drop a proof hash": (lambda _w: _drop_proof_hash, "inclusion proof"),
    "forge the checkpoint body": (lambda _w: _forge_checkpoint_size, "checkpoint signature"),
    "replace hub.pem": (_other_hub_certificate, "checkpoint signature"),
    "drop the payload": (lambda _w: lambda f: f.pop("payload.xml"), "blob payload.xml"),
    "add a file": (lambda _w: lambda f: f.update({"../evil.sh": b"rm"}), "members"),
    "drop the checkpoint": (lambda _w: lambda f: f.pop("checkpoint.p7s"), "members"),
    "damage decrypted.eml": (
        lambda _w: lambda f: f.update(
            {"decrypted.eml": f["decrypted.eml"].replace(b"Content-Type: application/xml", b"Content-Type: application/xmL")}
        ),
        "agency signature",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", TAMPERING)
def test_each_tampering_fails_with_its_check_named(
    world: DemoWorld, zips: dict[str, bytes], case: str
) -> None:
    make, check = TAMPERING[case]
    files = members(zips["accepted"])
    make(world)(files)
    report = bundle_check.verify_bundle(
        rezip(files), anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
    )
    assert not report.ok
    failed = [c.name for c in report.checks if c.status == "fail"]
    assert check in failed, report.as_dict()


def test_swapping_in_another_checkpoint_fails_the_proof(
    world: DemoWorld, filed: Filed, zips: dict[str, bytes]
) -> None:
    """A genuine, validly signed checkpoint of an earlier size: the proof does not fit it."""
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    files = members(zips["accepted"])
    size = json.loads(files["proof.json"])["size"] - 1
    with filed.archive.db.session() as s:
        earlier = cp.Checkpoint(HUB_ADDRESS, size, filed.archive.log.root(s, size), RECEIVED)
    files["checkpoint.txt"] = earlier.body()
    files["checkpoint.p7s"] = cp.sign(earlier, world.hub.cert, key)
    report = bundle_check.verify_bundle(
        rezip(files), anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
    )
    got = statuses(report)
    assert got["checkpoint signature"] == "pass"
    assert got["inclusion proof"] == "fail"
    detail = next(c.detail for c in report.checks if c.name == "inclusion proof")
    assert f"the checkpoint for {size}" in detail
    assert not report.ok


@pytest.mark.parametrize("junk", [b"", b"not a zip", b"PK\x03\x04" + b"\x00" * 40])
def test_junk_is_reported_not_raised(junk: bytes) -> None:
    report = bundle_check.verify_bundle(junk)
    assert not report.ok
    assert statuses(report) == {"members": "fail"}


# --- hostile bundles --------------------------------------------------------------------------
# Made at test time from the genuine bundles above; each case stands for one attack on
# verify-bundle, which must answer it with a FAIL of the check named, never an exception.


def _damaged(data: bytes, member: str) -> bytes:
    """The zip with ``member``'s stored bytes overwritten: reading it fails (bad CRC or bad
    deflate data), so a check that reports anything else did not read it."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(member)
    out = bytearray(data)
    name_length, extra_length = struct.unpack_from("<HH", out, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    out[start : start + info.compress_size] = b"\xff" * info.compress_size
    return bytes(out)


def _encrypted(data: bytes, member: str) -> bytes:
    """The zip with ``member`` flagged as encrypted (zipfile then refuses to read it)."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        out[z.getinfo(member).header_offset + 6] |= 1  # local header: general purpose flags
    name = member.encode()
    at = out.find(b"PK\x01\x02")
    while out[at + 46 : at + 46 + len(name)] != name:
        at = out.find(b"PK\x01\x02", at + 1)
    out[at + 8] |= 1  # the central directory's copy
    return bytes(out)


UNNAMED: dict[str, tuple[str, str, Callable[[DemoWorld], bytes]]] = {
    # case: (bundle, the member planted, its content)
    "a payload for a message never decrypted": ("quarantined", "payload.xml", lambda _w: b"<Payload>planted</Payload>"),
    "an attachment": ("accepted", "attachments/9.bin", lambda _w: b"MZ planted executable"),
    "a blob of any other name": ("accepted", "blobs/anything", lambda _w: b"planted"),
    "a chain for a signer that did not validate": ("revoked", "chain.pem", lambda w: w.revoked["H26.STP"].cert_pem()),
    "the evidence again, as OCSP": ("accepted", "evidence/1.ocsp", lambda _w: b"planted"),
}  # fmt: skip


@pytest.mark.parametrize("case", UNNAMED)
def test_a_member_entry_json_does_not_name_fails_unread(
    world: DemoWorld, zips: dict[str, bytes], case: str
) -> None:
    """A file put in after the export is not evidence. It used to verify, unchecked; and a
    chain.pem added to a revoked signer's bundle turned "agency chain" from SKIP into PASS."""
    name, member, content = UNNAMED[case]
    files = members(zips[name])
    assert member not in files
    files[member] = content(world)
    report = bundle_check.verify_bundle(
        _damaged(rezip(files), member), anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
    )
    assert [(c.name, c.status) for c in report.checks] == [("members", "fail")]
    assert member in report.checks[0].detail
    assert "damaged" not in report.checks[0].detail  # refused by its name, never read
    assert not report.ok


def _deep(opening: bytes) -> bytes:
    return opening + b"[" * 100_000 + b"]" * 100_000 + b"}"


def _edit(member: str, **changes: object) -> Callable[[dict[str, bytes]], None]:
    def change(f: dict[str, bytes]) -> None:
        f[member] = json.dumps({**json.loads(f[member]), **changes}).encode()

    return change


def _add_blob(name: str) -> Callable[[dict[str, bytes]], None]:
    def change(f: dict[str, bytes]) -> None:
        record = json.loads(f["entry.json"])
        record["blobs"][name] = "00" * 32
        f["entry.json"] = json.dumps(record).encode()

    return change


def _for_seq_as_bool(f: dict[str, bytes]) -> None:
    """for_seq as the JSON boolean that Python takes for the entry's seq (false == 0)."""
    seq = json.loads(f["entry.json"])["seq"]
    assert seq in (0, 1)
    _edit("receipt.json", for_seq=bool(seq))(f)


def _bad_utf8_hub_name(f: dict[str, bytes]) -> None:
    """A byte 0xFF in the UTF8String names of the hub certificate inside the signature: an
    error that formats.cms_signed does not type (ValueError), caught as a FAIL all the same."""
    hub = x509.load_pem_x509_certificates(f["hub.pem"])[0]
    name = str(hub.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value).encode()
    assert name in f["checkpoint.p7s"]
    f["checkpoint.p7s"] = f["checkpoint.p7s"].replace(name, b"\xff" + name[1:])


HOSTILE: dict[str, tuple[Callable[[dict[str, bytes]], None], str, str]] = {
    # case: (change, the check that fails, what it says)
    "entry.json nested 100,000 deep": (lambda f: f.update({"entry.json": _deep(b'{"seq":0,"x":')}), "members", "nested too deeply"),
    "proof.json nested 100,000 deep": (lambda f: f.update({"proof.json": _deep(b'{"seq":0,"x":')}), "members", "nested too deeply"),
    "entry.json blobs as a list": (_edit("entry.json", blobs=[]), "members", '"blobs"'),
    "entry.json blob address as a number": (_edit("entry.json", blobs={"raw": 1}), "members", '"blobs"'),
    "receipt.json blobs as a list": (_edit("receipt.json", blobs=[]), "receipt", '"blobs"'),
    "receipt.json nested 100,000 deep": (lambda f: f.update({"receipt.json": _deep(b'{"seq":9,"x":')}), "receipt", "nested too deeply"),
    "receipt.json for_seq as a boolean": (_for_seq_as_bool, "receipt", "not a receipt for entry"),
    "an audit path of numbers": (_edit("proof.json", audit_path=[1, 2]), "inclusion proof", "hex SHA-256"),
    "a proof size that is a list": (_edit("proof.json", size=[[1]]), "inclusion proof", "for size <list>"),
    "a certificate in checkpoint.p7s named in invalid UTF-8": (_bad_utf8_hub_name, "checkpoint signature", "malformed (ValueError"),
    "an attachment numbered in superscript": (_add_blob("attachment-\u00b2"), "blob attachments/\u00b2.bin", "missing"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_is_a_failed_check_never_an_exception(
    world: DemoWorld, zips: dict[str, bytes], case: str
) -> None:
    change, check, says = HOSTILE[case]
    files = members(zips["accepted"])
    change(files)
    report = bundle_check.verify_bundle(
        rezip(files), anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
    )
    assert not report.ok
    failed = {c.name: c.detail for c in report.checks if c.status == "fail"}
    assert says in failed[check], report.as_dict()


def test_the_cli_reports_a_hostile_bundle_and_exits_1(
    zips: dict[str, bytes], tmp_path: Path
) -> None:
    """Not "gateway: internal error: RecursionError" with exit 70."""
    files = members(zips["accepted"])
    files["entry.json"] = _deep(b'{"seq":0,"x":')
    (tmp_path / "b.zip").write_bytes(rezip(files))
    result = CliRunner().invoke(cli.cli, ["archive", "verify-bundle", str(tmp_path / "b.zip")])
    assert not isinstance(result.exception, Exception), result.exception
    assert result.exit_code == 1
    assert "FAIL  members: entry.json is nested too deeply" in result.stdout


def test_a_checkpoint_time_without_offset_fails_the_checkpoint(
    world: DemoWorld, zips: dict[str, bytes]
) -> None:
    """Anyone may sign such a body with a certificate of their own; with --ca, comparing its
    time with the hub certificate's validity raised TypeError."""
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    files = members(zips["accepted"])
    body = files["checkpoint.txt"].replace(b"Z\r\n", b"\r\n")
    files["checkpoint.txt"] = body
    files["checkpoint.p7s"] = cms_signed.sign(body, cert=world.hub.cert, key=key)
    report = bundle_check.verify_bundle(
        rezip(files), anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
    )
    checks = {c.name: c for c in report.checks}
    assert checks["checkpoint signature"].status == "fail"
    assert "has no offset" in checks["checkpoint signature"].detail
    assert "hub chain" not in checks and checks["inclusion proof"].status == "fail"
    assert not report.ok


def test_an_encrypted_member_is_damaged_not_a_crash(zips: dict[str, bytes]) -> None:
    report = bundle_check.verify_bundle(_encrypted(zips["accepted"], "raw.eml"))
    assert [(c.name, c.status) for c in report.checks] == [("members", "fail")]
    assert "raw.eml is damaged (RuntimeError" in report.checks[0].detail


def test_a_zip_bomb_is_refused_by_its_declared_size_before_anything_is_inflated(
    zips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 MiB of zeros deflate to 2 KiB; the limit is lowered to 1 MiB for the test. entry.json
    is damaged too: had anything been read before the sizes were checked, it would show."""
    monkeypatch.setattr(bundle_check, "MAX_MEMBER_BYTES", 1 << 20)
    files = members(zips["accepted"])
    files["blobs/bomb"] = bytes(2 << 20)
    data = _damaged(rezip(files, zipfile.ZIP_DEFLATED), "entry.json")
    assert len(data) < 1 << 20
    report = bundle_check.verify_bundle(data)
    assert [(c.name, c.status) for c in report.checks] == [("members", "fail")]
    detail = report.checks[0].detail
    assert (
        detail
        == f"blobs/bomb unpacks to {2 << 20} bytes; a bundle member may hold at most {1 << 20}"
    )


def test_members_too_large_together_are_refused_where_the_total_passes_the_limit(
    zips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = members(zips["accepted"])
    total = sum(len(data) for data in files.values())
    monkeypatch.setattr(bundle_check, "MAX_TOTAL_BYTES", total - 1)
    last = list(files)[-1]
    report = bundle_check.verify_bundle(_damaged(rezip(files), "entry.json"))
    assert [(c.name, c.status) for c in report.checks] == [("members", "fail")]
    assert report.checks[0].detail == (
        f"the members up to {last} unpack to {total} bytes together; a bundle may hold at "
        f"most {total - 1}"
    )


# --- by hand, with other tools ---------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


def _unzip(data: bytes, where: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        z.extractall(where)
    return where


@needs_openssl
@pytest.mark.interop
def test_openssl_verifies_the_checkpoint_and_the_agency_signature(
    world: DemoWorld, zips: dict[str, bytes], tmp_path: Path
) -> None:
    d = _unzip(zips["accepted"], tmp_path / "b")
    (tmp_path / "root.pem").write_bytes(world.root.cert_pem())
    common = ["-CAfile", str(tmp_path / "root.pem"), "-out", str(tmp_path / "out")]
    checkpoint = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", d / "checkpoint.p7s",
         "-content", d / "checkpoint.txt", "-purpose", "any", *common],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checkpoint.returncode == 0, checkpoint.stderr
    agency = subprocess.run(
        ["openssl", "cms", "-verify", "-in", d / "decrypted.eml", *common],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert agency.returncode == 0, agency.stderr
    assert b"application/xml" in (tmp_path / "out").read_bytes()


@pytest.mark.skipif(shutil.which("xxd") is None, reason="no xxd")
def test_the_steps_in_verify_txt_reach_the_checkpoint_root(
    zips: dict[str, bytes], tmp_path: Path
) -> None:
    d = _unzip(zips["rejected"], tmp_path / "b")
    script = [ln.strip() for ln in (d / "VERIFY.txt").read_text().splitlines()]
    steps = [ln.split("  #")[0] for ln in script if ln.startswith("h=$(")]
    root = next(ln for ln in script if ln.startswith("grep '^root: '"))
    out = subprocess.run(
        ["bash", "-c", "; ".join([*steps, "echo $h", root])],
        cwd=d, capture_output=True, text=True, check=True,
    )  # fmt: skip
    leaf, computed, signed = out.stdout.split()
    proof = json.loads((d / "proof.json").read_text())
    assert leaf == proof["leaf_hash"]
    assert computed == signed == proof["root"]


def test_the_agency_chain_is_judged_when_the_message_arrived_not_when_it_says_it_was_signed(
    world: DemoWorld, tmp_path: Path
) -> None:
    """signingTime is the sender's own claim (here: the moment the test signed, weeks after
    the certificate ended); the gateway validated the signer when the message arrived, and so
    does the bundle's chain check."""
    short = issue_agency(
        world.root, email="vanthu@snv.hanoi.gov.vn", organ_id="H26.SNV",
        common_name="Sở Nội vụ (short-lived)", at=WORLD_AT - timedelta(days=30), days=40,
    )  # fmt: skip
    assert short.cert.not_valid_after_utc < datetime.now(UTC)  # the signing time: after it
    raw = world.submission("H26.SNV", signer=short, number=5)
    verdict = process(raw, world.context(), at=RECEIVED)
    assert verdict.disposition == "accepted", verdict.errors
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    archive = Archive(db, BlobStore(os.urandom(32)), HUB_ADDRESS, signer=(world.hub.cert, key))
    (entry,) = archive.file([message_item(verdict, raw, Transport(RECEIVED, "smtp", "192.0.2.1"))])
    archive.checkpoint(RECEIVED + timedelta(minutes=1))
    data = bundle.build(Filed(archive, {}, [world.hub.cert, world.root.cert]).contents(entry.seq))
    report = bundle_check.verify_bundle(
        data, anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
    )
    db.dispose()
    assert statuses(report)["agency chain"] == "pass", report.as_dict()


def test_the_hub_chain_obeys_path_length_constraints(world: DemoWorld, tmp_path: Path) -> None:
    """hub.pem carries the hub certificate and its issuers. Below a sub-CA whose
    pathLenConstraint is 0, a further sub-CA may issue nothing the anchor vouches for: the
    hub chain FAILS; issued by the sub-CA itself, it PASSES."""
    sub = make_intermediate(world.root, "Sub-CA", at=WORLD_AT - timedelta(days=3), path_length=0)
    under = make_intermediate(sub, "Sub-sub-CA", at=WORLD_AT - timedelta(days=3), path_length=None)
    raw = world.submission("H26.SNV", number=6)
    verdict = process(raw, world.context(), at=RECEIVED)
    assert verdict.disposition == "accepted", verdict.errors

    def hub_chain(*issuers: Issued) -> bundle_check.Check:
        hub = issue_hub(issuers[-1], email=HUB_ADDRESS, at=WORLD_AT - timedelta(days=2))
        key = hub.key
        assert isinstance(key, rsa.RSAPrivateKey)
        db = Database.open(f"sqlite:///{tmp_path}/{len(issuers)}.db")
        archive = Archive(db, BlobStore(os.urandom(32)), HUB_ADDRESS, signer=(hub.cert, key))
        item = message_item(verdict, raw, Transport(RECEIVED, "smtp", "192.0.2.1"))
        (entry,) = archive.file([item])
        archive.checkpoint(RECEIVED + timedelta(minutes=1))
        chain = [hub.cert, *(i.cert for i in reversed(issuers))]
        data = bundle.build(Filed(archive, {}, chain).contents(entry.seq))
        db.dispose()
        checks = {
            c.name: c
            for c in bundle_check.verify_bundle(
                data, anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
            ).checks
        }
        assert checks["checkpoint signature"].status == "pass"
        return checks["hub chain"]

    assert hub_chain(sub).status == "pass"
    failed = hub_chain(sub, under)
    assert failed.status == "fail", failed
    assert "Sub-sub-CA" in failed.detail


def test_a_checkpoint_an_agency_signed_is_not_the_hubs(
    world: DemoWorld, zips: dict[str, bytes]
) -> None:
    """An agency under the same root re-signs the bundle's checkpoint with its own key and
    puts its own certificate in hub.pem: the signature and the path are fine, but it is not
    the hub's certificate. And with --ca but no hub address, the check cannot tell: FAIL,
    saying what to give."""
    files = members(zips["accepted"])
    snv = world.agencies["H26.SNV"]
    key = snv.key
    assert isinstance(key, rsa.RSAPrivateKey)
    files["checkpoint.p7s"] = cp.sign(cp.Checkpoint.parse(files["checkpoint.txt"]), snv.cert, key)
    files["hub.pem"] = snv.cert_pem() + world.root.cert_pem()
    forged = rezip(files)
    checks = {
        c.name: c
        for c in bundle_check.verify_bundle(
            forged, anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
        ).checks
    }
    assert checks["checkpoint signature"].status == "pass"  # the agency did sign it
    assert checks["hub chain"].status == "fail"
    assert "names vanthu@snv.hanoi.gov.vn, not the hub's address" in checks["hub chain"].detail

    for data in (forged, zips["accepted"]):
        unnamed = {
            c.name: c for c in bundle_check.verify_bundle(data, anchors=[world.root.cert]).checks
        }
        assert unnamed["hub chain"].status == "fail"
        assert "give the hub's address (--hub-address)" in unnamed["hub chain"].detail
    # The origin checkpoint.txt gives must be the hub's too.
    files = members(zips["accepted"])
    head = cp.Checkpoint.parse(files["checkpoint.txt"])
    moved = cp.Checkpoint("archive@elsewhere.example", head.size, head.root, head.at)
    hub_key = world.hub.key
    assert isinstance(hub_key, rsa.RSAPrivateKey)
    files["checkpoint.txt"] = moved.body()
    files["checkpoint.p7s"] = cp.sign(moved, world.hub.cert, hub_key)
    elsewhere = {
        c.name: c
        for c in bundle_check.verify_bundle(
            rezip(files), anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS]
        ).checks
    }
    assert elsewhere["checkpoint signature"].status == "pass"
    assert elsewhere["hub chain"].status == "fail"
    assert "origin archive@elsewhere.example, not the hub's" in elsewhere["hub chain"].detail
    assert "give that name with --origin" in elsewhere["hub chain"].detail
    # A hub whose [archive] origin names its log otherwise: the verifier names the log too.
    for origins, status in ((["archive@elsewhere.example"], "pass"), ([HUB_ADDRESS], "fail")):
        named = {
            c.name: c
            for c in bundle_check.verify_bundle(
                rezip(files), anchors=[world.root.cert], hub_addresses=[HUB_ADDRESS],
                origins=origins,
            ).checks
        }  # fmt: skip
        assert named["hub chain"].status == status, named["hub chain"]
        if status == "pass":
            assert "for the log archive@elsewhere.example" in named["hub chain"].detail
        else:
            assert "not the log you named (--origin)" in named["hub chain"].detail


def test_a_receipt_is_proven_under_the_checkpoint_or_not_passed(
    zips: dict[str, bytes], filed: Filed
) -> None:
    """receipt.json and receipt.eml agree with each other whoever wrote them: the receipt
    check passes only with receipt-proof.json leading to the checkpoint's root. A receipt
    made up for a rejected message ("accepted") fails; without its proof it is not proven
    (SKIP), never PASS."""
    genuine = members(zips["accepted"])
    assert (
        json.loads(genuine["receipt-proof.json"])["seq"]
        == json.loads(genuine["receipt.json"])["seq"]
    )
    files = members(zips["rejected"])
    fake_eml = b"From: hub@exchange.hanoi.gov.vn\r\nSubject: ACCEPTED\r\n\r\nAccepted.\r\n"
    fake = json.loads(genuine["receipt.json"])
    fake.update(for_seq=filed.seqs["rejected"], status="accepted")
    fake["blobs"] = {"receipt": hashlib.sha256(fake_eml).hexdigest()}
    files["receipt.json"], files["receipt.eml"] = json.dumps(fake).encode(), fake_eml
    files["receipt-proof.json"] = genuine["receipt-proof.json"]
    checks = {c.name: c for c in bundle_check.verify_bundle(rezip(files)).checks}
    assert checks["receipt"].status == "fail"
    assert "receipt.json was changed, or is not the hub's" in checks["receipt"].detail
    del files["receipt-proof.json"]
    report = bundle_check.verify_bundle(rezip(files))
    assert statuses(report)["receipt"] == "skip" and report.ok
    assert "not proven here" in {c.name: c for c in report.checks}["receipt"].detail


def test_a_refused_entry_has_no_message_to_show_and_says_so(
    world: DemoWorld, tmp_path: Path
) -> None:
    """An IMAP message never taken in (refused: over the size limit) is filed with no blob:
    its bundle verifies, and VERIFY.txt does not point at a raw.eml it does not hold."""
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    db = Database.open(f"sqlite:///{tmp_path}/a.db")
    archive = Archive(db, BlobStore(os.urandom(32)), HUB_ADDRESS, signer=(world.hub.cert, key))
    fields = {"status": "refused", "reason": "limit-exceeded", "size": 99_000_000}
    (entry,) = archive.file([Item("message", RECEIVED, fields, {})])
    archive.checkpoint(RECEIVED + timedelta(minutes=1))
    data = bundle.build(Filed(archive, {}, [world.hub.cert, world.root.cert]).contents(entry.seq))
    db.dispose()
    files = members(data)
    assert "raw.eml" not in files
    text = files["VERIFY.txt"].decode()
    assert "raw.eml" not in text and "never taken in" in text
    assert bundle_check.verify_bundle(data).ok
