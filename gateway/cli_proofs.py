"""``gateway archive prove``, ``export`` and ``verify-bundle``: the proofs the archive gives.

``prove`` checks an entry's inclusion (or one log's consistency with a later one) against a
signed checkpoint and says what it checked; ``export`` writes that proof, the entry and its
blobs into a bundle; ``verify-bundle`` checks a bundle with no database and no settings (only,
to pin the trust anchor, ``--ca``). Reads by a person are logged as in :mod:`gateway.cli_archive`.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from sqlalchemy.orm import Session

from archive import bundle, bundle_check, merkle
from archive import checkpoint as cp
from archive import tables as t
from archive.log import Entry, MissingNode
from archive.search import (
    newest_checkpoint,
)
from archive.service import Archive, hub_certificates, hub_signer, outside_trust
from formats.algorithms import signed_by
from formats.errors import InputError
from gateway.cli import Failure, emit_json
from gateway.cli_archive import (
    _opened,
    _read,
    _write_private,
    ca_option,
    hub_address_option,
    json_option,
    pinned_trust,
)
from gateway.cli_types import COUNT, SEQ
from keys import files, store

_ISSUER_ROLES = ("anchor", "intermediate", "ca", "hub")


def _verified(s: Session, row: t.Checkpoint) -> tuple[cp.Checkpoint, x509.Certificate]:
    signed, signer = cp.verify_signer(row.body, row.signature, hub_certificates(s))
    if (signed.size, signed.root) != (row.size, row.root):
        raise cp.CheckpointError(f"checkpoint #{row.id}: its columns differ from its signed body")
    return signed, signer


def _checkpoint_for(s: Session, seq: int | None, size: int | None) -> t.Checkpoint | None:
    row = newest_checkpoint(s, size=size)
    if size is None and seq is not None and (row is None or row.size <= seq):
        covers = f"the newest covers {row.size} entries" if row else "there is none"
        raise Failure(
            f"no signed checkpoint covers entry {seq} yet ({covers}); sign one with "
            "`gateway archive checkpoint`"
        )
    return row


#: Judges a checkpoint's signer against trust from outside the database (`prove --ca`): the
#: ``signer_check`` of its JSON, ``{"status": "pass" | "fail", "detail": …}``.
_Judge = Callable[[cp.Checkpoint, x509.Certificate], dict[str, str]]


def _checkpoint_json(
    s: Session, row: t.Checkpoint | None, judge: _Judge | None = None
) -> dict[str, Any] | None:
    if row is None:
        return None
    signed, signer = _verified(s, row)
    out = {
        "id": row.id,
        "size": signed.size,
        "root": signed.root.hex(),
        "at": signed.at.isoformat(),
        "signer": signer.subject.rfc4514_string(),
        "body": row.body.decode(),
        "signature": base64.b64encode(row.signature).decode(),
    }
    if judge is not None:
        out["signer_check"] = judge(signed, signer)
    return out


def _outside_judge(s: Session, anchors: list[x509.Certificate], hubs: tuple[str, ...]) -> _Judge:
    """A signer passes if it names one of ``hubs`` and its path to ``anchors`` (stored CA
    certificates as candidates only) validates at the checkpoint's signed time, as for
    `archive verify --ca` (:func:`archive.service.hub_signer`)."""
    trust = outside_trust(s, anchors)

    def judge(signed: cp.Checkpoint, signer: x509.Certificate) -> dict[str, str]:
        try:
            address = hub_signer(trust, signer, at=signed.at, hub_addresses=hubs)
        except cp.CheckpointError as err:
            return {"status": "fail", "detail": str(err)}
        return {
            "status": "pass",
            "detail": f"its path to the CA you gave validates at {signed.at.isoformat()}, and "
            f"it names {address}",
        }

    return judge


#: One line of `prove`'s report: PASS, FAIL or SKIP, what was checked, what was found.
_Check = tuple[str, str, str]


def _check(ok: bool, name: str, passed: str, failed: str) -> _Check:
    return ("pass", name, passed) if ok else ("fail", name, failed)


def _hashes(path: list[bytes]) -> str:
    return "1 hash" if len(path) == 1 else f"{len(path)} hashes"


def _signed_check(name: str, signed: dict[str, Any] | None, root: bytes, size: int) -> _Check:
    """Whether the checkpoint ``signed`` (its signature already verified) has ``root``."""
    if signed is None:
        return (
            "skip", name,
            f"no signed checkpoint has size {size}: root {root.hex()} is the database's own "
            "word (compare it with a tree head kept outside: `archive verify --kept FILE`)",
        )  # fmt: skip
    by = (
        f"#{signed['id']}, signed {signed['at']} by {signed['signer']} (a hub certificate the "
        "database holds)"
    )
    if signed["root"] == root.hex():
        return "pass", name, f"{by}, has this root"
    return "fail", name, f"{by}, has another root ({signed['root']}): the log was rewritten"


def _signer_checks(name: str, signed: dict[str, Any] | None) -> list[_Check]:
    """The ``signer_check`` of ``signed`` as a line (none without --ca or a checkpoint)."""
    check = signed.get("signer_check") if signed else None
    return [] if check is None else [(check["status"], name, check["detail"])]


def _inclusion_report(
    seq: int, n: int, root: bytes, entry: Entry, path: list[bytes], signed: dict[str, Any] | None
) -> tuple[bool, str, list[_Check]]:
    """Whether entry ``seq`` is proven in the tree of ``n`` entries: a headline and each
    check (the same facts as the JSON's ``verified``)."""
    leaf = merkle.leaf_hash(entry.record)
    checks = [
        _check(
            leaf == entry.leaf_hash, "leaf hash",
            f"entry {seq}'s record hashes to {leaf.hex()}, the leaf stored",
            f"entry {seq}'s record hashes to {leaf.hex()}, but the log stored "
            f"{entry.leaf_hash.hex()}: the record was changed",
        ),
        _check(
            merkle.verify_inclusion(leaf, seq, n, path, root), "audit path",
            f"an audit path of {_hashes(path)} leads from the leaf to the root (RFC 9162 "
            "§2.1.3.2)",
            f"an audit path of {_hashes(path)} does not lead from the leaf to the root",
        ),
        _signed_check("checkpoint", signed, root, n),
        *_signer_checks("signer", signed),
    ]  # fmt: skip
    what = f"entry {seq} is in the tree of {n} entries with root {root.hex()}"
    return all(c[0] != "fail" for c in checks), what, checks


def _consistency_report(
    old: int, new: int, roots: tuple[bytes, bytes], path: list[bytes],
    signed: tuple[dict[str, Any] | None, dict[str, Any] | None],
) -> tuple[bool, str, list[_Check]]:  # fmt: skip
    """Whether the tree of ``old`` entries is proven a prefix of the tree of ``new``."""
    old_root, new_root = roots
    checks = [
        _check(
            merkle.verify_consistency(old, new, old_root, new_root, path), "consistency proof",
            f"a proof of {_hashes(path)} leads from the old root to the new (RFC 9162 §2.1.4.2)",
            f"a proof of {_hashes(path)} does not lead from the old root to the new: entries of "
            "the old tree were rewritten",
        ),
        _signed_check("old checkpoint", signed[0], old_root, old),
        *_signer_checks("old signer", signed[0]),
        _signed_check("new checkpoint", signed[1], new_root, new),
        *_signer_checks("new signer", signed[1]),
    ]  # fmt: skip
    what = (
        f"the tree of {old} entries (root {old_root.hex()}) is a prefix of the tree of {new} "
        f"entries (root {new_root.hex()})"
    )
    return all(c[0] != "fail" for c in checks), what, checks


@click.command("prove")
@click.argument("seq", type=SEQ, required=False)
@click.option("--size", type=COUNT, help="Prove against the tree of this size.")
@click.option(
    "--consistency", nargs=2, type=COUNT, metavar="OLD NEW",
    help="Instead: prove the log of OLD entries is a prefix of the log of NEW.",
)  # fmt: skip
@ca_option
@hub_address_option
@click.option(
    "--json", "as_json", is_flag=True,
    help="Print the proof itself (hashes, audit path, signed checkpoint; with --ca, each "
    "checkpoint's signer_check: status pass or fail, and detail), to check elsewhere.",
)  # fmt: skip
@click.pass_context
def prove_cmd(
    ctx: click.Context,
    seq: int | None,
    size: int | None,
    consistency: tuple[int, int] | None,
    anchors: tuple[Path, ...],
    hub_addresses: tuple[str, ...],
    as_json: bool,
) -> None:
    """Prove entry SEQ is in the log (against the newest checkpoint, or the tree of --size
    entries), or with --consistency that an older log is a prefix of a newer one. Prints what
    was checked; --json prints the proof. Exit 0 if it verifies, 1 if not. Without --ca, a
    checkpoint's signature is checked against the hub certificates the database holds, which
    whoever can write the database could replace."""
    if (seq is None) == (not consistency):
        raise Failure("give either SEQ or --consistency OLD NEW")
    trusted, hubs = pinned_trust(ctx, anchors, hub_addresses)
    # The same checks again, as JSON: the CA and addresses given too.
    pinned = "".join(
        [*(f" --ca {shlex.quote(str(p))}" for p in anchors),
         *(f" --hub-address {shlex.quote(h)}" for h in hub_addresses)]
    )  # fmt: skip
    try:
        with _opened(ctx) as a, a.db.session() as s:
            found = _prove(a, s, seq, size, consistency, trusted, hubs, pinned)
    except MissingNode as err:  # no proof can be made: a check failed, not a usage error
        if as_json:
            emit_json({"verified": False, "problem": str(err)})
        else:
            click.echo(
                f"FAIL  tree: {err} (altered or damaged: `gateway archive verify` says more)"
            )
            click.echo("proof does NOT verify")
        ctx.exit(1)
    verified, what, checks, out, again = found
    if as_json:
        emit_json(out)
    else:
        click.echo(f"proving that {what}")
        for status, name, detail in checks:
            click.echo(f"{status.upper():<5} {name}: {detail}")
        click.echo("proof verifies" if verified else "proof does NOT verify")
        click.echo(
            f"the proof itself (hashes, signed checkpoint), to check elsewhere: `{again}`"
            + ("" if consistency else f"; a bundle that needs no database: `gateway archive "
               f"export {seq} --out FILE`")
        )  # fmt: skip
    ctx.exit(0 if verified else 1)


def _prove(
    a: Archive,
    s: Session,
    seq: int | None,
    size: int | None,
    consistency: tuple[int, int] | None,
    trusted: list[x509.Certificate],
    hubs: tuple[str, ...],
    pinned: str,
) -> tuple[bool, str, list[tuple[str, str, str]], dict[str, Any], str]:
    """The proof asked for, its checks, and the command that gives it again as JSON."""
    judge = _outside_judge(s, trusted, hubs) if trusted else None
    if consistency:
        old, new = consistency
        path = a.log.consistency(s, old, new)
        old_root, new_root = a.log.root(s, old), a.log.root(s, new)
        signed_old = _checkpoint_json(s, _checkpoint_for(s, None, old), judge)
        signed_new = _checkpoint_json(s, _checkpoint_for(s, None, new), judge)
        verified, what, checks = _consistency_report(
            old, new, (old_root, new_root), path, (signed_old, signed_new)
        )
        out: dict[str, Any] = {
            "old": old, "new": new, "old_root": old_root.hex(), "new_root": new_root.hex(),
            "proof": [h.hex() for h in path], "verified": verified,
            "old_checkpoint": signed_old, "new_checkpoint": signed_new,
        }  # fmt: skip
        again = f"gateway archive prove --consistency {old} {new}{pinned} --json"
        _read(a, s, "prove", f"consistency {old} {new}")
    else:
        assert seq is not None
        entry = a.log.entry(s, seq)
        row = _checkpoint_for(s, seq, size)
        n = size if size is not None else row.size if row else 0
        path = a.log.inclusion(s, seq, n)
        root = a.log.root(s, n)
        signed = _checkpoint_json(s, row, judge)
        verified, what, checks = _inclusion_report(seq, n, root, entry, path, signed)
        out = {
            "seq": seq, "size": n, "leaf_hash": merkle.leaf_hash(entry.record).hex(),
            "root": root.hex(), "audit_path": [h.hex() for h in path], "verified": verified,
            "checkpoint": signed,
        }  # fmt: skip
        sized = f" --size {size}" if size is not None else ""
        again = f"gateway archive prove {seq}{sized}{pinned} --json"
        _read(a, s, "prove", f"entry {seq} size {n}")
    return verified, what, checks, out, again


def _issuers(s: Session, cert: x509.Certificate) -> list[x509.Certificate]:
    """``cert`` and the chain above it from the key store (for hub.pem)."""
    pool = [c.certificate for c in store.certificates(s, role=_ISSUER_ROLES)]
    chain = [cert]
    while len(chain) < 8 and chain[-1].issuer != chain[-1].subject:
        for candidate in pool:
            if signed_by(chain[-1], candidate):
                chain.append(candidate)
                break
        else:
            break
    return chain


@click.command("export")
@click.argument("seq", type=SEQ)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@json_option
@click.pass_context
def export_cmd(ctx: click.Context, seq: int, out: Path, as_json: bool) -> None:
    """Write the evidence bundle of entry SEQ (a zip that verify-bundle checks offline)."""
    with _opened(ctx) as a, a.db.session() as s:
        entry = a.log.entry(s, seq)
        row = _checkpoint_for(s, seq, None)
        assert row is not None
        _, signer = _verified(s, row)
        receipt_record, receipt, receipt_path = a.receipt_for(s, seq, row.size)
        data = bundle.build(
            bundle.Contents(
                record=entry.record,
                blobs={name: a.blobs.get(s, addr) for name, addr in entry.blobs.items()},
                size=row.size,
                audit_path=a.log.inclusion(s, seq, row.size),
                checkpoint_body=row.body,
                checkpoint_signature=row.signature,
                hub_chain=_issuers(s, signer),
                receipt_record=receipt_record,
                receipt=receipt,
                receipt_path=receipt_path,
            )
        )
        _read(a, s, "export", f"entry {seq}")
    _write_private(out, data)
    result = {
        "seq": seq, "out": str(out), "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "checkpoint": row.id, "size": row.size,
        "receipt": receipt is not None,
    }  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        click.echo(f"wrote {out}: entry {seq} under checkpoint #{row.id} (size {row.size})")


@click.command("verify-bundle")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--ca", "anchors", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
    help="Require the hub's and agency's chains to end at this trust anchor (repeatable).",
)  # fmt: skip
@click.option(
    "--hub-address", "hub_addresses", multiple=True, metavar="ADDRESS",
    help="With --ca: the hub's address, which the checkpoint's signer must name (repeatable; "
    "any certificate under the anchor, an agency's too, could sign a checkpoint).",
)  # fmt: skip
@click.option(
    "--origin", "origins", multiple=True, metavar="NAME",
    help="With --ca: the name of the log, which the checkpoint's origin must be (repeatable; "
    "default: the hub's address, as when the hub's [archive] origin is unset).",
)  # fmt: skip
@json_option
@click.pass_context
def verify_bundle_cmd(
    ctx: click.Context,
    path: Path,
    anchors: tuple[Path, ...],
    hub_addresses: tuple[str, ...],
    origins: tuple[str, ...],
    as_json: bool,
) -> None:
    """Check an evidence bundle offline: no database, no settings. Exit 0 if it verifies.
    With --ca, give the hub's address (--hub-address) as well, from a source you trust."""
    try:
        data = bundle_check.read_bundle(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    if (hub_addresses or origins) and not anchors:
        given = "--hub-address" if hub_addresses else "--origin"
        raise InputError(f"{given} is checked against the hub chain: give --ca too")
    trusted = [cert for p in anchors for cert in files.load_certificates(p)]
    report = (
        data
        if isinstance(data, bundle_check.Report)
        else bundle_check.verify_bundle(
            data, anchors=trusted, hub_addresses=hub_addresses, origins=origins
        )
    )
    if as_json:
        emit_json(report.as_dict())
    else:
        for c in report.checks:
            click.echo(f"{c.status.upper():<5} {c.name}: {c.detail}")
        click.echo("bundle verifies" if report.ok else "bundle does NOT verify")
    ctx.exit(0 if report.ok else 1)
