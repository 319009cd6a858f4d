"""The evidence bundle: one archive entry with everything needed to check it offline.

Pure: values in, zip bytes out (:func:`build`); :mod:`archive.bundle_check` reads a bundle
back and reports on it, with no database, no settings and no key. The layout, in the
order the members are written (every timestamp is the entry's time, so the same entry and
checkpoint always give the same bytes)::

    VERIFY.txt           how to check all of this by hand (openssl, sha256sum, xxd)
    entry.json           the entry's record, byte for byte as hashed into the log
    proof.json           seq, size, leaf hash and audit path (hex) up to the checkpoint root
    checkpoint.txt       the signed tree head (archive.checkpoint)
    checkpoint.p7s       its detached CMS signature (DER), by the hub
    hub.pem              the certificate that signed the checkpoint, then its issuers
    raw.eml              the blobs named in entry.json: the message as received,
    decrypted.eml        the signed S/MIME entity (``openssl cms -verify`` checks it alone),
    payload.xml          the payload, attachments/N.bin, the signer's chain.pem and the
    chain.pem            revocation evidence used, evidence/N.crl or evidence/N.ocsp;
    evidence/1.crl       any other blob as blobs/NAME
    receipt.json         the receipt entry's record and its receipt.eml, when a receipt
    receipt.eml          entry for this message exists, and receipt-proof.json, its audit
    receipt-proof.json   path under the same checkpoint, when that checkpoint covers it
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archive import checkpoint as cp
from archive import merkle

#: A receipt entry refers to the message entry it answers with this field, and holds the
#: receipt message as the blob ``receipt``.
RECEIPT_KIND = "receipt"
RECEIPT_FOR = "for_seq"
RECEIPT_BLOB = "receipt"

REQUIRED = ("entry.json", "proof.json", "checkpoint.txt", "checkpoint.p7s", "hub.pem")
RECEIPT_MEMBERS = ("receipt.json", "receipt.eml", "receipt-proof.json")
FIXED_NAMES = {
    "raw": "raw.eml",
    "decrypted": "decrypted.eml",
    "payload": "payload.xml",
    "chain": "chain.pem",
}
FOLDERS = re.compile(r"attachments/\d+\.bin|evidence/\d+\.(crl|ocsp)|blobs/\w[\w.-]*")


class BundleError(Exception):
    """A bundle cannot be built from the values given (they do not agree)."""


# --- layout --------------------------------------------------------------------------------------


def member_names(blob: str) -> tuple[str, ...]:
    """Where blob ``blob`` may be in the zip (evidence is .crl or .ocsp by its content)."""
    if blob in FIXED_NAMES:
        return (FIXED_NAMES[blob],)
    kind, _, n = blob.partition("-")
    if n.isdigit() and kind == "attachment":
        return (f"attachments/{n}.bin",)
    if n.isdigit() and kind == "evidence":
        return (f"evidence/{n}.crl", f"evidence/{n}.ocsp")
    return (f"blobs/{blob}",)


def known_member(name: str) -> bool:
    top = ("VERIFY.txt", *REQUIRED, *FIXED_NAMES.values(), *RECEIPT_MEMBERS)
    return name in top or bool(FOLDERS.fullmatch(name))


def instant(value: object) -> datetime | None:
    """An ISO 8601 time with its offset (a time without one names no instant), else None."""
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return at if at.utcoffset() is not None else None
    return None


def member_name(blob: str, data: bytes) -> str:
    names = member_names(blob)
    if len(names) == 1:
        return names[0]
    try:
        x509.load_der_x509_crl(data)
        return names[0]
    except ValueError:
        return names[1]


# --- building ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contents:
    """What an export gathers from the archive for entry ``record``."""

    record: bytes
    blobs: Mapping[str, bytes]
    size: int
    audit_path: Sequence[bytes]
    checkpoint_body: bytes
    checkpoint_signature: bytes
    hub_chain: Sequence[x509.Certificate]
    receipt_record: bytes | None = None
    receipt: bytes | None = None
    #: The receipt entry's audit path up to the same checkpoint (None: it does not cover it).
    receipt_path: Sequence[bytes] | None = None

    @property
    def fields(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.record)
        return value


def build(c: Contents) -> bytes:
    """The zip; refuses values that would not verify (a damaged archive exports nothing)."""
    fields = c.fields
    seq, addresses = fields["seq"], fields.get("blobs", {})
    if set(addresses) != set(c.blobs):
        raise BundleError(f"entry {seq} names blobs {sorted(addresses)}, given {sorted(c.blobs)}")
    for name, data in c.blobs.items():
        if hashlib.sha256(data).hexdigest() != addresses[name]:
            raise BundleError(f"entry {seq}: blob {name} does not hash to its address")
    signed = cp.Checkpoint.parse(c.checkpoint_body)
    leaf = merkle.leaf_hash(c.record)
    if signed.size != c.size or not merkle.verify_inclusion(
        leaf, seq, c.size, c.audit_path, signed.root
    ):
        raise BundleError(f"entry {seq}: the proof does not lead to the checkpoint's root")
    proof = {
        "algorithm": "RFC 9162 §2.1.3.2; leaf = SHA-256(0x00 || entry.json), "
        "node = SHA-256(0x01 || left || right)",
        "seq": seq,
        "size": c.size,
        "leaf_hash": leaf.hex(),
        "audit_path": [h.hex() for h in c.audit_path],
        "root": signed.root.hex(),
    }
    members: list[tuple[str, bytes]] = [
        ("VERIFY.txt", verify_text(c, leaf, signed).encode()),
        ("entry.json", c.record),
        ("proof.json", (json.dumps(proof, indent=2, sort_keys=True) + "\n").encode()),
        ("checkpoint.txt", c.checkpoint_body),
        ("checkpoint.p7s", c.checkpoint_signature),
        ("hub.pem", b"".join(cert.public_bytes(Encoding.PEM) for cert in c.hub_chain)),
    ]
    for name in sorted(c.blobs, key=blob_order):
        member = member_name(name, c.blobs[name])
        if not known_member(member):
            raise BundleError(f"entry {seq}: blob name {name!r} has no place in a bundle")
        members.append((member, c.blobs[name]))
    if c.receipt_record is not None and c.receipt is not None:
        members += [("receipt.json", c.receipt_record), ("receipt.eml", c.receipt)]
        if c.receipt_path is not None:
            members.append(("receipt-proof.json", _receipt_proof(c, signed)))
    at = instant(fields.get("at"))
    if at is None:
        raise BundleError(f"entry {seq} has no valid time (ISO 8601, with its offset)")
    return _zip(members, at)


def _receipt_proof(c: Contents, signed: cp.Checkpoint) -> bytes:
    assert c.receipt_record is not None and c.receipt_path is not None
    seq = json.loads(c.receipt_record)["seq"]
    leaf = merkle.leaf_hash(c.receipt_record)
    if not merkle.verify_inclusion(leaf, seq, c.size, c.receipt_path, signed.root):
        raise BundleError(f"receipt entry {seq}: the proof does not lead to the checkpoint's root")
    proof = {
        "seq": seq,
        "size": c.size,
        "leaf_hash": leaf.hex(),
        "audit_path": [h.hex() for h in c.receipt_path],
    }
    return (json.dumps(proof, indent=2, sort_keys=True) + "\n").encode()


def blob_order(name: str) -> tuple[int, int, str, str]:
    fixed = ("raw", "decrypted", "payload", "attachment", "chain", "evidence")
    kind, _, n = name.partition("-")
    rank = fixed.index(kind) if kind in fixed else len(fixed)
    # Numbers in order without int(): a name from a hostile entry.json may hold digits int()
    # refuses (superscripts) or more of them than it converts.
    number = n if n.isascii() and n.isdigit() else ""
    return rank, len(number), number, name


def _zip(members: Sequence[tuple[str, bytes]], at: datetime) -> bytes:
    stamp = max(at.astimezone(UTC), datetime(1980, 1, 1, tzinfo=UTC)).timetuple()[:6]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            z.writestr(info, data)
    return out.getvalue()


def verify_text(c: Contents, leaf: bytes, signed: cp.Checkpoint) -> str:
    """VERIFY.txt: the same checks as `gateway archive verify-bundle`, with common tools."""
    fields = c.fields
    seq = fields["seq"]
    lines = [
        f"Evidence bundle for archive entry {seq} ({fields['kind']}, {fields['at']})",
        f"of the log {signed.origin}, proven under its checkpoint of size {signed.size}.",
        "",
        "Check it with `gateway archive verify-bundle THIS.zip --ca root.pem --hub-address",
        "ADDRESS` (root.pem and the hub's ADDRESS from a source you trust; add `--origin",
        f"{signed.origin}` if the hub names its log so, not by its address), or by hand:",
        "",
        "1. The files are the ones the entry names: each SHA-256 below must equal the",
        '   address of the same blob in "blobs" of entry.json.',
        "",
        "     sha256sum " + " ".join(member_name(n, d) for n, d in sorted(c.blobs.items())),
        "",
        "2. The leaf hash is SHA-256(0x00 || entry.json); it must equal leaf_hash in proof.json:",
        "",
        "     h=$( (printf '\\000'; cat entry.json) | sha256sum | cut -c1-64); echo $h",
        "",
        "3. Each node is SHA-256(0x01 || left || right) over the raw 32-byte hashes. Walking",
        "   the audit path of proof.json from the leaf (RFC 9162 §2.1.3.2) is, for this entry:",
        "",
    ]
    for n, (side, h) in enumerate(
        zip(_sides(seq, c.size, len(c.audit_path)), c.audit_path, strict=True)
    ):
        pair = f"echo {h.hex()}; echo $h" if side == "left" else f"echo $h; echo {h.hex()}"
        lines.append(
            f"     h=$( (printf '\\001'; ({pair}) | xxd -r -p) | sha256sum | cut -c1-64)"
            + ("  # path[0]" if n == 0 else f"  # path[{n}]")
        )
    lines += [
        "",
        "   and $h must then equal the root in checkpoint.txt, which is in base64:",
        "",
        "     grep '^root: ' checkpoint.txt | cut -c7- | tr -d '\\r' | base64 -d | xxd -p -c 32",
        "",
        "4. The checkpoint is signed by the hub (hub.pem; compare its fingerprint with the one",
        "   the hub publishes, or give the trust anchor as root.pem). Under the anchor, any",
        "   certificate (an agency's too) could sign it: the signer must name the hub's address",
        f"   (check it against a source you trust); checkpoint.txt's origin, {signed.origin},",
        "   names the log (the hub's address, unless the hub names its log otherwise):",
        "",
        "     openssl cms -verify -binary -inform DER -in checkpoint.p7s \\",
        "       -content checkpoint.txt -CAfile root.pem -purpose any -out /dev/null",
        "     openssl x509 -in hub.pem -noout -fingerprint -sha256",
        "     openssl x509 -in hub.pem -noout -ext subjectAltName",
        "",
    ]
    if "decrypted" in c.blobs:
        lines += [
            "5. The agency's signature over the message content (add -attime with the receipt",
            "   time, as seconds since 1970, once the agency certificate has expired):",
            "",
            "     openssl cms -verify -in decrypted.eml -CAfile root.pem -out signed-content.eml",
            "",
        ]
    elif "raw" in c.blobs:
        lines += [
            "5. The archive keeps no decrypted copy of this message: it was never decrypted, or",
            "   its signature did not verify on receipt (see reasons in entry.json). There is no",
            "   agency signature to check here; raw.eml is the message exactly as it arrived.",
            "",
        ]
    else:
        lines += [
            "5. This message was never taken in (see its status and reason in entry.json): the",
            "   bundle holds no copy of it, only what entry.json records.",
            "",
        ]
    if c.receipt is None:
        lines.append("No receipt entry for this message was in the archive at export time.")
    else:
        lines += [
            "receipt.eml is the receipt the hub sent; its SHA-256 is the receipt blob named in",
            "receipt.json, whose audit path up to the same root is in receipt-proof.json (walk it",
            "as in step 3, from SHA-256(0x00 || receipt.json))."
            if c.receipt_path is not None
            else "receipt.json, not covered by this checkpoint: export its seq in a bundle of its "
            "own once a later checkpoint covers it.",
        ]
    return "\n".join(lines) + "\n"


def _sides(index: int, size: int, count: int) -> list[str]:
    """For each audit path hash, whether it is the left or right input (RFC 9162 §2.1.3.2)."""
    fn, sn, out = index, size - 1, []
    for _ in range(count):
        if fn & 1 or fn == sn:
            out.append("left")
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            out.append("right")
        fn, sn = fn >> 1, sn >> 1
    return out
