"""``gateway demo``: the core, end to end, on throw-away material."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from gateway.cli import emit_json
from gateway.demo import DemoWorld, tamper
from gateway.pipeline import process
from gateway.verdict import Verdict


@click.command()
@click.option(
    "--dir",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the demo home here (default: a new temporary directory).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def demo(target: Path | None, as_json: bool) -> None:
    """Make a throw-away PKI and agencies, send signed+encrypted submissions, show verdicts.

    Shows: an accepted monthly work-permit submission; a tampered copy; a message whose From
    is not the signer; a message signed with a revoked certificate. Leaves a complete home
    directory behind so you can run `gateway --home DIR check DIR/messages/*.eml`.
    """
    started = time.monotonic()
    at = datetime.now(UTC)
    home = target or Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    say = (lambda _m: None) if as_json else click.echo

    say(f"Demo home: {home}")
    say("1. Making a throw-away PKI (RSA-3072):")
    world = DemoWorld.create(at, progress=lambda what: say(f"   - {what}"))
    world.write_home(home, secrets.token_urlsafe(24).encode())

    ctx = world.context()
    cases = {
        "accepted.eml": (
            "a monthly work-permit submission from the Department of Home Affairs",
            world.submission("H26.SNV"),
        ),
    }
    good = cases["accepted.eml"][1]
    cases["tampered.eml"] = ("the same message with one bit flipped in transit", tamper(good))
    cases["spoofed-from.eml"] = (
        "signed by Home Affairs but sent From the Department of Justice",
        world.submission("H26.SNV", from_addr="vanthu@stp.hanoi.gov.vn"),
    )
    cases["revoked-signer.eml"] = (
        "signed with the Department of Justice's revoked certificate",
        world.submission("H26.STP", signer=world.revoked["H26.STP"]),
    )

    results: dict[str, Verdict] = {}
    for n, (name, (what, raw)) in enumerate(cases.items(), start=2):
        (home / "messages" / name).write_bytes(raw)
        verdict = process(raw, ctx, at=at)
        results[name] = verdict
        say(f"{n}. {what}:")
        say(f"   {_line(verdict)}")

    if as_json:
        emit_json({name: v.as_dict() for name, v in results.items()} | {"home": str(home)})
        return
    say("")
    say(f"Done in {time.monotonic() - started:.1f} s. Try:")
    prefix = "" if os.environ.get("GATEWAY_HOME") == str(home) else f"--home {home} "
    say(f"   gateway {prefix}check {home / 'messages' / 'accepted.eml'}")
    say(f"   gateway {prefix}check --json {home / 'messages' / 'tampered.eml'}")


def _line(v: Verdict) -> str:
    if v.accepted and v.payload is not None and v.agency is not None:
        p = v.payload
        return (
            f"ACCEPTED  from {v.agency.organ_id} ({v.agency.name_vi}), category {p.exchange.category}, "
            f"period {p.exchange.period_start} → {p.exchange.period_end}, {len(p.records)} records"
        )
    reasons = "; ".join(f"[{e.code}] {e.message}" for e in v.errors)
    return f"{v.disposition.upper()}  {reasons}"
