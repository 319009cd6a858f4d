"""The ``gateway`` command as a user runs it: a real process, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from archive.db import Database


def gateway(*args: str | Path, env_home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "GATEWAY_HOME": str(env_home)} if env_home else None
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    home = tmp_path_factory.mktemp("demo")
    proc = gateway("demo", "--dir", home, "--json")
    assert proc.returncode == 0, proc.stderr
    return home, json.loads(proc.stdout)


def test_demo_shows_acceptance_and_each_refusal(demo_home: tuple[Path, dict[str, object]]) -> None:
    home, out = demo_home
    verdicts = {n: v for n, v in out.items() if n.endswith(".eml")}
    disposition = {name: v["disposition"] for name, v in verdicts.items() if isinstance(v, dict)}
    assert disposition == {
        "accepted.eml": "accepted",
        "late.eml": "accepted",
        "accepted-stp.eml": "accepted",
        "duplicate.eml": "duplicate",
        "tampered.eml": "quarantined",
        "spoofed-from.eml": "quarantined",
        "revoked-signer.eml": "quarantined",
        "wrong-agency.eml": "rejected",
    }
    codes = {
        n: v["reasons"][0]["code"]
        for n, v in verdicts.items()
        if isinstance(v, dict) and v["reasons"] and v["disposition"] != "duplicate"
    }
    assert codes == {
        "tampered.eml": "signature-invalid",
        "spoofed-from.eml": "sender-mismatch",
        "revoked-signer.eml": "signer-revoked",
        "wrong-agency.eml": "agency-mismatch",
    }
    assert all(str(v["smtp"]).startswith("250 ") for v in verdicts.values())  # type: ignore[index]
    # receipts: two accepted, the first one again for the duplicate, one rejection;
    # both accepted submissions delivered to the police; the archive verifies
    outbound = out["outbound"]
    assert isinstance(outbound, dict)
    reminders = outbound.pop("reminders")
    assert outbound == {
        "receipts": 5,  # three accepted, the first again for the duplicate, one rejection
        "deliveries": 3,
        # Home Affairs' two accepted reports are owed (Điều 8.2.c) to 7 more bodies, none of
        # which has a certificate in the demo: each such delivery fails, and the admin is
        # alerted once a day about each body
        "deliveries_failed": 14,
        "alerts": 7,
        "kept_in": str(home / "sink"),
    }
    assert out["archive"]["ok"] is True  # type: ignore[index]
    # compliance: Home Affairs' current period on time, the one two months back late
    status = out["compliance"]
    assert isinstance(status, dict)
    lines = [line for period in status.values() for line in period["home_affairs"]]
    # (the current period's report is sent before that period ends: flagged, still on time)
    assert any("on-time" in line and "sent before the period ended" in line for line in lines)
    assert any("late by" in line and "before the period ended" not in line for line in lines)
    assert all(
        Path(period["html"]).read_text().startswith("<!DOCTYPE html>") for period in status.values()
    )
    # reminders: every one owed is sent once; a second run queues nothing
    assert reminders == out["reminders_queued"] == len(out["reminders"]) > 0  # type: ignore[arg-type]
    assert out["queued_again"] == 0
    assert len(list((home / "sink").glob("*.eml"))) == 8 + reminders + 7  # the alerts too
    key = (home / "keys/hub.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in key  # private keys are encrypted at rest
    assert (home / "keys/hub.key").stat().st_mode & 0o077 == 0


def test_check_accepts_and_refuses_with_exit_codes(
    demo_home: tuple[Path, dict[str, object]],
) -> None:
    home, _ = demo_home
    ok = gateway("--home", home, "check", home / "messages/accepted.eml")
    assert ok.returncode == 0, ok.stderr
    assert "ACCEPTED" in ok.stdout
    assert "work-permit" in ok.stdout

    bad = gateway("check", "--json", home / "messages/revoked-signer.eml", env_home=home)
    assert bad.returncode == 1
    verdict = json.loads(bad.stdout)
    assert verdict["disposition"] == "quarantined"
    assert verdict["reasons"][0]["code"] == "signer-revoked"
    assert verdict["reasons"][0]["reason_vi"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("check", "/nonexistent/message.eml"), "cannot read /nonexistent/message.eml"),
        (("check", "--at", "yesterday", "x.eml"), "not an ISO 8601 time"),
    ],
)
def test_errors_are_one_line_never_a_traceback(
    tmp_path: Path, args: tuple[str, ...], match: str
) -> None:
    proc = gateway("--home", tmp_path, *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert match in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_keys_say_how_to_fix_it(tmp_path: Path) -> None:
    (tmp_path / "m.eml").write_bytes(b"From: a@x.vn\r\n\r\n")
    home = tmp_path / "home"
    assert gateway("--home", home, "init").returncode == 0
    proc = gateway("--home", home, "check", tmp_path / "m.eml")
    assert proc.returncode == 2
    assert "the hub has no key pair" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_directory_that_is_not_a_home_is_refused_not_made_one(tmp_path: Path) -> None:
    """A mistyped --home naming some other directory: refused, with nothing written there (it
    got a database and a master key of its own, and `archive verify` called it clean)."""
    other = tmp_path / "somewhere-else"
    other.mkdir()
    (other / "notes.txt").write_text("someone's files")
    for args in (["archive", "verify"], ["archive", "list"], ["outbox", "list"]):
        proc = gateway("--home", other, *args)
        assert proc.returncode == 2, (args, proc.stdout)
        assert "is not a gateway home (no gateway.toml, and it holds other files)" in proc.stderr
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_demo_refuses_a_directory_that_holds_anything(tmp_path: Path) -> None:
    """`demo --dir` on an existing home: refused, nothing written. It overwrote gateway.toml,
    the passphrase and the hub's key files, and the hub's old key could no longer be opened.
    A new or empty directory is fine (the demo_home fixture gives an empty one)."""
    home = tmp_path / "home"
    assert gateway("--home", home, "init").returncode == 0
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    proc = gateway("demo", "--dir", home, "--json")
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr == (
        f"Error: --dir {home} is not empty; the demo makes a home of its own: give a new or "
        "empty directory (or no --dir, for a temporary one)\n"
    )
    assert proc.stdout == ""
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before


def test_init_makes_a_private_home(tmp_path: Path) -> None:
    home = tmp_path / "new-home"
    old = os.umask(0o022)
    try:
        assert gateway("--home", home, "init").returncode == 0
    finally:
        os.umask(old)
    assert home.stat().st_mode & 0o777 == 0o700


def test_a_broken_settings_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text("[hub\n", encoding="utf-8")
    (tmp_path / "m.eml").write_bytes(b"x")
    proc = gateway("--home", tmp_path, "check", tmp_path / "m.eml")
    assert proc.returncode != 0
    assert "not valid TOML" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_init_writes_a_commented_config_that_loads(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = gateway("--home", home, "init")
    assert proc.returncode == 0, proc.stderr
    text = (home / "gateway.toml").read_text(encoding="utf-8")
    assert "[trust]" in text
    assert (home / "trust/anchors").is_dir()
    again = gateway("--home", home, "init")
    assert "already exists" in again.stdout


def test_init_writes_every_setting_commented_with_its_default(tmp_path: Path) -> None:
    """Every section and key of the settings is in the file `gateway init` writes, commented
    with its default (a key unset by default, with an example): uncommented, the file loads
    as the defaults. It held four sections of eleven, and called passphrase_file's example
    its default. Generated from the settings, it cannot fall behind them again."""
    from gateway import settings as settings_mod
    from gateway.settings_template import EXAMPLES, NOTES

    home = tmp_path / "home"
    assert gateway("--home", home, "init").returncode == 0
    config = home / "gateway.toml"
    text = config.read_text(encoding="utf-8")
    defaults = settings_mod.defaults()
    for section, keys in defaults.items():
        assert f"\n[{section}]\n" in text
        for key in keys:
            assert f"\n# {key} = " in text, (section, key)
    known = {(section, key) for section, keys in defaults.items() for key in keys}
    assert set(NOTES) <= known and set(EXAMPLES) <= known  # no note about a key long gone
    config.write_text(re.sub(r"(?m)^# (\w+ = )", r"\1", text), encoding="utf-8")
    loaded = settings_mod.load(home)
    for section, keys in defaults.items():
        for key, default in keys.items():
            expected = Path(EXAMPLES[section, key]) if default is None else default
            assert getattr(getattr(loaded, section), key) == expected, (section, key)


def test_outbox_lists_what_failed_and_sends_it_again(
    demo_home: tuple[Path, dict[str, object]],
) -> None:
    """The demo's deliveries to a body with no mailbox: listed, requeued for a rebuild (which
    fails again, the mailbox still missing), and a row that is not failed is refused."""
    home, _ = demo_home
    listed = gateway(
        "--home", home, "outbox", "list", "--state", "failed", "--agency", "H26.SCT", "--json"
    )
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["kind"], r["state"]) for r in rows] == [("delivery", "failed")] * 2
    assert all("no e-mail address" in r["last_reply"] for r in rows)
    text = gateway("--home", home, "outbox", "list", "--state", "failed").stdout
    assert all(f"delivery:{r['key'].split(':')[1]}:H26.SCT" in text for r in rows)

    again = gateway("--home", home, "outbox", "retry", "--failed", "--agency", "H26.SCT")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("to be built again") == 2
    pending = gateway("--home", home, "outbox", "list", "--agency", "H26.SCT", "--json")
    assert [r["state"] for r in json.loads(pending.stdout)] == ["new", "new"]

    refused = gateway("--home", home, "outbox", "retry", str(rows[0]["id"]))
    assert refused.returncode == 2 and "is new, not failed" in refused.stderr
    both = gateway("--home", home, "outbox", "retry", "--failed", "1")
    assert both.returncode == 2 and "not both" in both.stderr
    neither = gateway("--home", home, "outbox", "retry")
    assert neither.returncode == 2 and "or give --failed for every failed row" in neither.stderr


def test_archive_release_puts_a_quarantined_message_back_once(
    demo_home: tuple[Path, dict[str, object]],
) -> None:
    home, out = demo_home
    tampered, accepted = out["tampered.eml"], out["accepted.eml"]
    assert isinstance(tampered, dict) and isinstance(accepted, dict)
    first = gateway("--home", home, "archive", "release", str(tampered["archive_seq"]), "--json")
    assert first.returncode == 0, first.stderr
    released = json.loads(first.stdout)
    assert released["released"] is True and released["intake"] > 0
    again = gateway("--home", home, "archive", "release", str(tampered["archive_seq"]))
    assert again.returncode == 0 and f"as intake {released['intake']}" in again.stdout
    refused = gateway("--home", home, "archive", "release", str(accepted["archive_seq"]))
    assert refused.returncode == 2
    assert "only a quarantined message is released" in refused.stderr


@pytest.mark.parametrize("where", ["a-directory", "a-file/master.key"])
def test_a_master_key_file_that_cannot_be_a_file_is_a_setting_error(
    tmp_path: Path, where: str
) -> None:
    """[archive] master_key_file naming a directory, or a path under a file: one line naming
    the key file and the setting, exit 2 (it was `internal error: IsADirectoryError`, 70)."""
    home = tmp_path / "home"
    (home / "a-directory").mkdir(parents=True)
    (home / "a-file").write_text("not a directory")
    (home / "gateway.toml").write_text(f'[archive]\nmaster_key_file = "{where}"\n')
    Database.open(f"sqlite:///{home / 'archive.db'}").dispose()  # an archive, empty
    proc = gateway("--home", home, "archive", "verify")
    assert proc.returncode == 2, proc.stderr
    assert f"archive master key {home / where}: " in proc.stderr
    assert "[archive] master_key_file must name a file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_database_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    """A PostgreSQL server that is down: one line naming the database (not its password), exit
    2 like every explained error; it was `internal error: OperationalError` (70), three lines."""
    (tmp_path / "gateway.toml").write_text(
        '[database]\nurl = "postgresql+psycopg://gw:s3cret@127.0.0.1:1/gateway"\n'
    )
    proc = gateway("--home", tmp_path, "outbox", "list")
    assert proc.returncode == 2, proc.stderr
    assert "postgresql+psycopg://gw:***@127.0.0.1:1/gateway is not reachable" in proc.stderr
    assert "s3cret" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
