"""Settings that would break serving are refused at load, in one line naming the setting.

Every number in the settings has a range (``settings.RANGES``); digits are ASCII digits only
(``str.isdigit`` also takes "²", which ``int`` refuses); a ``gateway.toml`` that is there but
cannot be read is an error naming it, never "no file: defaults".
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from formats.errors import ConfigError
from gateway import settings
from tests.served import gateway


def write(home: Path, text: str) -> None:
    (home / "gateway.toml").write_text(text, encoding="utf-8")


def check(home: Path) -> subprocess.CompletedProcess[str]:
    """``gateway check`` of a message that is there: the settings are what it stops at."""
    (home / "m.eml").write_bytes(b"From: a@x.vn\r\n\r\n")
    return gateway(home, "check", str(home / "m.eml"))


def assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr


# --- every number has a range ---------------------------------------------------------------


def test_every_numeric_setting_has_a_range() -> None:
    numeric = {
        (section, f.name)
        for section, cls in settings._SECTIONS.items()
        if section != "limits"  # formats.limits.Limits: every limit a positive integer
        for f in dataclasses.fields(cls)
        if isinstance(getattr(cls(), f.name), int | float)
        and not isinstance(getattr(cls(), f.name), bool)
    }
    assert numeric == set(settings.RANGES)


def test_the_defaults_are_in_range(tmp_path: Path) -> None:
    defaults = settings.load(tmp_path)
    for (section, key), (low, high, _above) in settings.RANGES.items():
        assert low <= getattr(getattr(defaults, section), key) <= high


@pytest.mark.parametrize(("section", "key"), sorted(settings.RANGES))
def test_each_bound_is_checked(tmp_path: Path, section: str, key: str) -> None:
    low, high, above = settings.RANGES[(section, key)]
    kind = type(getattr(getattr(settings.load(tmp_path), section), key))
    for ok in (low + (0.5 if above else 0), high):
        write(tmp_path, f"[{section}]\n{key} = {kind(ok)!r}\n")
        assert getattr(getattr(settings.load(tmp_path), section), key) == kind(ok)
    for bad in (low if above else low - 1, high + 1):
        write(tmp_path, f"[{section}]\n{key} = {kind(bad)!r}\n")
        with pytest.raises(ConfigError, match=rf"\[{section}\] {key} must be"):
            settings.load(tmp_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[listen]\ntimeout = 0\n", r"\[listen\] timeout must be more than 0"),
        ("[listen]\ntimeout = -1.5\n", r"\[listen\] timeout must be more than 0 \(not -1.5\)"),
        ("[listen]\ntimeout = nan\n", r"\[listen\] timeout must be more than 0 \(not nan\)"),
        ("[listen]\ntimeout = inf\n", r"\[listen\] timeout must be at most 86400 \(not inf\)"),
        ("[listen]\nmax_recipients = 0\n", r"\[listen\] max_recipients must be at least 1"),
        ("[database]\nbusy_timeout_ms = -1\n", r"\[database\] busy_timeout_ms must be at least 0"),
        ("[imap]\nport = 70000\n", r"\[imap\] port must be at most 65535 \(not 70000\)"),
        ("[relay]\nport = 0\n", r"\[relay\] port must be at least 1"),
        ("[serve]\nworkers = 0\n", r"\[serve\] workers must be at least 1"),
        ("[serve]\nworkers = 1000\n", r"\[serve\] workers must be at most 64"),
        ("[serve]\ngive_up_after_hours = -1\n", r"\[serve\] give_up_after_hours must be more"),
        ("[archive]\ncheckpoint_every = 0\n", r"\[archive\] checkpoint_every must be at least 1"),
        ("[compliance]\ncourtesy_days = -2\n", r"\[compliance\] courtesy_days must be at least 0"),
        ("[imap]\npoll_seconds = 0\n", r"\[imap\] poll_seconds must be more than 0"),
        ("[relay]\ntimeout = 0.0\n", r"\[relay\] timeout must be more than 0"),
    ],
)
def test_values_that_break_serving_are_refused(tmp_path: Path, text: str, match: str) -> None:
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=match):
        settings.load(tmp_path)


# --- ASCII digits only ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[compliance]\nremind_at = "0²:00"\n', r"\[compliance\] remind_at must be HH:MM"),
        ('[compliance]\nremind_at = "08:0²"\n', r"\[compliance\] remind_at must be HH:MM"),
        ('[compliance]\nremind_at = "٠٨:٠٠"\n', r"\[compliance\] remind_at must be HH:MM"),
        ('[listen]\nsmtp = "127.0.0.1:²5"\n', r"\[listen\] smtp = '127.0.0.1:²5': expected"),
        ('[listen]\nlmtp = "127.0.0.1:24²4"\n', r"\[listen\] lmtp = .*: expected host:port"),
        ('[serve]\nmetrics = "127.0.0.1:٩٤٦٦"\n', r"\[serve\] metrics = .*: expected host:port"),
    ],
)
def test_digits_are_ascii_digits(tmp_path: Path, text: str, match: str) -> None:
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=match):
        settings.load(tmp_path)


def test_a_superscript_port_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    write(tmp_path, '[compliance]\nremind_at = "0²:00"\n')
    assert_one_line(check(tmp_path), "remind_at must be HH:MM")
    write(tmp_path, "")
    assert_one_line(gateway(tmp_path, "serve", "--smtp", "127.0.0.1:²5"), "--smtp")


def test_an_out_of_range_port_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    write(tmp_path, "[imap]\nport = 70000\n")
    assert_one_line(check(tmp_path), "[imap] port must be at most 65535")


# --- a gateway.toml that cannot be read ------------------------------------------------------


def test_a_directory_in_place_of_the_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").mkdir()
    with pytest.raises(ConfigError, match=r"gateway\.toml: is a directory, not a settings file"):
        settings.load(tmp_path)
    assert_one_line(check(tmp_path), f"{tmp_path / 'gateway.toml'}: is a directory")


def test_a_link_to_nowhere_is_not_taken_for_no_file(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").symlink_to(tmp_path / "moved-away.toml")
    with pytest.raises(
        ConfigError, match=r"gateway\.toml: a symbolic link to a file that does not"
    ):
        settings.load(tmp_path)


def test_a_link_loop_is_named(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").symlink_to(tmp_path / "gateway.toml")
    with pytest.raises(ConfigError, match=r"gateway\.toml: cannot be read \(Too many levels"):
        settings.load(tmp_path)
    assert_one_line(check(tmp_path), str(tmp_path / "gateway.toml"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[hub]\n", encoding="utf-8")
    config.chmod(0)
    try:
        with pytest.raises(ConfigError, match=r"gateway\.toml: cannot be read \(Permission denied"):
            settings.load(tmp_path)
        assert_one_line(check(tmp_path), str(config))
    finally:
        config.chmod(0o600)


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_bytes(b'[hub]\norgan_name = "S\xf4"\n')
    with pytest.raises(ConfigError, match=r"gateway\.toml: not valid TOML"):
        settings.load(tmp_path)
