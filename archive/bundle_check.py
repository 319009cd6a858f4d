"""Checking an evidence bundle (:mod:`archive.bundle`) offline: zip bytes in, a report out,
with no database, no settings and no key.

Verification plan (:func:`verify_bundle`), each step one named check:

1. ``members``: the zip opens, has no duplicate, unknown or oversized member (by the sizes
   it declares, before anything is inflated), holds entry.json, proof.json, checkpoint.txt,
   checkpoint.p7s and hub.pem, and nothing else but VERIFY.txt, the receipt pair and one
   member for each blob entry.json names (a file added afterwards is refused unread);
   entry.json and proof.json are JSON records;
2. ``blob NAME``: every blob named in entry.json is present and hashes to its address;
3. ``leaf hash``: SHA-256(0x00 || entry.json) equals proof.json's leaf hash, same seq;
4. ``checkpoint signature``: checkpoint.p7s verifies over checkpoint.txt, signed by the
   first certificate of hub.pem;
5. ``hub chain`` (only with anchors): hub.pem's first certificate validates up to a given
   anchor at the checkpoint's time (RFC 5280, :mod:`keys.trust`; the rest of hub.pem only as
   path-building candidates);
6. ``inclusion proof``: the audit path leads from the leaf to the checkpoint's root
   (RFC 9162 §2.1.3.2) for the checkpoint's size;
7. ``agency signature``: decrypted.eml's CMS signature verifies, made by the first
   certificate of chain.pem (skipped when the archive keeps no decrypted copy: the message
   was not decrypted, or its signature did not verify on receipt; and for other entries);
8. ``agency chain``: chain.pem's first certificate validates up to a given anchor when the
   message was received (revocation is not judged again)
   (skipped without anchors, and when entry.json names no ``chain`` blob because the signer's
   path did not validate on receipt: the signature of step 7 is then only checked against the
   certificate the message carries);
9. ``receipt``: receipt.eml hashes to the receipt entry's blob, that entry names this one, and
   receipt-proof.json leads from it to the checkpoint's root (SKIP, "not proven", when the
   bundle holds no such proof: the checkpoint was signed before the receipt was filed).

A check that meets input it cannot make sense of (a field of the wrong type, JSON nested too
deeply, a damaged member) fails with what it found; :func:`verify_bundle` never raises on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archive import checkpoint as cp
from archive import merkle
from archive.bundle import (
    RECEIPT_BLOB,
    RECEIPT_FOR,
    RECEIPT_KIND,
    RECEIPT_MEMBERS,
    REQUIRED,
    blob_order,
    instant,
    known_member,
    member_names,
)
from formats.errors import GatewayError
from formats.smime import verify_signed_entity
from keys.directory import comparable
from keys.trust import TrustStore, emails_of

#: What a bundle may hold, by the sizes its zip declares (checked before anything is inflated).
MAX_MEMBER_BYTES = 128 << 20
MAX_TOTAL_BYTES = 512 << 20
MAX_MEMBERS = 1000
#: The largest file that can hold a bundle: its members, stored, and a zip's headers for each.
MAX_FILE_BYTES = MAX_TOTAL_BYTES + MAX_MEMBERS * 4096

Status = Literal["pass", "fail", "skip"]
T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    entry: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.status != "fail" for c in self.checks)

    def add(self, name: str, status: Status, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entry": self.entry,
            "checks": [
                {"check": c.name, "status": c.status, "detail": c.detail} for c in self.checks
            ],
        }


class _Failed(Exception):
    """The check fails; the message says what was found."""


@dataclass(frozen=True)
class _Opened:
    files: dict[str, bytes]
    fields: dict[str, Any]
    proof: dict[str, Any]
    addresses: dict[str, str]


def verify_bundle(
    data: bytes,
    *,
    anchors: Sequence[x509.Certificate] = (),
    hub_addresses: Sequence[str] = (),
    origins: Sequence[str] = (),
) -> Report:
    """Check a bundle (the plan in the module docstring). Never raises on bad input: whatever
    a check cannot read or make sense of is that check's FAIL. With ``anchors``, the hub chain
    passes only for a certificate naming one of ``hub_addresses`` (an agency's certificate
    under the same anchor is not the hub's): none given, it fails and says so; and for a
    checkpoint whose origin is one of ``origins``, the log's names (``[archive] origin``),
    by default the hub's address (what an unset ``origin`` gives)."""
    report = Report()
    opened = _step(report, "members", lambda: _members(data))
    if opened is None:
        return report
    files, fields, proof = opened.files, opened.fields, opened.proof
    report.entry = {k: _scalar(fields.get(k)) for k in ("seq", "kind", "at", "status", "agency")}
    _blobs(files, opened.addresses, report)
    leaf = _step(report, "leaf hash", lambda: _leaf(files["entry.json"], fields, proof))
    hub = _step(report, "checkpoint signature", lambda: _checkpoint(files))
    signed = hub[1] if hub else None
    if anchors and hub:
        _step(
            report, "hub chain", lambda: _hub_chain(hub[0], hub[1], anchors, hub_addresses, origins)
        )
    elif not anchors:
        report.add("hub chain", "skip", "no trust anchor given (--ca): hub.pem is taken as is")
    _step(report, "inclusion proof", lambda: _inclusion(leaf, proof, signed))
    _agency(files, fields, opened.addresses, anchors, report)
    if any(name in files for name in RECEIPT_MEMBERS):
        proven = _step(report, "receipt", lambda: _receipt(files, fields["seq"], signed))
        if proven is False:  # consistent with itself only, which anyone could make: no PASS
            report.checks[-1] = Check("receipt", "skip", report.checks[-1].detail)
    return report


def read_bundle(path: Path) -> bytes | Report:
    """The bytes of the bundle file at ``path``, or, when the file is larger than any bundle
    can be (its members' limit and their zip headers), the failing report that says so, without
    reading it: a 3 GB file was read whole before any check, and ran out of memory. Raises
    ``OSError`` when it cannot be read."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        report = Report()
        report.add(
            "members",
            "fail",
            f"the file is {size:,} bytes: more than a bundle can be (at most {MAX_FILE_BYTES:,})",
        )
        return report
    return path.read_bytes()


def _step(report: Report, name: str, check: Callable[[], tuple[T, str]]) -> T | None:
    """Run one check and report it; its value, or None if it did not pass."""
    try:
        value, detail = check()
    except _Failed as err:
        report.add(name, "fail", str(err))
        return None
    except Exception as exc:  # bad input no check foresaw: still a FAIL, never a traceback
        report.add(name, "fail", f"cannot be checked: the bundle is malformed ({_describe(exc)})")
        return None
    report.add(name, "pass", detail)
    return value


def _members(data: bytes) -> tuple[_Opened, str]:
    """The members entry.json accounts for, read, with entry.json and proof.json parsed.

    Nothing is inflated before the sizes the zip declares are checked, and a member is read
    only up to its declared size. The members allowed are the required files, VERIFY.txt,
    the receipt pair, and for each blob entry.json names its one member: anything else was
    put there after the export, and is refused unread."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # BadZipFile, OSError, ValueError, EOFError …: not a zip
        raise _Failed(f"not a readable zip file ({_describe(exc)})") from None
    with z:
        infos = _listing(z.infolist())
        files = {name: _read(z, infos[name]) for name in ("entry.json", "proof.json")}
        fields = _json_object(files["entry.json"], "entry.json")
        proof = _json_object(files["proof.json"], "proof.json")
        addresses = _addresses(fields, "entry.json")
        allowed = {"VERIFY.txt", *REQUIRED, *RECEIPT_MEMBERS}
        for blob in addresses:
            present = [m for m in member_names(blob) if m in infos]
            if len(present) > 1:
                raise _Failed(f"blob {_shown(blob)} is there twice: {' and '.join(present)}")
            allowed.update(present)
        for name in infos:
            if name not in allowed:
                raise _Failed(
                    f"{name} is not a blob entry.json names: it was not exported with the "
                    "entry (added afterwards?)"
                )
        files.update((name, _read(z, info)) for name, info in infos.items() if name not in files)
    return _Opened(files, fields, proof, addresses), f"{len(infos)} files"


def _listing(infos: Sequence[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """The zip's directory: known names, each once, within the sizes a bundle may have."""
    if len(infos) > MAX_MEMBERS:
        raise _Failed(f"{len(infos)} members; a bundle has far fewer")
    listed: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        if name in listed:
            raise _Failed(f"{_shown(name)} appears twice (which one is evidence?)")
        if not known_member(name):
            raise _Failed(f"unexpected member '{_shown(name)}'")
        # The sizes the zip declares, before inflating anything (a zip bomb declares its
        # size or is cut off there: zipfile reads no more than a member declares).
        if info.file_size > MAX_MEMBER_BYTES:
            raise _Failed(
                f"{name} unpacks to {info.file_size} bytes; a bundle member may hold at most "
                f"{MAX_MEMBER_BYTES}"
            )
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise _Failed(
                f"the members up to {name} unpack to {total} bytes together; a bundle may hold "
                f"at most {MAX_TOTAL_BYTES}"
            )
        listed[name] = info
    missing = [m for m in REQUIRED if m not in listed]
    if missing:
        raise _Failed(f"missing {', '.join(missing)}")
    return listed


def _read(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, never more than it declares (checked by :func:`_listing`)."""
    try:
        with z.open(info) as f:
            body = f.read(info.file_size + 1)
    except Exception as exc:  # BadZipFile (bad CRC), EOFError, zlib.error, encrypted …
        raise _Failed(f"{info.filename} is damaged ({_describe(exc)})") from None
    if len(body) != info.file_size:
        raise _Failed(f"{info.filename} is damaged: not the {info.file_size} bytes it declares")
    return body


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except RecursionError:
        raise _Failed(f"{name} is nested too deeply to be an archive record") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Failed(f"{name} is not JSON ({exc})") from None
    if not isinstance(value, dict) or not _is_seq(value.get("seq")):
        raise _Failed(f"{name} is not an archive record (no seq)")
    return value


def _addresses(record: Mapping[str, Any], name: str) -> dict[str, str]:
    """A record's ``blobs``: each blob's name and address (its SHA-256, hex)."""
    blobs = record.get("blobs")
    if not isinstance(blobs, dict) or not all(isinstance(a, str) for a in blobs.values()):
        raise _Failed(f'{name} has no "blobs" object of names and SHA-256 addresses')
    return blobs


def _is_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _blobs(files: Mapping[str, bytes], addresses: Mapping[str, str], report: Report) -> None:
    for name, address in sorted(addresses.items(), key=lambda kv: blob_order(kv[0])):
        present = [m for m in member_names(name) if m in files]
        label = f"blob {_shown(present[0] if present else member_names(name)[0])}"
        if not present:
            report.add(label, "fail", f"blob {_shown(name)} is named in entry.json but missing")
            continue
        digest = hashlib.sha256(files[present[0]]).hexdigest()
        if digest != address:
            report.add(
                label, "fail", f"hashes to {digest}, entry.json says {_shown(address)}: changed"
            )
        else:
            report.add(label, "pass", f"sha256 {digest}")


def _leaf(record: bytes, fields: Mapping[str, Any], proof: Mapping[str, Any]) -> tuple[bytes, str]:
    leaf = merkle.leaf_hash(record)
    if proof["seq"] != fields["seq"]:
        raise _Failed(f"proof.json is for entry {proof['seq']}, entry.json is {fields['seq']}")
    if proof.get("leaf_hash") != leaf.hex():
        raise _Failed(
            f"SHA-256(0x00 || entry.json) is {leaf.hex()}, proof.json says "
            f"{_shown(proof.get('leaf_hash'))}: entry.json was changed"
        )
    return leaf, leaf.hex()


def _certificates(pem: bytes, name: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        raise _Failed(f"{name} holds no readable PEM certificate")
    return certs


def _checkpoint(
    files: Mapping[str, bytes],
) -> tuple[tuple[list[x509.Certificate], cp.Checkpoint], str]:
    chain = _certificates(files["hub.pem"], "hub.pem")
    try:
        signed = cp.verify(files["checkpoint.txt"], files["checkpoint.p7s"], chain[:1])
    except cp.CheckpointError as err:
        raise _Failed(f"{_shown(str(err), 300)} (by {_name(chain[0])} of hub.pem)") from None
    fp = hashlib.sha256(chain[0].public_bytes(Encoding.DER)).hexdigest()
    detail = f"size {signed.size}, signed by {_name(chain[0])} (sha256 {fp})"
    return (chain, signed), detail


_HASH = re.compile(r"[0-9a-fA-F]{64}")


def _inclusion(
    leaf: bytes | None, proof: Mapping[str, Any], signed: cp.Checkpoint | None
) -> tuple[None, str]:
    if leaf is None or signed is None:
        raise _Failed("not checked: the leaf hash or the checkpoint did not verify")
    size, path = proof.get("size"), proof.get("audit_path")
    if not _is_seq(size) or size != signed.size:
        raise _Failed(f"proof.json is for size {_shown(size)}, the checkpoint for {signed.size}")
    if not isinstance(path, list) or not all(
        isinstance(h, str) and _HASH.fullmatch(h) for h in path
    ):
        raise _Failed("proof.json has no audit path of hex SHA-256 hashes")
    hashes = [bytes.fromhex(h) for h in path]
    if not merkle.verify_inclusion(leaf, proof["seq"], signed.size, hashes, signed.root):
        raise _Failed(
            f"the audit path ({len(hashes)} hashes) does not lead to the checkpoint root "
            f"{signed.root.hex()}"
        )
    return (
        None,
        f"entry {proof['seq']} is in the log of size {signed.size} (root {signed.root.hex()})",
    )


def _agency(
    files: Mapping[str, bytes],
    fields: Mapping[str, Any],
    addresses: Mapping[str, str],
    anchors: Sequence[x509.Certificate],
    report: Report,
) -> None:
    if "decrypted" not in addresses:
        why = (
            "no decrypted part: the message was not decrypted, or its signature did not verify "
            "on receipt (entry.json's reasons say which)"
            if fields.get("kind") == "message"
            else f"not a message (a {_shown(fields.get('kind'))} entry): no agency signature"
        )
        report.add("agency signature", "skip", why)
        return
    # Only a chain.pem that entry.json names is the signer's path as validated on receipt
    # (no other chain.pem gets past _members; this is said again here, where it matters).
    named = "chain" in addresses
    signed = _step(report, "agency signature", lambda: _agency_signature(files, named))
    if signed is None:
        return
    chain, _signing_time = signed  # the sender's own claim: not the moment to judge at
    if not chain:
        report.add(
            "agency chain",
            "skip",
            "entry.json names no chain: the signer's certificate path did not validate when "
            "the message was received (see reasons in entry.json)",
        )
    elif not anchors:
        report.add("agency chain", "skip", "no trust anchor given (--ca): chain.pem is taken as is")
    else:
        _step(report, "agency chain", lambda: _chain(chain, anchors, _received(fields)))


def _agency_signature(
    files: Mapping[str, bytes], named: bool
) -> tuple[tuple[list[x509.Certificate], datetime | None], str]:
    if "decrypted.eml" not in files:
        raise _Failed("decrypted.eml is missing")
    if named and "chain.pem" not in files:
        raise _Failed("chain.pem, named in entry.json, is missing")
    chain = _certificates(files["chain.pem"], "chain.pem") if named else []
    try:
        check = verify_signed_entity(files["decrypted.eml"], known=chain)
    except GatewayError as err:
        raise _Failed(f"decrypted.eml: {_shown(err.message, 300)}") from None
    if not chain:
        detail = f"signed by {_name(check.signer)}, the certificate the message carries"
        return ([], check.signing_time), detail
    if check.signer != chain[0]:
        raise _Failed("signed by another certificate than chain.pem's")
    return (chain, check.signing_time), f"signed by {_name(check.signer)}"


def _received(fields: Mapping[str, Any]) -> datetime:
    """When the message was received (the moment the gateway validated its signer at), else
    when it was filed."""
    transport = fields.get("transport")
    received = instant(transport.get("received_at") if isinstance(transport, Mapping) else None)
    return received or _at(fields)


def _at(fields: Mapping[str, Any]) -> datetime:
    at = instant(fields.get("at"))
    if at is not None:
        return at
    raise _Failed("entry.json has no valid time (ISO 8601, with its offset)")


def _chain(
    chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate], at: datetime
) -> tuple[None, str]:
    """The first of ``chain`` validates at ``at`` up to one of ``anchors``, the rest of
    ``chain`` path-building candidates only (RFC 5280 through :mod:`keys.trust`: each link a
    CA allowed to sign certificates within its path length, every certificate valid at
    ``at``). Revocation is not judged here: the evidence in the bundle is what was used on
    receipt, shown, not re-weighed."""
    try:
        store = TrustStore(tuple(anchors), tuple(chain[1:]), revocation_mode="soft-fail")
        path = store.validate_signer(chain[0], at=at).path
    except GatewayError as err:
        raise _Failed(_shown(err.message, 400)) from None
    top = path[-1]
    if len(path) == 1:
        return None, f"is the anchor {_name(top)}"
    return (
        None,
        f"{len(path) - 1} link(s) up to the anchor {_name(top)}, valid at {at:%Y-%m-%d %H:%M} UTC",
    )


def _hub_chain(
    chain: Sequence[x509.Certificate],
    signed: cp.Checkpoint,
    anchors: Sequence[x509.Certificate],
    hub_addresses: Sequence[str],
    origins: Sequence[str] = (),
) -> tuple[None, str]:
    """:func:`_chain` at the checkpoint's time, and the signer is the hub: it names one of
    ``hub_addresses``; and the checkpoint is of the log expected: its origin is one of
    ``origins`` or, none given, of ``hub_addresses``."""
    _, detail = _chain(chain, anchors, signed.at)
    named = sorted(emails_of(chain[0]))
    shown = ", ".join(_shown(a) for a in named) or "no address"
    wanted = comparable(hub_addresses)
    if not wanted:
        raise _Failed(
            f"{detail}, but is it the hub's? Any certificate under the anchor (an agency's) "
            f"can sign a checkpoint: give the hub's address (--hub-address); this one names "
            f"{shown}"
        )
    if not wanted & set(named):
        raise _Failed(f"the signer names {shown}, not the hub's address")
    origin = _shown(signed.origin)
    if origins and signed.origin not in origins:
        raise _Failed(f"checkpoint.txt gives origin {origin}, not the log you named (--origin)")
    if not origins and signed.origin not in wanted:
        raise _Failed(
            f"checkpoint.txt gives origin {origin}, not the hub's address (if the hub's "
            "[archive] origin names its log otherwise, give that name with --origin)"
        )
    return None, f"{detail}; the hub's certificate, for the log {origin}"


def _receipt(
    files: Mapping[str, bytes], seq: int, signed: cp.Checkpoint | None
) -> tuple[bool, str]:
    """Whether the receipt is proven under the checkpoint (False: only consistent with
    itself, which anyone could make), and what was found; :class:`_Failed` if it is wrong."""
    if "receipt.json" not in files or "receipt.eml" not in files:
        raise _Failed("receipt.json and receipt.eml come together")
    receipt = _json_object(files["receipt.json"], "receipt.json")
    address = _addresses(receipt, "receipt.json").get(RECEIPT_BLOB)
    answers = receipt.get(RECEIPT_FOR)
    if receipt.get("kind") != RECEIPT_KIND or not _is_seq(answers) or answers != seq:
        raise _Failed(f"receipt.json is not a receipt for entry {seq}")
    if hashlib.sha256(files["receipt.eml"]).hexdigest() != address:
        raise _Failed("receipt.eml does not hash to the receipt blob of receipt.json")
    number = _shown(receipt.get("seq"))
    if "receipt-proof.json" not in files:
        return False, (
            f"receipt entry {number} is not proven here (no receipt-proof.json: the checkpoint "
            "was signed before it was filed); export it in a bundle of its own"
        )
    if signed is None:
        raise _Failed("not checked: the checkpoint did not verify")
    proof = _json_object(files["receipt-proof.json"], "receipt-proof.json")
    path = proof.get("audit_path")
    if proof.get("seq") != receipt.get("seq") or not _is_seq(proof.get("seq")):
        raise _Failed("receipt-proof.json is not the proof of receipt.json's entry")
    if not isinstance(path, list) or not all(
        isinstance(h, str) and _HASH.fullmatch(h) for h in path
    ):
        raise _Failed("receipt-proof.json has no audit path of hex SHA-256 hashes")
    leaf = merkle.leaf_hash(files["receipt.json"])
    hashes = [bytes.fromhex(h) for h in path]
    if not merkle.verify_inclusion(leaf, proof["seq"], signed.size, hashes, signed.root):
        raise _Failed(
            f"receipt entry {number}: its audit path does not lead to the checkpoint root "
            "(receipt.json was changed, or is not the hub's)"
        )
    return True, f"receipt entry {number}, in the log under the same checkpoint"


def _name(cert: x509.Certificate) -> str:
    return f'"{_shown(cert.subject.rfc4514_string(), 300)}"'


def _scalar(value: Any) -> Any:
    """A value of entry.json fit for the report (not a structure built to choke its reader)."""
    return value if value is None or isinstance(value, str | int | float) else None


def _shown(value: object, limit: int = 120) -> str:
    """Text from the bundle as it may be printed: control characters escaped, cut short."""
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, int | float):
        text = repr(value)
    else:  # a structure: its type is enough (and its repr could recurse too deep)
        text = f"<{type(value).__name__}>"
    cut = text[:limit]
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return shown + ("…" if len(text) > limit else "")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_shown(str(exc), 200)}"
