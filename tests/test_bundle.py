"""The evidence bundle: built from a real archive of real verdicts, checked offline, by us and
by openssl; every tampering fails with the check that caught it named.

The archive holds what the pipeline decided on DemoWorld submissions — accepted, rejected
(authenticated, wrong agency in the payload) and quarantined (tampered ciphertext, never
decrypted) — filed with :func:`gateway.filing.message_item`, a receipt for the accepted one,
and a checkpoint signed by the demo hub key.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from archive import bundle
from archive import checkpoint as cp
from archive import tables as t
from archive.blobs import BlobStore
from archive.db import Database
from archive.log import Item
from archive.records import Transport
from archive.service import Archive
from gateway.demo import HUB_ADDRESS, DemoWorld, tamper
from gateway.filing import message_item
from gateway.pipeline import process
from keys.issuing import make_root
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
            receipt_record = receipt = None
            for r in s.scalars(select(t.LogEntry).where(t.LogEntry.kind == "receipt")):
                fields = json.loads(r.record)
                if fields[bundle.RECEIPT_FOR] == seq:
                    receipt_record = r.record
                    receipt = a.blobs.get(s, fields["blobs"][bundle.RECEIPT_BLOB])
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


def rezip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def statuses(report: bundle.Report) -> dict[str, str]:
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
        "receipt.json", "receipt.eml",
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
    assert "never decrypted" in text
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
    report = bundle.verify_bundle(zips[name], anchors=[world.root.cert])
    assert report.ok, report.as_dict()
    got = statuses(report)
    assert got["leaf hash"] == got["inclusion proof"] == got["checkpoint signature"] == "pass"
    assert got["hub chain"] == "pass"
    assert got["blob raw.eml"] == "pass"
    assert report.entry["status"] == name
    if name == "quarantined":
        assert got["agency signature"] == "skip"
    else:
        assert got["agency signature"] == got["agency chain"] == "pass"
        assert got["blob evidence/1.crl"] == "pass"


def test_without_an_anchor_the_chains_are_skipped_not_passed(zips: dict[str, bytes]) -> None:
    report = bundle.verify_bundle(zips["accepted"])
    assert report.ok
    assert statuses(report)["hub chain"] == statuses(report)["agency chain"] == "skip"
    assert statuses(report)["receipt"] == "pass"


def test_a_signer_whose_path_did_not_validate_is_never_shown_as_trusted(
    world: DemoWorld, zips: dict[str, bytes]
) -> None:
    """A revoked certificate's message was decrypted and its signature checks, but the entry
    holds no chain: the report says the chain was not checked, whatever anchor is given."""
    assert "chain.pem" not in members(zips["revoked"])
    report = bundle.verify_bundle(zips["revoked"], anchors=[world.root.cert])
    assert report.ok and report.entry["status"] == "quarantined"
    checks = {c.name: c for c in report.checks}
    assert checks["agency signature"].status == "pass"
    assert "the certificate the message carries" in checks["agency signature"].detail
    assert checks["agency chain"].status == "skip"
    assert "did not validate" in checks["agency chain"].detail


def test_another_anchor_fails_both_chains(zips: dict[str, bytes]) -> None:
    other = make_root("Some Other Root", at=WORLD_AT - timedelta(days=30))
    got = statuses(bundle.verify_bundle(zips["accepted"], anchors=[other.cert]))
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
    report = bundle.verify_bundle(rezip(files), anchors=[world.root.cert])
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
    report = bundle.verify_bundle(rezip(files), anchors=[world.root.cert])
    got = statuses(report)
    assert got["checkpoint signature"] == "pass"
    assert got["inclusion proof"] == "fail"
    detail = next(c.detail for c in report.checks if c.name == "inclusion proof")
    assert f"the checkpoint for {size}" in detail
    assert not report.ok


@pytest.mark.parametrize("junk", [b"", b"not a zip", b"PK\x03\x04" + b"\x00" * 40])
def test_junk_is_reported_not_raised(junk: bytes) -> None:
    report = bundle.verify_bundle(junk)
    assert not report.ok
    assert statuses(report) == {"members": "fail"}


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
