"""Settings: defaults with no file; clear one-line errors for a bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from formats.errors import ConfigError
from gateway import settings


def test_defaults_work_with_no_file(tmp_path: Path) -> None:
    s = settings.load(tmp_path)
    assert s.trust.revocation == "hard-fail"
    assert s.path(s.hub.certificates[0]) == tmp_path / "keys/hub.pem"
    assert s.limits.max_message_bytes == 32 * 1024 * 1024


def test_values_are_read_and_typed(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(
        '[hub]\naddress = "hub@x.vn"\ncertificates = ["a.pem", "/etc/b.pem"]\n'
        'private_keys = ["a.key", "b.key"]\n[trust]\nrevocation = "soft-fail"\n'
        "[limits]\nmax_parts = 8\n",
        encoding="utf-8",
    )
    s = settings.load(tmp_path)
    assert s.hub.address == "hub@x.vn"
    assert [s.path(p) for p in s.hub.certificates] == [tmp_path / "a.pem", Path("/etc/b.pem")]
    assert s.trust.revocation == "soft-fail"
    assert s.limits.max_parts == 8


def test_listen_session_caps(tmp_path: Path) -> None:
    s = settings.load(tmp_path)
    assert (s.listen.max_sessions, s.listen.max_sessions_per_ip) == (100, 20)
    (tmp_path / "gateway.toml").write_text(
        "[listen]\nmax_sessions = 300\nmax_sessions_per_ip = 50\n", encoding="utf-8"
    )
    s = settings.load(tmp_path)
    assert (s.listen.max_sessions, s.listen.max_sessions_per_ip) == (300, 50)


def test_the_daily_reminder_run_can_be_turned_off(tmp_path: Path) -> None:
    assert settings.load(tmp_path).compliance.remind_at == "08:00"
    (tmp_path / "gateway.toml").write_text('[compliance]\nremind_at = "off"\n', encoding="utf-8")
    assert settings.load(tmp_path).compliance.remind_at == settings.REMIND_OFF


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[hub\n", "not valid TOML"),
        ("[hubb]\n", "unknown section"),
        ("[hub]\nadress = 'x'\n", "unknown key.*adress"),
        ("[limits]\nmax_parts = 'many'\n", "wrong type"),
        ("[limits]\nmax_parts = 0\n", "positive integer"),
        ("[trust]\nrevocation = 'maybe'\n", "hard-fail"),
        ("[hub]\ncertificates = ['a.pem', 'b.pem']\n", "pair up"),
        ("[listen]\nmax_sessions = 0\n", r"\[listen\] max_sessions must be at least 1"),
        ("[listen]\nmax_sessions_per_ip = -1\n", "max_sessions_per_ip must be at least 1"),
        ("[compliance]\nremind_at = '8am'\n", 'remind_at must be HH:MM .* or "off"'),
        # Addresses go into outbound headers: one bare address, nothing more.
        ('[hub]\naddress = "hub@x.vn\\r\\nBcc: evil@x.vn"\n', r"\[hub\] address must be one bare"),
        ('[hub]\naddress = "hub@x.vn>, evil@x.vn"\n', r"\[hub\] address must be one bare"),
        ("[hub]\naddress = 'hub'\n", r"\[hub\] address must be one bare"),
        ("[serve]\nadmin_address = 'a@x.vn, b@x.vn'\n", r"\[serve\] admin_address must be one"),
        # They are written without SMTPUTF8: ASCII, and a domain's ASCII form is offered.
        (
            "[hub]\naddress = 'hub@sở.vn'\n",
            r"\[hub\] address must be one bare ASCII .*not an ASCII e-mail address.*"
            r"xn--.*: hub@xn--s-",
        ),
        ("[serve]\nadmin_address = 'quản.trị@x.vn'\n", r"admin_address .*give an ASCII mailbox"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "gateway.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        settings.load(tmp_path)


def test_home_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_HOME", str(tmp_path))
    assert settings.resolve_home(None) == tmp_path
    assert settings.resolve_home("/srv/gw") == Path("/srv/gw")
    monkeypatch.delenv("GATEWAY_HOME")
    assert settings.resolve_home(None) == Path("gateway-home")
