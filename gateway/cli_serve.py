"""``gateway serve``: run the listeners, the IMAP poller, the workers, the sender, metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import click

from formats.errors import InputError
from gateway import logs
from gateway.cli import load_settings
from gateway.serve import Supervisor
from gateway.settings import host_port


@click.command()
@click.option("--smtp", metavar="HOST:PORT", help="SMTP listener address ('' for none).")
@click.option("--lmtp", metavar="HOST:PORT", help="LMTP listener address (for a Postfix hand-off).")
@click.option("--workers", type=click.IntRange(1, 64), help="Pipeline worker processes.")
@click.option("--metrics", metavar="HOST:PORT", help="Prometheus endpoint address ('' for none).")
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default="json",
    show_default=True,
    help="Structured JSON lines (for journald and log shippers) or plain text.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bound ports here as JSON once listening (port 0 picks free ports).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    smtp: str | None,
    lmtp: str | None,
    workers: int | None,
    metrics: str | None,
    log_format: str,
    ready_file: Path | None,
) -> None:
    """Run the gateway: take mail in, decide, file, answer and forward, until stopped.

    Configured in gateway.toml ([listen], [imap], [relay], [serve]); the options here
    override it. Stops cleanly on SIGTERM or Ctrl-C: listeners close first, work in hand
    is finished, nothing that got 250 is lost.
    """
    settings = load_settings(ctx)
    listen = settings.listen
    if smtp is not None:
        if smtp:
            host_port(smtp, "--smtp")
        listen = dataclasses.replace(listen, smtp=smtp)
    if lmtp is not None:
        if lmtp:
            host_port(lmtp, "--lmtp")
        listen = dataclasses.replace(listen, lmtp=lmtp)
    serve_settings = settings.serve
    if workers is not None:
        serve_settings = dataclasses.replace(serve_settings, workers=workers)
    if metrics is not None:
        if metrics:
            host_port(metrics, "--metrics")
        serve_settings = dataclasses.replace(serve_settings, metrics=metrics)
    settings = dataclasses.replace(settings, listen=listen, serve=serve_settings)
    if not (settings.listen.smtp or settings.listen.lmtp or settings.imap.host):
        raise click.UsageError("nothing to serve: no SMTP or LMTP listener and no IMAP mailbox")
    if ready_file is not None and not ready_file.parent.is_dir():
        # Found now, not once everything has started and the file is written.
        raise InputError(f"--ready-file {ready_file}: there is no directory {ready_file.parent}")
    logs.configure(log_format)

    def ready(info: dict[str, Any]) -> None:
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            try:
                tmp.write_text(json.dumps(info), encoding="utf-8")
                os.replace(tmp, ready_file)
            except OSError as exc:
                raise InputError(
                    f"--ready-file {ready_file}: cannot write it ({exc.strerror or exc})"
                ) from None

    supervisor = Supervisor(settings, log_format=log_format, on_ready=ready)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, supervisor.ask_to_stop)
    supervisor.run()
