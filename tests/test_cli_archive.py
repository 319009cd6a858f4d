"""``gateway archive …`` on a real home: a key store with the demo hub key, an archive of real
verdicts, and the commands as an archivist runs them (exit codes, --json, reads logged)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select

from archive import bundle_check
from archive import checkpoint as cp
from archive import tables as t
from archive.blobs import BlobStore, load_master_key
from archive.db import Database
from archive.service import Archive
from gateway import cli, cli_archive, settings
from gateway.demo import HUB_ADDRESS, DemoWorld
from keys import store
from keys.issuing import issue_hub, make_root
from tests.conftest import WORLD_AT
from tests.test_bundle import file_messages

PASSPHRASE = b"demo passphrase for the archive tests"


@pytest.fixture(scope="module")
def template(
    world: DemoWorld, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, int]]:
    """A home whose archive holds the three verdicts, a receipt and a checkpoint."""
    home = tmp_path_factory.mktemp("template") / "home"
    world.write_home(home, PASSPHRASE)
    conf = settings.load(home)
    db = Database.open(conf.database_url)
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    with db.session() as s:
        store.add_certificate(s, world.root.cert, role="anchor", at=WORLD_AT, actor="test")
        store.add_private_key(
            s, world.hub.cert, key, role="hub", passphrase=PASSPHRASE, at=WORLD_AT, actor="test"
        )
    master = load_master_key(conf.path(conf.archive.master_key_file), create=True)
    archive = Archive(db, BlobStore(master), HUB_ADDRESS, signer=(world.hub.cert, key))
    seqs = file_messages(archive, world)
    db.dispose()
    return home, seqs


@pytest.fixture
def home(template: tuple[Path, dict[str, int]], tmp_path: Path) -> Path:
    """A fresh copy per test: reads append to the log."""
    return Path(shutil.copytree(template[0], tmp_path / "home"))


@pytest.fixture
def seqs(template: tuple[Path, dict[str, int]]) -> dict[str, int]:
    return template[1]


def run(home: Path, *args: str | Path) -> Result:
    return CliRunner().invoke(cli.cli, ["--home", str(home), "archive", *map(str, args)])


def ok(home: Path, *args: str | Path) -> Result:
    result = run(home, *args)
    assert result.exit_code == 0, result.output + result.stderr
    return result


def entries(home: Path) -> list[dict[str, object]]:
    data = json.loads(ok(home, "list", "--json", "--limit", "1000").stdout)
    assert isinstance(data, list)
    return data


def reads(home: Path) -> list[dict[str, object]]:
    return [e for e in entries(home) if e["kind"] == "read"]


# --- list, search, show ----------------------------------------------------------------------


def test_list_lines_say_what_each_entry_is_in_vietnam_time(
    home: Path, seqs: dict[str, int]
) -> None:
    """A receipt's line names its status, agency and the message it answers; times are shown
    with their offset, in Vietnam time, as --from/--to read a time without one."""
    data = {e["seq"]: e for e in entries(home)}
    text = ok(home, "list", "--limit", "1000").stdout
    receipt = data[seqs["receipt"]]
    [shown] = [ln for ln in text.splitlines() if ln.split()[0] == str(seqs["receipt"])]
    assert f"for {receipt['for_seq']}" in shown and "+0700" in shown
    local = datetime.fromisoformat(receipt["at"]).astimezone(timezone(timedelta(hours=7)))
    assert local.strftime("%Y-%m-%d %H:%M:%S") in shown
    stamp = local.strftime("%Y-%m-%dT%H:%M:%S")  # read as Vietnam time
    found = ok(home, "search", "--from", stamp, "--to", stamp[:-2] + "59", "--json").stdout
    assert seqs["receipt"] in [e["seq"] for e in json.loads(found)]


def test_list_shows_every_entry_in_order(home: Path, seqs: dict[str, int]) -> None:
    items = entries(home)
    assert [e["seq"] for e in items] == list(range(len(items)))
    kinds = {e["seq"]: e["kind"] for e in items}
    assert kinds[seqs["accepted"]] == "message"
    assert kinds[seqs["receipt"]] == "receipt"
    assert {e["status"] for e in items if e["kind"] == "message"} == {
        "accepted", "rejected", "quarantined"
    }  # fmt: skip
    text = ok(home, "list", "--kind", "message").stdout
    assert "accepted H26.SNV work-permit 2026-10" in text
    assert "quarantined - - -" in text
    paged = json.loads(ok(home, "list", "--json", "--after", seqs["accepted"], "--limit", 1).stdout)
    assert [e["seq"] for e in paged] == [seqs["accepted"] + 1]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--status", "accepted"], ["accepted"]),
        (["--agency", "H26.SNV"], ["accepted", "rejected"]),
        (["--category", "work-permit", "--period", "2026-10"], ["accepted", "rejected"]),
        (["--from", "2026-11-02", "--to", "2026-11-02", "--kind", "message"], ["accepted", "rejected", "quarantined"]),
        (["--from", "2026-11-03"], []),
        (["--to", "2026-11-01"], []),
        (["--from", "2026-11-02T03:05:01Z", "--kind", "message"], ["rejected", "quarantined"]),
        (["--kind", "receipt"], ["receipt"]),
    ],
)  # fmt: skip
def test_search_filters(
    home: Path, seqs: dict[str, int], options: list[str], expected: list[str]
) -> None:
    found = json.loads(ok(home, "search", "--json", *options).stdout)
    names = {v: k for k, v in seqs.items()}
    assert [names[e["seq"]] for e in found] == expected


def test_search_by_identifiers(home: Path, seqs: dict[str, int]) -> None:
    shown = json.loads(ok(home, "show", seqs["rejected"], "--json").stdout)["fields"]
    for option, value in [
        ("--digest", shown["digest"]),
        ("--digest", shown["digest"].upper()),
        ("--document-id", shown["document_id"]),
        ("--message-id", shown["message_id"]),
    ]:
        found = json.loads(ok(home, "search", "--json", option, value).stdout)
        assert [e["seq"] for e in found] == [seqs["rejected"]], option


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--period", "2026-13"], "is not YYYY-MM"),
        (["--from", "yesterday"], "is not a date or ISO time"),
        (["--digest", "abc"], "64 hex digits"),
        (["--from", "2026-11-05", "--to", "2026-11-01"], "before its start"),
    ],
)
def test_bad_search_options_are_one_line_errors(
    home: Path, options: list[str], message: str
) -> None:
    result = run(home, "search", *options)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [("search", "--status", "bogus"), ("search", "--status", "ACCEPTED"),
     ("list", "--kind", "bogus"), ("search", "--kind", "messages")],
)  # fmt: skip
def test_an_unknown_status_or_kind_is_refused_not_found_in_no_entry(
    home: Path, args: tuple[str, ...]
) -> None:
    """A mistyped verdict or kind printed "(no entries)" with exit 0: as if nothing had been
    filed so."""
    result = run(home, *args)
    assert result.exit_code == 2
    assert f"'{args[-1]}' is not one of" in result.stderr


def test_a_blob_is_never_printed_as_if_it_were_json(home: Path, seqs: dict[str, int]) -> None:
    """`show --blob NAME --json` printed the raw blob: a script reading JSON got XML."""
    result = run(home, "show", seqs["accepted"], "--blob", "payload", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "leave out --json" in result.stderr


def test_every_kind_filed_can_be_asked_for(home: Path) -> None:
    assert {e["kind"] for e in entries(home)} <= set(cli_archive.ENTRY_KINDS)


def test_show_prints_fields_and_blob_sizes_never_content(home: Path, seqs: dict[str, int]) -> None:
    shown = json.loads(ok(home, "show", seqs["accepted"], "--json").stdout)
    assert shown["fields"]["status"] == "accepted"
    assert shown["fields"]["agency"] == "H26.SNV"
    assert len(shown["leaf_hash"]) == 64
    blobs = {b["name"]: b for b in shown["blobs"]}
    assert set(blobs) == {"raw", "decrypted", "payload", "chain", "evidence-1"}
    assert all(b["size"] > 0 for b in blobs.values())
    text = ok(home, "show", seqs["accepted"]).stdout
    assert "status: accepted" in text
    assert "Nguyen Thi Lan Anh" not in text + json.dumps(shown)  # a person in the payload


def test_show_blob_writes_the_bytes(home: Path, seqs: dict[str, int], tmp_path: Path) -> None:
    out = tmp_path / "payload.xml"
    ok(home, "show", seqs["accepted"], "--blob", "payload", "--out", out)
    assert b"Nguyen Thi Lan Anh" in out.read_bytes()
    assert out.stat().st_mode & 0o077 == 0
    printed = ok(home, "show", seqs["accepted"], "--blob", "payload").stdout_bytes
    assert printed == out.read_bytes()
    missing = run(home, "show", seqs["quarantined"], "--blob", "payload")
    assert missing.exit_code == 2
    assert "has no blob 'payload' (it has: raw)" in missing.stderr


def test_every_read_by_a_person_is_logged(home: Path, seqs: dict[str, int], tmp_path: Path) -> None:
    before = len(reads(home))  # `list` itself is a read too
    seq = seqs["accepted"]
    ok(home, "show", seq)
    ok(home, "show", seq, "--blob", "raw", "--out", tmp_path / "raw.eml")
    ok(home, "search", "--agency", "H26.SNV")
    ok(home, "prove", seq)
    ok(home, "export", seq, "--out", tmp_path / "b.zip")
    logged = reads(home)[before:]
    assert [(r["action"], r["target"]) for r in logged] == [
        ("list", "limit=1000"),
        ("show", f"entry {seq}"),
        ("show", f"entry {seq} blob raw"),
        ("search", "agency=H26.SNV limit=100"),
        ("prove", f"entry {seq} size {seqs['receipt'] + 1}"),
        ("export", f"entry {seq}"),
    ]
    assert {r["actor"] for r in logged} == {cli.actor()}


# --- verify, checkpoint, prove ---------------------------------------------------------------


def test_verify_passes_and_names_tampering(home: Path, seqs: dict[str, int]) -> None:
    assert "archive verifies" in ok(home, "verify").stdout
    report = json.loads(ok(home, "verify", "--json", "--no-blobs").stdout)
    assert report["ok"] is True
    assert report["checkpoints"] == 1
    db = Database.open(settings.load(home).database_url)
    with db.engine.begin() as c:
        c.exec_driver_sql(
            "UPDATE log_entries SET status = 'accepted' WHERE seq = ?", (seqs["rejected"],)
        )
    db.dispose()
    bad = run(home, "verify")
    assert bad.exit_code == 1
    assert f"PROBLEM: entry {seqs['rejected']}: search column status" in bad.stdout


def test_verify_of_a_rewritten_log_never_advises_signing_a_checkpoint(
    home: Path, seqs: dict[str, int]
) -> None:
    """A changed record fails the checkpoints that cover it, and verify said those entries were
    covered by none yet and that `archive checkpoint` signs one now: an auditor doing so would
    have signed over the rewritten log."""
    db = sqlite3.connect(home / "archive.db")
    with db:
        db.execute(
            "UPDATE log_entries SET record = CAST(REPLACE(CAST(record AS TEXT), 'rejected', "
            "'accepted') AS BLOB) WHERE seq = ?",
            (seqs["rejected"],),
        )
    db.close()
    bad = run(home, "verify", "--no-blobs")
    assert bad.exit_code == 1 and "PROBLEM: " in bad.stdout
    assert "covered by no checkpoint that verifies; sign none" in bad.stdout
    assert "signs one now" not in bad.stdout


def test_verify_with_the_ca_trusts_the_hub_and_not_an_agency_planted_as_the_hub(
    home: Path, world: DemoWorld, tmp_path: Path
) -> None:
    """`verify --ca ROOT`: the hub's certificate passes; the police's, issued by the same root
    and written into the database as a hub certificate, signs no checkpoint: it does not name
    the hub's address ([hub] address)."""
    (tmp_path / "root.pem").write_bytes(world.root.cert_pem())
    assert (
        "archive verifies" in ok(home, "verify", "--no-blobs", "--ca", tmp_path / "root.pem").stdout
    )
    police = world.agencies["H26.CATP"]
    key = police.key
    assert isinstance(key, rsa.RSAPrivateKey)
    db = Database.open(settings.load(home).database_url)
    with db.session() as s:
        store.add_certificate(s, police.cert, role="hub", at=WORLD_AT, actor="intruder")
        row = s.scalars(select(t.Checkpoint)).one()
        row.signature = cp.sign(cp.Checkpoint.parse(row.body), police.cert, key)
    db.dispose()
    assert "archive verifies" in ok(home, "verify", "--no-blobs").stdout  # the database's word
    bad = run(home, "verify", "--no-blobs", "--ca", tmp_path / "root.pem")
    assert bad.exit_code == 1
    assert f"does not name the hub's address ({HUB_ADDRESS})" in bad.stdout
    assert "checkpoint #1" in bad.stdout
    # The hub's address then, given by hand when it has changed since: the same verdict for the
    # police; an address no certificate names refuses the hub's own too.
    root = tmp_path / "root.pem"
    assert "CN=Official-mail" not in run(home, "verify", "--no-blobs", "--ca", root).stdout
    other = run(home, "verify", "--no-blobs", "--ca", root, "--hub-address", "old@hub.vn")
    assert other.exit_code == 1 and other.stdout.count("does not name the hub's address") == 2
    given = run(home, "verify", "--no-blobs", "--ca", root, "--hub-address", HUB_ADDRESS)
    assert given.stdout.count("does not name the hub's address") == 1


def test_verify_against_a_tree_head_kept_outside_finds_an_older_copy_put_back(
    home: Path, tmp_path: Path
) -> None:
    """An older copy of the database put back is a consistent log: `verify` alone passes it.
    A tree head saved off-host (`checkpoint --json`, or a bundle's checkpoint.txt) given with
    --kept shows the entries gone; a root that differs shows entries rewritten."""
    db_file = home / "archive.db"
    older = tmp_path / "older.db"
    shutil.copy(db_file, older)
    entries(home)  # a read, logged: the log grows past the older copy
    made = ok(home, "checkpoint", "--json").stdout
    (tmp_path / "kept.json").write_text(made)
    db = Database.open(settings.load(home).database_url)
    with db.session() as s:
        body = s.scalars(select(t.Checkpoint).order_by(t.Checkpoint.id.desc())).first().body
    db.dispose()
    (tmp_path / "checkpoint.txt").write_bytes(body)
    kept = ("--kept", tmp_path / "kept.json", "--kept", tmp_path / "checkpoint.txt")
    good = ok(home, "verify", "--no-blobs", *kept).stdout
    assert "archive verifies" in good and "2 kept outside" in good
    assert json.loads(ok(home, "verify", "--no-blobs", "--json", *kept).stdout)["kept"] == 2

    shutil.copy(older, db_file)
    assert "archive verifies" in ok(home, "verify", "--no-blobs").stdout  # consistent, older
    bad = run(home, "verify", "--no-blobs", *kept)
    assert bad.exit_code == 1, bad.output
    size = json.loads(made)["size"]
    assert bad.stdout.count(f"a tree head kept outside the database covers {size} entries") == 2
    assert "an older copy of the database was put back" in bad.stdout

    other = {**json.loads(made), "size": 1, "root": "ab" * 32}
    (tmp_path / "other.json").write_text(json.dumps({"checkpoint": other}))  # as prove nests it
    bad = run(home, "verify", "--no-blobs", "--kept", tmp_path / "other.json")
    assert bad.exit_code == 1
    assert "the first 1 entries no longer hash to the root" in bad.stdout

    for text in ["{}", '{"size": -1, "root": "00"}', "[1]", "not json", '{"size": true}']:
        (tmp_path / "junk.json").write_text(text)
        junk = run(home, "verify", "--no-blobs", "--kept", tmp_path / "junk.json")
        assert junk.exit_code == 2, (text, junk.output)
        assert "not a tree head" in junk.output and "Traceback" not in junk.output


#: Direct edits of the database that once stopped `archive verify` with an internal error (a
#: wrong type where a value is read), each with what the report must say instead.
ODD_EDITS = {
    "a record that is a JSON array": (
        "UPDATE log_entries SET record = CAST('[]' AS BLOB) WHERE seq = 3",
        "entry 3: its record is not a JSON object",
    ),
    "a time column that is no time": (
        "UPDATE log_entries SET at = 'yesterday' WHERE seq = 3",
        "entry 3: time column says 'yesterday'",
    ),
    "an admin event's detail that is no JSON": (
        "UPDATE admin_events SET detail = '{bad' WHERE seq = (SELECT min(seq) FROM admin_events)",
        "differs from its log entry",
    ),
    "a hub certificate that is no certificate": (
        "UPDATE certificates SET der = X'3000' WHERE role = 'hub'",
        "is no certificate (damaged or rewritten)",
    ),
    "a blob's sealed bytes made text that is not UTF-8": (
        "UPDATE blobs SET sealed = X'ff' || substr(sealed, 2) WHERE rowid = 1",
        "its sealed bytes were rewritten",
    ),
    "a data key made text that is not UTF-8": (
        "UPDATE data_keys SET wrapped = X'ff' || substr(wrapped, 2)",
        "data key 1 does not open",
    ),
    "a record made text that is not UTF-8": (
        "UPDATE log_entries SET record = X'ff' || substr(record, 2) WHERE seq = 3",
        "entry 3: its record was changed",
    ),
}


def test_verify_says_which_entries_no_checkpoint_covers(home: Path) -> None:
    """With every checkpoint deleted, a rewritten log verifies (nothing signed disagrees):
    verify says which entries no checkpoint covers, and the JSON gives the count covered."""
    report = json.loads(ok(home, "verify", "--no-blobs", "--json").stdout)
    assert 0 < report["covered"] <= report["entries"]
    db = sqlite3.connect(home / "archive.db")
    with db:
        db.execute("DELETE FROM checkpoints")
    db.close()
    text = ok(home, "verify", "--no-blobs").stdout
    entries = json.loads(ok(home, "verify", "--no-blobs", "--json").stdout)["entries"]
    assert f"NOTE: entries 0 to {entries - 1} are covered by no checkpoint yet" in text


def test_verify_compares_the_key_store_with_the_admin_events(home: Path, world: DemoWorld) -> None:
    """A trust anchor written straight into the database (the gateway would trust what it
    signs), a certificate row given another certificate's bytes, a window widened, a
    certificate deleted: none has the admin event that would explain it."""
    conf = settings.load(home)
    database = Database.open(conf.database_url)
    with database.session() as s:
        agency = world.directory.get("H26.CATP")
        assert agency is not None
        store.add_agency(s, agency, at=WORLD_AT, actor="t")
        police = world.agencies["H26.CATP"].cert
        store.add_certificate(s, police, role="agency", organ_id="H26.CATP", at=WORLD_AT, actor="t")
    database.dispose()
    assert "archive verifies" in ok(home, "verify", "--no-blobs").stdout
    rogue = make_root("Rogue root", at=WORLD_AT)
    der = rogue.cert.public_bytes(Encoding.DER)
    db = sqlite3.connect(home / "archive.db")
    with db:
        db.execute(
            "INSERT INTO certificates (sha256, role, subject, issuer, serial, emails, not_before,"
            " not_after, der, source, imported_at) VALUES (?, 'anchor', 'CN=Rogue root',"
            " 'CN=Rogue root', '1', '', '2026-01-01 00:00:00.000000',"
            " '2036-01-01 00:00:00.000000', ?, '', '2026-11-02 00:00:00.000000')",
            (hashlib.sha256(der).hexdigest(), der),
        )
        root = db.execute("SELECT der FROM certificates WHERE role = 'anchor'").fetchone()[0]
        db.execute("UPDATE certificates SET der = ? WHERE role = 'hub'", (root,))
        db.execute(
            "UPDATE certificates SET use_until = '2099-01-01 00:00:00.000000' WHERE role = 'anchor'"
        )
        (gone,) = db.execute("SELECT sha256 FROM certificates WHERE role = 'agency'").fetchone()
        db.execute("DELETE FROM certificates WHERE role = 'agency'")
    db.close()
    bad = run(home, "verify", "--no-blobs")
    assert bad.exit_code == 1
    out = bad.stdout
    assert "(anchor, CN=Rogue root) is in the key store, but no admin event added it" in out
    assert "its DER is another certificate than its fingerprint names" in out
    assert "(anchor, CN=Hanoi" in out and "differs from what admin events made it" in out
    assert f"certificate {gone[:16]}… added by admin event" in out and "(deleted)" in out


def test_verify_reports_an_admin_record_whose_fingerprint_is_no_text(home: Path) -> None:
    """A certificate event's record rewritten so that its sha256 is a list: the record is
    reported as changed, and the key store check does not stop on it."""
    db = sqlite3.connect(home / "archive.db")
    with db:
        seq, raw = db.execute(
            "SELECT seq, record FROM log_entries WHERE kind = 'admin'"
            " AND CAST(record AS TEXT) LIKE ?",
            ("%certificate.add%",),
        ).fetchone()
        record = json.loads(raw)
        record["detail"]["sha256"] = [record["detail"]["sha256"]]
        edited = json.dumps(record).encode()
        db.execute("UPDATE log_entries SET record = ? WHERE seq = ?", (edited, seq))
    db.close()
    result = run(home, "verify", "--no-blobs")
    assert result.exit_code == 1, result.output
    assert f"entry {seq}: its record was changed" in result.stdout
    assert "internal error" not in result.output


@pytest.mark.parametrize("edit", ODD_EDITS)
def test_verify_reports_odd_edits_and_never_stops(home: Path, edit: str) -> None:
    sql, said = ODD_EDITS[edit]
    db = sqlite3.connect(home / "archive.db")
    with db:
        db.execute(sql)
    db.close()
    result = run(home, "verify")
    assert result.exit_code == 1, result.output
    assert said in result.stdout, result.stdout
    assert "does NOT verify" in result.stdout and "internal error" not in result.output


def test_verify_sees_a_checkpoint_time_changed_and_wants_the_ca_with_a_hub_address(
    home: Path,
) -> None:
    db = Database.open(settings.load(home).database_url)
    with db.engine.begin() as c:
        c.exec_driver_sql("UPDATE checkpoints SET at = '2001-01-01 00:00:00.000000'")
    db.dispose()
    bad = run(home, "verify", "--no-blobs")
    assert bad.exit_code == 1 and "its columns differ from its signed body" in bad.stdout
    alone = run(home, "verify", "--no-blobs", "--hub-address", "nobody@nowhere.example")
    assert alone.exit_code == 2 and "give the CA too" in alone.output


def test_checkpoint_signs_with_the_hub_key(home: Path, world: DemoWorld) -> None:
    size = len(entries(home))  # and the read `entries` logged
    made = json.loads(ok(home, "checkpoint", "--json").stdout)
    assert made["size"] == size + 1
    assert made["signer"] == world.hub.cert.subject.rfc4514_string()
    assert json.loads(ok(home, "verify", "--json", "--no-blobs").stdout)["checkpoints"] == 2


def test_checkpoint_without_the_passphrase_fails_in_one_line(home: Path) -> None:
    (home / "keys/passphrase").write_bytes(b"wrong\n")
    result = run(home, "checkpoint")
    assert result.exit_code == 2
    assert "cannot decrypt the hub private key" in result.stderr


def test_prove_gives_a_proof_under_the_checkpoint(home: Path, seqs: dict[str, int]) -> None:
    proof = json.loads(ok(home, "prove", seqs["accepted"], "--json").stdout)
    assert proof["verified"] is True
    assert proof["size"] == proof["checkpoint"]["size"] == seqs["receipt"] + 1
    assert proof["root"] == proof["checkpoint"]["root"]
    assert "archive checkpoint" in proof["checkpoint"]["body"]
    assert all(len(h) == 64 for h in proof["audit_path"])
    sized = json.loads(
        ok(home, "prove", seqs["accepted"], "--size", seqs["accepted"] + 1, "--json").stdout
    )
    assert sized["checkpoint"] is None
    assert sized["verified"] is True
    consistency = json.loads(
        ok(home, "prove", "--consistency", 2, seqs["receipt"] + 1, "--json").stdout
    )
    assert consistency["verified"] is True
    assert consistency["new_checkpoint"]["size"] == seqs["receipt"] + 1


def test_prove_says_what_it_proves_and_gives_the_proof_with_json(
    home: Path, seqs: dict[str, int], world: DemoWorld
) -> None:
    """Like every archive command, `prove` prints text for a person by default and JSON with
    --json: the text says what is proven (which entry, in which tree, under which signed
    checkpoint), each check, and the command that prints the proof itself."""
    seq, size = seqs["accepted"], seqs["receipt"] + 1
    proof = json.loads(ok(home, "prove", seq, "--json").stdout)
    text = ok(home, "prove", seq).stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    signer = world.hub.cert.subject.rfc4514_string()
    assert text.splitlines() == [
        f"proving that entry {seq} is in the tree of {size} entries with root {proof['root']}",
        f"PASS  leaf hash: entry {seq}'s record hashes to {proof['leaf_hash']}, the leaf stored",
        f"PASS  audit path: an audit path of {len(proof['audit_path'])} hashes leads from the "
        "leaf to the root (RFC 9162 §2.1.3.2)",
        f"PASS  checkpoint: #1, signed {proof['checkpoint']['at']} by {signer} (a hub "
        "certificate the database holds), has this root",
        "proof verifies",
        f"the proof itself (hashes, signed checkpoint), to check elsewhere: `gateway archive "
        f"prove {seq} --json`; a bundle that needs no database: `gateway archive export {seq} "
        "--out FILE`",
    ]
    # A tree no checkpoint has signed: its root is only the database's word, and it says so.
    sized = ok(home, "prove", seq, "--size", seq + 1).stdout
    path = json.loads(ok(home, "prove", seq, "--size", seq + 1, "--json").stdout)["audit_path"]
    assert f"an audit path of {len(path)} hash{'es' if len(path) != 1 else ''} leads" in sized
    assert f"SKIP  checkpoint: no signed checkpoint has size {seq + 1}" in sized
    assert f"`gateway archive prove {seq} --size {seq + 1} --json`" in sized
    both = json.loads(ok(home, "prove", "--consistency", 2, size, "--json").stdout)
    consistency = ok(home, "prove", "--consistency", 2, size).stdout.splitlines()
    assert consistency[0] == (
        f"proving that the tree of 2 entries (root {both['old_root']}) is a prefix of the tree "
        f"of {size} entries (root {both['new_root']})"
    )
    assert consistency[1] == (
        f"PASS  consistency proof: a proof of {len(both['proof'])} hashes leads from the old root "
        "to the new (RFC 9162 §2.1.4.2)"
    )
    assert consistency[2].startswith("SKIP  old checkpoint: no signed checkpoint has size 2")
    assert consistency[3].startswith("PASS  new checkpoint: #1, signed")
    assert consistency[4:] == [
        "proof verifies",
        "the proof itself (hashes, signed checkpoint), to check elsewhere: `gateway archive "
        f"prove --consistency 2 {size} --json`",
    ]


def test_prove_says_which_check_fails_for_a_changed_record(
    home: Path, seqs: dict[str, int]
) -> None:
    seq = seqs["accepted"]
    db = sqlite3.connect(home / "archive.db")
    with db:
        db.execute(
            "UPDATE log_entries SET record = CAST(record || ' ' AS BLOB) WHERE seq = ?", (seq,)
        )
    db.close()
    assert json.loads(run(home, "prove", seq, "--json").stdout)["verified"] is False
    bad = run(home, "prove", seq)
    assert bad.exit_code == 1, bad.output
    lines = bad.stdout.splitlines()
    assert lines[1].startswith(f"FAIL  leaf hash: entry {seq}'s record hashes to ")
    assert lines[1].endswith(": the record was changed")
    assert lines[2].startswith("FAIL  audit path:")
    assert lines[4] == "proof does NOT verify"


def test_prove_with_a_tree_node_deleted_is_a_failed_check(home: Path, seqs: dict[str, int]) -> None:
    """A node the proof needs, deleted: exit 2 ("the log is missing tree node …"), as if the
    command had been misused; it is what `prove` is for, a FAIL and exit 1."""
    seq = seqs["accepted"]
    _edit(home, "DELETE FROM log_nodes WHERE level = 0 AND idx = ?", seq ^ 1)  # its sibling
    bad = run(home, "prove", seq)
    assert bad.exit_code == 1, bad.output
    assert bad.stdout.splitlines() == [
        f"FAIL  tree: the log is missing tree node (0, {seq ^ 1}) (altered or damaged: "
        "`gateway archive verify` says more)",
        "proof does NOT verify",
    ]
    as_json = run(home, "prove", seq, "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {
        "verified": False, "problem": f"the log is missing tree node (0, {seq ^ 1})",
    }  # fmt: skip


def test_prove_an_entry_newer_than_the_checkpoint_says_what_to_do(home: Path) -> None:
    newest = len(entries(home))  # the read of `entries` is entry `newest`
    result = run(home, "prove", newest)
    assert result.exit_code == 2
    assert "no signed checkpoint covers entry" in result.stderr
    assert "gateway archive checkpoint" in result.stderr
    assert "no entry 9999" in run(home, "prove", 9999, "--size", 9999).stderr


def test_a_proof_beyond_the_log_says_how_large_the_log_is(home: Path) -> None:
    """`prove 5 --size 999999` said "entry 5 is not in a log of size 999999", and a
    consistency proof up to a size the log has not reached said only that there was none."""
    held = len(entries(home))  # (the read of `entries` is one more)
    too_far = run(home, "prove", 5, "--size", 999_999)
    assert too_far.exit_code == 2
    assert f"the log holds {held + 1} entries: no proof under a size of 999999" in too_far.stderr
    beyond = run(home, "prove", "--consistency", 10, 99_999)
    assert beyond.exit_code == 2
    assert "entries: no proof up to a size of 99999" in beyond.stderr


# --- prove --ca: the signer judged by trust from outside the database ------------------------


@pytest.fixture
def root_pem(world: DemoWorld, tmp_path: Path) -> Path:
    """The hub's CA, as the archivist keeps it outside the database."""
    path = tmp_path / "root.pem"
    path.write_bytes(world.root.cert_pem())
    return path


def _sign_checkpoint(home: Path, world: DemoWorld, at: datetime) -> int:
    """Sign the current tree head at ``at`` (a fixed instant, not the clock) with the hub key,
    as `gateway archive checkpoint` does; its size."""
    conf = settings.load(home)
    db = Database.open(conf.database_url)
    key = world.hub.key
    assert isinstance(key, rsa.RSAPrivateKey)
    master = load_master_key(conf.path(conf.archive.master_key_file), create=False)
    archive = Archive(db, BlobStore(master), HUB_ADDRESS, signer=(world.hub.cert, key))
    size = archive.checkpoint(at).size
    db.dispose()
    return size


def test_prove_with_the_ca_checks_the_signer_of_the_checkpoint(
    home: Path, seqs: dict[str, int], world: DemoWorld, root_pem: Path
) -> None:
    """`prove SEQ --ca ROOT`: besides the checkpoint line (its signature checked against the
    hub certificates the database holds), a signer line says the signer's path to the CA
    given validates at the checkpoint's signed time and that it names the hub's address; the
    JSON carries the same check. Without --ca the JSON is as it was: no signer_check."""
    seq = seqs["accepted"]
    plain = json.loads(ok(home, "prove", seq, "--json").stdout)
    assert "signer_check" not in plain["checkpoint"]
    text = ok(home, "prove", seq, "--ca", root_pem).stdout.splitlines()
    proof = json.loads(ok(home, "prove", seq, "--ca", root_pem, "--json").stdout)
    signer = world.hub.cert.subject.rfc4514_string()
    at = proof["checkpoint"]["at"]
    assert text[3].startswith(f"PASS  checkpoint: #1, signed {at} by {signer} (a hub")
    assert text[4] == (
        f"PASS  signer: its path to the CA you gave validates at {at}, and it names {HUB_ADDRESS}"
    )
    assert text[5] == "proof verifies"
    # The JSON it points to checks the same: the CA is given again.
    assert f"`gateway archive prove {seq} --ca {root_pem} --json`" in text[6]
    assert proof["verified"] is True
    assert proof["checkpoint"]["signer_check"] == {"status": "pass", "detail": text[4][14:]}
    # A tree no checkpoint has signed: no signer is relied on, so no signer line.
    sized = ok(home, "prove", seq, "--size", seq + 1, "--ca", root_pem).stdout
    assert "SKIP  checkpoint:" in sized and "signer:" not in sized


def test_prove_with_the_ca_fails_a_hub_certificate_and_checkpoint_replaced_in_the_database(
    home: Path, seqs: dict[str, int], root_pem: Path
) -> None:
    """Whoever can write the database replaces the hub's certificate with one from a CA of
    their own (naming the hub's address, as the real one does) and re-signs the checkpoint
    with its key. `prove` without --ca checks the signature against the certificates the
    database holds, and says the proof verifies: the gap --ca closes. With --ca the real root,
    the signer's path does not validate and the proof fails (exit 1)."""
    rogue_root = make_root("Rogue root", at=WORLD_AT - timedelta(days=30), key_kind="ec-p256")
    rogue = issue_hub(rogue_root, email=HUB_ADDRESS, at=WORLD_AT - timedelta(days=30),
                      common_name="Rogue hub", key_kind="ec-p256")  # fmt: skip
    assert isinstance(rogue.key, ec.EllipticCurvePrivateKey)
    db = sqlite3.connect(home / "archive.db")
    with db:
        (body,) = db.execute("SELECT body FROM checkpoints").fetchone()
        signature = cp.sign(cp.Checkpoint.parse(body), rogue.cert, rogue.key)
        db.execute("UPDATE checkpoints SET signature = ?", (signature,))
        der = rogue.cert.public_bytes(Encoding.DER)
        assert db.execute("UPDATE certificates SET der = ? WHERE role = 'hub'", (der,)).rowcount
    db.close()
    seq = seqs["accepted"]
    fooled = ok(home, "prove", seq).stdout  # the database's own word
    assert (
        "by O=Rogue hub,CN=Rogue hub" in fooled
        and "(a hub certificate the database holds)" in fooled
    )
    assert fooled.splitlines()[4] == "proof verifies"

    bad = run(home, "prove", seq, "--ca", root_pem)
    assert bad.exit_code == 1, bad.output
    lines = bad.stdout.splitlines()
    assert lines[3].startswith("PASS  checkpoint: #1, signed")  # signed by what the db holds
    assert lines[4].startswith(
        "FAIL  signer: its path to the CA you gave does not validate at "
        "2026-11-02T03:06:00+00:00, the checkpoint's signed time: "
    )
    assert "does not chain to a configured trust anchor" in lines[4]  # the validator's word
    assert lines[5] == "proof does NOT verify"
    proof = json.loads(run(home, "prove", seq, "--ca", root_pem, "--json").stdout)
    assert proof["verified"] is False
    assert proof["checkpoint"]["signer_check"]["status"] == "fail"
    assert proof["checkpoint"]["signer_check"]["detail"] == lines[4][14:]


def test_prove_with_a_hub_address_the_signer_does_not_name_fails(
    home: Path, seqs: dict[str, int], root_pem: Path
) -> None:
    """The hub's own certificate validates under the root, but does not name the address
    given: it is not taken as the hub's. Giving the hub's address too (it changed) passes."""
    seq = seqs["accepted"]
    bad = run(home, "prove", seq, "--ca", root_pem, "--hub-address", "old@hub.example.vn")
    assert bad.exit_code == 1, bad.output
    [line] = [ln for ln in bad.stdout.splitlines() if "signer:" in ln]
    assert line.startswith("FAIL  signer: ")
    assert f"it names {HUB_ADDRESS}, not the hub's address (old@hub.example.vn)" in line
    assert "proof does NOT verify" in bad.stdout
    assert json.loads(
        run(home, "prove", seq, "--ca", root_pem, "--hub-address", "old@hub.example.vn",
            "--json").stdout
    )["verified"] is False  # fmt: skip
    both = ("--hub-address", "old@hub.example.vn", "--hub-address", HUB_ADDRESS)
    assert "PASS  signer: " in ok(home, "prove", seq, "--ca", root_pem, *both).stdout


def test_prove_consistency_with_the_ca_checks_both_signers(
    home: Path, seqs: dict[str, int], world: DemoWorld, root_pem: Path
) -> None:
    old = seqs["receipt"] + 1
    entries(home)  # a read, logged: the log grows past the first checkpoint
    new = _sign_checkpoint(home, world, WORLD_AT + timedelta(hours=1))
    assert new > old
    lines = ok(home, "prove", "--consistency", old, new, "--ca", root_pem).stdout.splitlines()
    assert [ln[:18] for ln in lines[1:6]] == [
        "PASS  consistency ", "PASS  old checkpoi", "PASS  old signer: ", "PASS  new checkpoi",
        "PASS  new signer: ",
    ]  # fmt: skip
    assert "validates at 2026-11-02T03:06:00+00:00" in lines[3]
    assert "validates at 2026-11-02T04:00:00+00:00" in lines[5]
    assert lines[6] == "proof verifies"
    proof = json.loads(
        ok(home, "prove", "--consistency", old, new, "--ca", root_pem, "--json").stdout
    )
    assert proof["old_checkpoint"]["signer_check"]["status"] == "pass"
    assert proof["new_checkpoint"]["signer_check"]["status"] == "pass"
    # Both are judged: an address neither names fails both.
    other = ("--ca", root_pem, "--hub-address", "old@hub.example.vn")
    bad = run(home, "prove", "--consistency", old, new, *other)
    assert bad.exit_code == 1, bad.output
    assert [ln[:17] for ln in bad.stdout.splitlines() if "signer:" in ln] == [
        "FAIL  old signer:", "FAIL  new signer:",
    ]  # fmt: skip


def test_prove_wants_the_ca_with_a_hub_address(home: Path, seqs: dict[str, int]) -> None:
    alone = run(home, "prove", seqs["accepted"], "--hub-address", HUB_ADDRESS)
    assert alone.exit_code == 2
    assert "--hub-address is checked with --ca: give the CA too" in alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1


# --- export and verify-bundle ----------------------------------------------------------------


def gateway(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A real process with no home and no settings at all."""
    env = {"PATH": "/usr/bin:/bin", "GATEWAY_HOME": str(cwd / "no-such-home")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        capture_output=True, text=True, check=False, env=env, cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def exported(home: Path, seqs: dict[str, int], world: DemoWorld, tmp_path: Path) -> Path:
    out = tmp_path / "evidence" / "bundle.zip"
    out.parent.mkdir()
    result = json.loads(ok(home, "export", seqs["accepted"], "--out", out, "--json").stdout)
    assert result["receipt"] is True
    assert out.stat().st_mode & 0o077 == 0
    (out.parent / "root.pem").write_bytes(world.root.cert_pem())
    return out


def test_export_then_verify_bundle_with_no_database(home: Path, exported: Path) -> None:
    for p in home.glob("archive.db*"):
        p.unlink()  # no database: the bundle must stand on its own
    shutil.rmtree(home)
    where = exported.parent
    ca = ("--ca", where / "root.pem")
    plain = gateway(
        "archive", "verify-bundle", exported, *ca, "--hub-address", HUB_ADDRESS, cwd=where
    )
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "PASS  inclusion proof" in plain.stdout
    assert f"the hub's certificate, for the log {HUB_ADDRESS}" in plain.stdout
    assert plain.stdout.strip().endswith("bundle verifies")
    unnamed = gateway("archive", "verify-bundle", exported, *ca, cwd=where)
    assert unnamed.returncode == 1 and "give the hub's address (--hub-address)" in unnamed.stdout
    alone = gateway("archive", "verify-bundle", exported, "--hub-address", HUB_ADDRESS, cwd=where)
    assert alone.returncode == 2 and "give --ca too" in alone.stderr
    alone = gateway("archive", "verify-bundle", exported, "--origin", HUB_ADDRESS, cwd=where)
    assert alone.returncode == 2 and "--origin is checked against the hub chain" in alone.stderr
    named = gateway(
        "archive", "verify-bundle", exported, *ca, "--hub-address", HUB_ADDRESS,
        "--origin", "archive.hanoi.gov.vn/exchange", cwd=where,
    )  # fmt: skip
    assert named.returncode == 1, named.stdout
    assert "not the log you named (--origin)" in named.stdout
    as_json = gateway("archive", "verify-bundle", exported, "--json", cwd=where)
    report = json.loads(as_json.stdout)
    assert report["ok"] is True
    assert {c["check"]: c["status"] for c in report["checks"]}["hub chain"] == "skip"
    assert not (where / "no-such-home").exists()


def test_verify_bundle_fails_a_changed_bundle_with_exit_1(exported: Path) -> None:
    changed = exported.with_name("changed.zip")
    with zipfile.ZipFile(exported) as src, zipfile.ZipFile(changed, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(
                info,
                data.replace(b"H26.SNV", b"H26.STP") if info.filename == "entry.json" else data,
            )
    result = CliRunner().invoke(cli.cli, ["archive", "verify-bundle", str(changed)])
    assert result.exit_code == 1
    assert "FAIL  leaf hash" in result.stdout
    assert "bundle does NOT verify" in result.stdout


def test_export_of_a_quarantined_message_and_errors(
    home: Path, seqs: dict[str, int], tmp_path: Path
) -> None:
    out = tmp_path / "q.zip"
    ok(home, "export", seqs["quarantined"], "--out", out)
    report = json.loads(ok(home, "verify-bundle", out, "--json").stdout)
    checks = {c["check"]: c["status"] for c in report["checks"]}
    assert checks["agency signature"] == "skip"
    assert "receipt" not in checks
    missing = run(home, "verify-bundle", tmp_path / "nope.zip")
    assert missing.exit_code == 2
    assert "cannot read" in missing.stderr
    assert run(home, "export", 9999, "--out", out).exit_code == 2
    assert run(home, "show", 9999).exit_code == 2


@pytest.mark.parametrize(
    ("rewrite", "changed"),
    [
        ("CAST(record AS TEXT)", False),  # the same bytes, stored as text
        ("CAST(record AS TEXT) || ' '", True),  # and changed
    ],
)
def test_a_record_rewritten_as_text_is_read_as_its_bytes(
    home: Path, seqs: dict[str, int], rewrite: str, changed: bool, tmp_path: Path
) -> None:
    """A record column rewritten to hold text (SQLite keeps whatever type is written) is read
    by show, prove and export as the bytes it holds, as `archive verify` reads it: a change
    is a failed proof, never a crash on the type."""
    seq = seqs["accepted"]
    db = sqlite3.connect(home / "archive.db")
    with db:
        db.execute(f"UPDATE log_entries SET record = {rewrite} WHERE seq = ?", (seq,))
        assert db.execute(
            "SELECT typeof(record) FROM log_entries WHERE seq = ?", (seq,)
        ).fetchone() == ("text",)
    db.close()
    proof = run(home, "prove", seq)
    assert proof.exit_code == (1 if changed else 0), proof.output
    assert ("proof does NOT verify" in proof.stdout) is changed
    shown = run(home, "show", seq)
    assert shown.exit_code == 0, shown.output
    assert f"{seq}" in shown.stdout
    bundle = tmp_path / "b.zip"
    exported = run(home, "export", seq, "--out", bundle)
    if changed:  # refused in one line, and no bundle written
        assert exported.exit_code == 2, exported.output
        assert "the proof does not lead to the checkpoint's root" in exported.output
        assert not bundle.exists()
    else:
        assert exported.exit_code == 0, exported.output
        checked = CliRunner().invoke(cli.cli, ["archive", "verify-bundle", str(bundle)])
        assert checked.exit_code == 0, checked.output


@pytest.mark.parametrize("what", ["verify", "list"])
def test_a_home_without_an_archive_is_an_error_not_an_empty_archive(
    tmp_path: Path, what: str
) -> None:
    """An empty directory (an unmounted mount point, a mistyped --home) became a home with a
    new, empty archive and master key, and `archive verify` said "archive verifies: 0 entries"
    with exit 0: a reader of an archive makes none."""
    home = tmp_path / "mnt"
    home.mkdir()
    result = run(home, what)
    assert result.exit_code == 2
    assert f"no archive at {home / 'archive.db'}" in result.stderr
    assert list(home.iterdir()) == []  # nothing made


def test_a_file_larger_than_any_bundle_fails_unread(tmp_path: Path) -> None:
    """verify-bundle read the whole file before any check: a 3 GB file ran out of memory
    (internal error, exit 70). One larger than a bundle can be fails at once (sparse here)."""
    big = tmp_path / "big.zip"
    with big.open("wb") as f:
        f.truncate(bundle_check.MAX_FILE_BYTES + 1)
    result = CliRunner().invoke(cli.cli, ["archive", "verify-bundle", str(big)])
    assert result.exit_code == 1
    assert f"FAIL  members: the file is {bundle_check.MAX_FILE_BYTES + 1:,} bytes" in result.stdout
    assert "bundle does NOT verify" in result.stdout


def _edit(home: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(home / "archive.db")
    with db:
        db.execute(sql, args)
    db.close()


@pytest.mark.parametrize(
    ("record", "said"),
    [
        ("[1]", "is not an archive record"),
        (b"\x00\xff", "is not an archive record"),
        ('{"blobs": 5}', "names its blobs wrongly"),
        ('{"blobs": {"raw": 7}}', "names its blobs wrongly"),
    ],
)
def test_a_record_rewritten_into_something_else_is_named_not_an_internal_error(
    home: Path, seqs: dict[str, int], record: str | bytes, said: str
) -> None:
    """`archive show` of a record rewritten in the database ended in an internal error (exit
    70: AttributeError, JSONDecodeError, TypeError)."""
    _edit(home, "UPDATE log_entries SET record = ? WHERE seq = ?", record, seqs["accepted"])
    result = run(home, "show", seqs["accepted"])
    assert result.exit_code == 2, result.output
    assert f"entry {seqs['accepted']}'s record {said}" in result.stderr
    assert "verify" in result.stderr


def test_a_time_rewritten_into_no_time_stops_a_listing_with_one_line(home: Path) -> None:
    _edit(home, "UPDATE log_entries SET at = 'garbage' WHERE seq = 1")
    result = run(home, "list")
    assert result.exit_code == 2
    assert "an entry in this range cannot be read" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_receipt_rewritten_into_something_else_does_not_stop_its_messages_export(
    home: Path, seqs: dict[str, int], tmp_path: Path
) -> None:
    """Another entry's damage (the receipt's record made a list) stopped this one's export
    with an internal error; the message is exported, without the receipt it cannot read."""
    _edit(home, "UPDATE log_entries SET record = '[1]' WHERE seq = ?", seqs["receipt"])
    out = tmp_path / "bundle.zip"
    result = run(home, "export", seqs["accepted"], "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["receipt"] is False


def test_verify_reads_while_a_writer_holds_the_database(home: Path) -> None:
    """Opening the database took the write lock (its checks and the schema's migration ran in
    BEGIN IMMEDIATE): `archive verify` waited out the busy timeout behind a writer, then said
    the database was not reachable. A schema at its head is only read."""
    writer = sqlite3.connect(home / "archive.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        (home / "gateway.toml").write_text(
            (home / "gateway.toml").read_text() + "\n[database]\nbusy_timeout_ms = 200\n"
        )
        result = run(home, "verify", "--no-blobs")
        assert result.exit_code == 0, result.output
        assert "archive verifies" in result.stdout
    finally:
        writer.execute("ROLLBACK")
        writer.close()
