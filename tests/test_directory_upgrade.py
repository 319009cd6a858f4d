"""A database an earlier version wrote may hold a mailbox the directory now refuses (not ASCII,
since mail goes out without SMTPUTF8): the upgrade must not brick the gateway.

The old state is made as the old version made it: through the store functions, so the admin
events exist, with :func:`keys.directory.normalize_email` behaving as it did then (no ASCII
check) for those writes only. Then: the directory loads without those mailboxes (each logged
with its fix), ``gateway doctor`` names each with the command that fixes it, ``gateway agencies
list|show`` flag it, ``gateway agencies update`` removes or replaces it (an admin event each),
and ``gateway archive verify`` passes before and after.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from archive.db import Database, sqlite_url
from formats.errors import InputError
from gateway import cli, loading
from gateway import settings as settings_mod
from gateway.demo import DemoWorld
from keys import directory as directory_mod
from keys import store
from keys.directory import Agency
from tests.conftest import WORLD_AT

#: Mailboxes an earlier version accepted and the directory now refuses.
LOCAL = "cán.bộ@sở.vn"  # not ASCII in the local part: no ASCII form
DOMAIN = "tp@sở-tư-pháp.vn"  # not ASCII in the domain alone: it has an xn-- form
DOMAIN_ACE = "tp@xn--s-t-php-mwa37pr84l.vn"
OTHER = "văn.thư@syt.hanoi.gov.vn"  # the only refused mailbox of an agency added so

PASSPHRASE = b"upgrade passphrase"
AT = WORLD_AT.isoformat()


def _old_normalize(addr: str) -> str:
    """:func:`keys.directory.normalize_email` before mailboxes had to be ASCII (6d9bd3a)."""
    addr = addr.strip()
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not domain or any(c in addr for c in " <>,;\r\n\t"):
        raise ValueError(f"{addr!r} is not a bare e-mail address (local@domain)")
    return f"{local}@{domain.lower()}"


def run(home: Path, *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(cli.cli, ["--home", str(home), *args])
    assert (result.exit_code == 0) is ok, result.output
    return result


def open_db(home: Path) -> Database:
    return Database.open(sqlite_url(home / "archive.db"))


def write_as_the_old_version(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """H26.STP gains ``LOCAL`` and ``DOMAIN`` by an update; H26.SYT is added with ``OTHER``
    beside an ASCII mailbox — each through the store, an admin event each."""
    with monkeypatch.context() as patched:
        patched.setattr(directory_mod, "normalize_email", _old_normalize)
        db = open_db(home)
        try:
            with db.session() as s:
                stp = store.get_agency(s, "H26.STP")
                grown = replace(stp, emails=stp.emails | {LOCAL, DOMAIN})
                store.update_agency(s, grown, at=WORLD_AT, actor="old@cli")
                syt = Agency(
                    "H26.SYT",
                    "Sở Y tế thành phố Hà Nội",
                    "Hanoi Department of Health",
                    frozenset({"vanthu@syt.hanoi.gov.vn", OTHER}),
                )
                store.add_agency(s, syt, at=WORLD_AT, actor="old@cli")
        finally:
            db.dispose()


def events(home: Path) -> list[tuple[str, str, dict[str, Any]]]:
    db = open_db(home)
    try:
        with db.session() as s:
            return [(e.action, e.subject, e.detail) for e in store.events(s)]
    finally:
        db.dispose()


def listing(home: Path) -> dict[str, dict[str, Any]]:
    out = json.loads(run(home, "agencies", "list", "--json").stdout)
    return {a["organ_id"]: a for a in out}


def verify(home: Path) -> Result:
    result = run(home, "archive", "verify", "--no-blobs")
    assert "PROBLEM" not in result.output and "archive verifies" in result.output
    return result


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory made by admin commands, then the old version's non-ASCII mailboxes."""
    home = tmp_path / "home"
    home.mkdir()
    run(home, "agencies", "add", "H26.UBND", "--name-vi", "Ủy ban nhân dân thành phố Hà Nội")
    run(
        home, "agencies", "add", "H26.STP", "--name-vi", "Sở Tư pháp thành phố Hà Nội",
        "--email", "vanthu@stp.hanoi.gov.vn", "--supervisor", "H26.UBND",
    )  # fmt: skip
    run(
        home, "agencies", "add", "H26.CATP", "--name-vi", "Công an thành phố Hà Nội",
        "--email", "pa08@congan.hanoi.gov.vn",
    )  # fmt: skip
    write_as_the_old_version(home, monkeypatch)
    return home


# --- loading ---------------------------------------------------------------------------------


def test_the_stored_directory_loads_without_the_refused_mailboxes(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = open_db(home)
    try:
        with db.session(read_only=True) as s, caplog.at_level(logging.WARNING, "keys.store"):
            directory = store.directory(s)
            warned = [r.getMessage() for r in caplog.records if r.name == "keys.store"]
            caplog.clear()
            merged = loading.load_directory_merged(settings_mod.load(home), s)
            again = [r.getMessage() for r in caplog.records if r.name == "keys.store"]
    finally:
        db.dispose()
    assert {a.organ_id: set(a.emails) for a in directory} == {
        "H26.CATP": {"pa08@congan.hanoi.gov.vn"},
        "H26.STP": {"vanthu@stp.hanoi.gov.vn"},
        "H26.SYT": {"vanthu@syt.hanoi.gov.vn"},
        "H26.UBND": set(),
    }
    assert {a.organ_id: a.emails for a in merged} == {a.organ_id: a.emails for a in directory}
    assert directory.by_email(LOCAL, WORLD_AT.date()) is None
    stp = directory.by_email("vanthu@stp.hanoi.gov.vn", WORLD_AT.date())
    assert stp is not None and stp.organ_id == "H26.STP"

    assert len(warned) == 3, warned  # one load: each refused mailbox once
    assert again == warned  # and so in each load the gateway makes
    by_mailbox = set(warned)
    (domain_line,) = [m for m in by_mailbox if DOMAIN in m]
    assert domain_line.startswith("agency H26.STP: its stored mailbox ")
    assert "is not an ASCII e-mail address" in domain_line
    assert (
        f"gateway agencies update H26.STP --remove-email '{DOMAIN}' --add-email {DOMAIN_ACE}"
        in domain_line
    )
    (local_line,) = [m for m in by_mailbox if LOCAL in m]
    assert f"gateway agencies update H26.STP --remove-email '{LOCAL}'" in local_line
    assert "--add-email" not in local_line
    (other_line,) = [m for m in by_mailbox if OTHER in m]
    assert other_line.startswith("agency H26.SYT: ")


# --- list, show, update, verify --------------------------------------------------------------


def test_list_and_show_flag_the_refused_mailboxes(home: Path) -> None:
    agencies = listing(home)
    stp = agencies["H26.STP"]
    assert stp["emails"] == ["vanthu@stp.hanoi.gov.vn"]
    assert [u["address"] for u in stp["unusable_emails"]] == sorted([LOCAL, DOMAIN])
    assert all("not an ASCII e-mail address" in u["why"] for u in stp["unusable_emails"])
    assert "unusable_emails" not in agencies["H26.CATP"]
    assert agencies["H26.CATP"]["emails"] == ["pa08@congan.hanoi.gov.vn"]

    table = run(home, "agencies", "list").stdout
    assert f"{DOMAIN} (not usable: not ASCII)" in table and f"{OTHER} (not usable" in table

    shown = json.loads(run(home, "agencies", "show", "H26.STP", "--json").stdout)
    assert shown["emails"] == ["vanthu@stp.hanoi.gov.vn"]
    assert [u["fix"] for u in shown["unusable_emails"]] == [
        f"gateway agencies update H26.STP --remove-email '{LOCAL}'",
        f"gateway agencies update H26.STP --remove-email '{DOMAIN}' --add-email {DOMAIN_ACE}",
    ]
    text = run(home, "agencies", "show", "H26.STP").stdout
    assert f"{LOCAL} (not usable: not ASCII)" in text and "unusable:" in text


def test_update_removes_or_replaces_them_with_an_event_and_verify_passes(home: Path) -> None:
    verify(home)  # the old version's history is as it was made
    before = len(events(home))

    # An unrelated change keeps them: nothing is dropped behind the admin's back.
    run(home, "agencies", "update", "H26.STP", "--contact", "Văn phòng Sở")
    assert {u["address"] for u in listing(home)["H26.STP"]["unusable_emails"]} == {LOCAL, DOMAIN}
    verify(home)

    # Removed, named as typed with the domain in upper case.
    removed = run(home, "agencies", "update", "H26.STP", "--remove-email", "cán.bộ@SỞ.VN")
    assert "updated H26.STP" in removed.stdout and f"stored mailbox '{DOMAIN}'" in removed.stdout
    action, subject, detail = events(home)[-1]
    assert (action, subject) == ("agency.update", "H26.STP")
    assert detail["changed"] == {
        "emails": [
            sorted([LOCAL, DOMAIN, "vanthu@stp.hanoi.gov.vn"]),
            sorted([DOMAIN, "vanthu@stp.hanoi.gov.vn"]),
        ]
    }

    # Replaced by its ASCII form, with the command doctor and the listing give.
    (fix,) = [u["fix"] for u in listing(home)["H26.STP"]["unusable_emails"]]
    run(home, *shlex.split(fix)[1:])
    assert listing(home)["H26.STP"]["emails"] == sorted([DOMAIN_ACE, "vanthu@stp.hanoi.gov.vn"])

    # --email replaces every mailbox, the refused ones too.
    updated = run(home, "agencies", "update", "H26.SYT", "--email", "vt@syt.hanoi.gov.vn", "--json")
    assert "unusable_emails" not in json.loads(updated.stdout)["agency"]

    after = listing(home)
    assert all("unusable_emails" not in a for a in after.values())
    assert after["H26.CATP"]["emails"] == ["pa08@congan.hanoi.gov.vn"]
    assert [a for a, s, _ in events(home)[before:]] == ["agency.update"] * 4
    verify(home)


def test_removing_a_mailbox_the_agency_does_not_have_is_still_refused(home: Path) -> None:
    refused = run(home, "agencies", "update", "H26.STP", "--remove-email", "ai@sở.vn", ok=False)
    assert "is not an ASCII e-mail address" in refused.output
    assert len(listing(home)["H26.STP"]["unusable_emails"]) == 2


def test_export_leaves_them_out_and_says_so(home: Path) -> None:
    result = run(home, "agencies", "export", "--format", "csv")
    assert LOCAL not in result.stdout and "vanthu@stp.hanoi.gov.vn" in result.stdout
    assert f"stored mailbox {LOCAL} is not exported" in result.stderr


# --- doctor ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ready(world: DemoWorld, relay_port: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("upgrade") / "home"
    home.mkdir(mode=0o700)
    world.install(home, PASSPHRASE, relay_port=relay_port)
    return home


def doctor(home: Path) -> Result:
    return CliRunner().invoke(
        cli.cli, ["--home", str(home), "doctor", "--at", AT, "--timeout", "1", "--json"]
    )


def logged_by_loaders(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name in ("keys.store", "gateway.loading")]


def test_doctor_names_each_refused_mailbox_and_the_command_that_fixes_it(
    ready: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    home = Path(shutil.copytree(ready, tmp_path / "home"))
    write_as_the_old_version(home, monkeypatch)

    with caplog.at_level(logging.WARNING):
        result = doctor(home)
    assert result.exit_code == 0, result.output  # WARN only: the gateway still starts
    assert logged_by_loaders(caplog) == []  # in the report, not logged (on stderr) again
    lines = json.loads(result.stdout)
    (context,) = [r for r in lines if r["check"] == "context"]
    assert context["status"] == "OK" and "`gateway serve` can start" in context["message"]
    found = [r for r in lines if r["check"] == "directory"]
    assert [r["status"] for r in found] == ["WARN"] * 3, found
    (domain_line,) = [r["message"] for r in found if DOMAIN in r["message"]]
    assert domain_line.startswith("agency H26.STP: its stored mailbox ")
    assert "not an ASCII e-mail address" in domain_line
    assert "left out of the directory" in domain_line
    assert domain_line.endswith(
        f"`gateway agencies update H26.STP --remove-email '{DOMAIN}' --add-email {DOMAIN_ACE}`"
    )

    for r in found:  # the command each line gives is the fix
        command = r["message"].rsplit("`", 2)[1]
        run(home, *shlex.split(command)[1:])
    fixed = json.loads(doctor(home).stdout)
    assert [r["status"] for r in fixed if r["check"] == "directory"] == ["OK"]
    verify(home)


# --- the directory file ----------------------------------------------------------------------

#: A ``[directory] file`` written for an earlier version: H26.SXD with a refused mailbox of
#: each kind beside an ASCII one, H26.SCT with only a refused one.
OLD_FILE = f"""
[[agency]]
organ_id = "H26.SXD"
name_vi = "Sở Xây dựng thành phố Hà Nội"
emails = ["vanthu@sxd.hanoi.gov.vn", "{LOCAL}", "{DOMAIN}"]

[[agency]]
organ_id = "H26.SCT"
name_vi = "Sở Công Thương thành phố Hà Nội"
emails = ["{OTHER}"]
"""


def with_file(ready: Path, tmp_path: Path, text: str) -> Path:
    home = Path(shutil.copytree(ready, tmp_path / "home"))
    (home / "agencies.toml").write_text(text, encoding="utf-8")
    with (home / "gateway.toml").open("a", encoding="utf-8") as f:
        f.write('\n[directory]\nfile = "agencies.toml"\n')
    return home


def test_a_file_mailbox_the_rules_refuse_is_left_out_and_named_with_its_fix(
    ready: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = with_file(ready, tmp_path, OLD_FILE)
    settings = settings_mod.load(home)
    db = open_db(home)
    try:
        with caplog.at_level(logging.WARNING, "gateway.loading"):
            ctx = loading.load_context(settings, db, at=WORLD_AT)
    finally:
        db.dispose()
    sxd, sct = ctx.directory.get("H26.SXD"), ctx.directory.get("H26.SCT")
    assert sxd is not None and sxd.emails == {"vanthu@sxd.hanoi.gov.vn"}
    assert sct is not None and sct.emails == frozenset()
    assert ctx.directory.by_email("vanthu@sxd.hanoi.gov.vn", WORLD_AT.date()) == sxd
    assert ctx.directory.get("H26.CATP") is not None  # the stored directory as before

    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.loading"]
    assert len(lines) == 3, lines
    (domain_line,) = [m for m in lines if DOMAIN in m]
    assert domain_line.startswith("agency H26.SXD: its mailbox in the directory file ")
    assert domain_line.endswith(f"write {DOMAIN_ACE} instead of it in {home / 'agencies.toml'}")
    (local_line,) = [m for m in lines if LOCAL in m]
    assert "not an ASCII e-mail address" in local_line
    assert local_line.endswith("give an ASCII mailbox instead of it in "
                               f"{home / 'agencies.toml'}, or remove it")  # fmt: skip


def test_doctor_names_a_refused_file_mailbox_once_and_fails_an_unreadable_file(
    ready: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = with_file(ready, tmp_path, OLD_FILE)
    with caplog.at_level(logging.WARNING):
        result = doctor(home)
    assert result.exit_code == 0, result.output  # WARN only: the gateway still starts
    lines = json.loads(result.stdout)
    found = [r for r in lines if r["check"] == "directory"]
    assert [r["status"] for r in found] == ["WARN"] * 3, found
    assert any(DOMAIN_ACE in r["message"] for r in found)
    # Said in the report, not again as log lines on stderr (the context and deliveries checks
    # load the same directory).
    assert logged_by_loaders(caplog) == []

    (home / "agencies.toml").write_text(
        OLD_FILE.replace("H26.SCT", "H26.SXD"), encoding="utf-8"
    )  # one OrganId twice
    lines = json.loads(doctor(home).stdout)
    (bad,) = [r for r in lines if r["check"] == "directory"]
    assert bad["status"] == "FAIL" and bad["message"].startswith(str(home / "agencies.toml"))


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ('organ_id = "H26.SXD"\nname_vi = "Sở"\nemails = "a@b.vn"', "agency #1 is missing or"),
        ('organ_id = "H26.SXD"\nname_vi = "Sở"', "agency #1 is missing or has a bad field"),
        (
            'organ_id = "H26.SXD"\nname_vi = "Sở"\nemails = []\n'
            "valid_from = 2026-02-01\nvalid_to = 2026-01-31",
            "agency #1: agency H26.SXD: valid_to 2026-01-31 is before valid_from",
        ),
    ],
)
def test_a_bad_file_entry_is_an_error_naming_the_file_and_the_entry(
    tmp_path: Path, entry: str, said: str
) -> None:
    path = tmp_path / "agencies.toml"
    path.write_text(f"[[agency]]\n{entry}\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        loading.read_directory_file(path)
    assert caught.value.message.startswith(f"{path}: {said}"), caught.value.message
