"""Time to open a submission, next to the openssl CLI pipeline, and peak memory at 25 MB.

"Open" is the whole pipeline: decrypt + verify the signature + validate the signer's path
(with CRL) + bind the agency + parse and XSD-validate the payload. The baseline is what an
administrator would script with the openssl CLI, measured in the same run on the same message:

    openssl cms -decrypt -recip hub.pem -inkey hub.key |
      openssl cms -verify -CAfile root+crl.pem -crl_check -purpose smimesign

(the baseline does less: no XML parse, no schema, no agency binding).

Run:  .venv/bin/python bench/open_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from formats.categories import Value
from formats.payload import Attachment as ManifestEntry
from formats.payload import Organ, build_payload
from formats.smime import Attachment, build_message
from gateway.demo import HUB_ADDRESS, WORK_PERMITS, DemoWorld
from gateway.pipeline import Context, process

SENDER = "H26.SNV"


def message_of_size(
    world: DemoWorld, target: int, *, attachment: bool = False, detached: bool = True
) -> bytes:
    """A valid submission of about ``target`` bytes on the wire: records, or one attachment."""
    if attachment:
        overhead = len(_build(world, 0, attachment=True, detached=detached))
        layers = 2 if detached else 3  # base64 inside base64 (inside base64 when opaque)
        n = max(1, int((target - overhead) / 1.37**layers))
        return _build(world, n, attachment=True, detached=detached)
    one, two = len(_build(world, 2, detached=detached)), len(_build(world, 4, detached=detached))
    per_record = (two - one) / 2
    return _build(world, max(1, round(2 + (target - one) / per_record)), detached=detached)


def _build(world: DemoWorld, n: int, *, attachment: bool = False, detached: bool = True) -> bytes:
    agency = world.directory.get(SENDER)
    assert agency is not None
    address = sorted(agency.emails)[0]
    files: list[Attachment] = []
    if attachment:
        files = [Attachment("scan.pdf", "application/pdf", os.urandom(n))] if n else []
        records = [{"DocumentType": "Công văn", "Summary": "Bản chụp hồ sơ", "PageCount": 40}]
    else:
        records = [_distinct(WORK_PERMITS[i % len(WORK_PERMITS)], i) for i in range(n)]
    payload = build_payload(
        "document" if attachment else "work-permit",
        sender=Organ(SENDER, agency.name_vi, address),
        recipients=[Organ("H26.CATP")],
        records=records,
        document_number="1/SNV-VP",
        issued_on=world.at.date(),
        message_id=uuid.UUID(int=n),
        period=None if attachment else "2026-10",
        subject="benchmark",
        attachments=[
            ManifestEntry(f.filename, f.media_type, len(f.data), hashlib.sha256(f.data).hexdigest())
            for f in files
        ],
    )
    signer = world.agencies[SENDER]
    return build_message(
        payload.to_xml(),
        signer_cert=signer.cert,
        signer_key=signer.key,  # type: ignore[arg-type]
        recipients=[world.hub.cert],
        from_addr=address,
        to_addrs=[HUB_ADDRESS],
        message_id=f"<bench-{n}@snv.hanoi.gov.vn>",
        date=world.at,
        attachments=files,
        detached=detached,
    )


def _distinct(record: dict[str, Value], i: int) -> dict[str, Value]:
    """Real submissions are about distinct people: no two records share a name or number."""
    return {
        **record,
        "FullName": f"{record['FullName']} {i}",
        "PassportNumber": f"P{i:08d}",
        "PermitNumber": f"HN-2026-{i:07d}",
    }


def time_ours(raw: bytes, ctx: Context, at: datetime, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        verdict = process(raw, ctx, at=at)
        times.append(time.perf_counter() - t)
        assert verdict.accepted, verdict.errors
    return times


def time_openssl(raw: bytes, d: Path, at: datetime, repeat: int) -> list[float]:
    (d / "msg.eml").write_bytes(raw)
    script = (
        f"openssl cms -decrypt -in {d}/msg.eml -recip {d}/hub.pem -inkey {d}/hub.key | "
        f"openssl cms -verify -CAfile {d}/root+crl.pem -crl_check "
        f"-purpose smimesign -attime {int(at.timestamp())} -out /dev/null"
    )
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", script], capture_output=True, check=False
        )
        times.append(time.perf_counter() - t)
        assert proc.returncode == 0, proc.stderr
    return times


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:8.2f} ms  (min {min(values) * 1000:.2f})"


def peak_memory(raw_path: Path, home: Path, at: datetime) -> tuple[int, int]:
    """Peak RSS growth of a fresh process while it reads and opens the message."""
    child = f"""
import sys, resource
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from datetime import datetime
from gateway import settings
from gateway.loading import load_context
from gateway.pipeline import process
from formats.limits import Limits
import dataclasses
s = settings.load(__import__('pathlib').Path({str(home)!r}))
ctx = dataclasses.replace(load_context(s), limits=Limits(max_message_bytes=64 * 2**20))
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'): return int(line.split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM)
before = rss()
raw = open({str(raw_path)!r}, 'rb').read()
v = process(raw, ctx, at=datetime.fromisoformat({at.isoformat()!r}))
assert v.accepted, v.errors
for line in open('/proc/self/status'):
    if line.startswith('VmHWM'): peak = int(line.split()[1]) * 1024
print(before, peak)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    before, peak = map(int, out.stdout.split())
    return before, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    repeat_small = 50 if args.quick else 300
    repeat_ossl = 10 if args.quick else 30

    at = datetime.now(UTC)
    world = DemoWorld.create(at)
    ctx = world.context()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        world.write_home(d / "home", b"bench-passphrase")
        (d / "root.pem").write_bytes(world.root.cert_pem())
        crl = x509.load_der_x509_crl(world.crl())
        (d / "root+crl.pem").write_bytes(world.root.cert_pem() + crl.public_bytes(Encoding.PEM))
        (d / "hub.pem").write_bytes(world.hub.cert_pem())
        (d / "hub.key").write_bytes(world.hub.key_pem())

        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
        for label, size, rep_ours, rep_ossl in (
            ("10 KB", 10 * 1024, repeat_small, repeat_ossl),
            ("1 MB", 1024 * 1024, max(5, repeat_small // 20), max(3, repeat_ossl // 3)),
        ):
            raw = message_of_size(world, size)
            cold_ctx = world.context()  # fresh trust store: no validation cache
            cold = time_ours(raw, cold_ctx, at, 1)
            ours = time_ours(raw, ctx, at, rep_ours)
            ossl = time_openssl(raw, d, at, rep_ossl)
            ratio = statistics.median(ossl) / statistics.median(ours)
            print(f"\nopen a {label} submission ({len(raw):,} bytes on the wire)")
            print(f"  gateway pipeline (warm)    {ms(ours)}   n={rep_ours}")
            print(
                f"  gateway pipeline (cold)    first call on a fresh trust store: {cold[0] * 1000:.2f} ms"
            )
            print(f"  openssl decrypt | verify   {ms(ossl)}   n={rep_ossl}")
            print(f"  speed-up vs openssl        {ratio:6.1f}x")

        for label, attachment, detached in (
            ("records", False, True),
            ("attachment", True, True),
            ("records, opaque signed-data", False, False),
        ):
            raw = message_of_size(world, 25 * 1024 * 1024, attachment=attachment, detached=detached)
            path = d / f"big-{label.replace(', ', '-').replace(' ', '-')}.eml"
            path.write_bytes(raw)
            before, peak = peak_memory(path, d / "home", at)
            growth = peak - before
            print(f"\npeak memory opening a {len(raw) / 2**20:.1f} MiB message ({label})")
            print(
                f"  RSS growth {growth / 2**20:7.1f} MiB = {growth / len(raw):.2f}x the message "
                f"(target < 4x)"
            )


if __name__ == "__main__":
    main()
