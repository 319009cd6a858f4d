"""The network checks of ``gateway doctor`` (steps 11–13 of the plan in :mod:`gateway.doctor`):
listeners, the relay, the IMAP mailbox. Each connects with a short timeout and sends nothing
but greetings and capability questions; no mail is sent and nothing is bound for longer than a
probe.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import os
import smtplib
import socket
import ssl
from datetime import datetime

from formats.errors import GatewayError
from gateway.doctor import HUB_WARN, Result, fail, ok, one_line, text_of, warn
from gateway.relay import Relay
from gateway.settings import Settings, host_port
from keys import files


def listeners(settings: Settings, *, at: datetime, timeout: float) -> list[Result]:
    domain = settings.hub.address.rpartition("@")[2] or "localhost"
    out = []
    for name, address in (("smtp", settings.listen.smtp), ("lmtp", settings.listen.lmtp)):
        if address:
            ident = "LMTP" if name == "lmtp" else "ESMTP"
            out.append(listener(name, address, f"220 {domain} {ident}", timeout=timeout))
    if settings.listen.tls_certificate is not None:
        out.append(tls_certificate(settings, at))
    if settings.serve.metrics:
        out.append(listener("metrics", settings.serve.metrics, None, timeout=timeout))
    return out


def listener(name: str, address: str, greeting: str | None, *, timeout: float) -> Result:
    """Free to bind, or already ours: ``greeting`` is what the gateway's SMTP or LMTP
    listener says first; ``None`` means the metrics endpoint (HTTP)."""
    host, port = host_port(address, name)
    if port == 0:
        return ok(name, f"{address}: port 0, a free port is picked at start")
    refused = _bind(host, port)
    if isinstance(refused, PermissionError):
        return fail(
            name,
            f"{address}: no permission to bind port {port} (below 1024): "
            "AmbientCapabilities=CAP_NET_BIND_SERVICE in the unit, or a port ≥ 1024",
        )
    if refused is not None and refused.errno != errno.EADDRINUSE:
        why = (
            f"{host} is not an address of this machine"
            if refused.errno == errno.EADDRNOTAVAIL
            else one_line(refused)
        )
        return fail(name, f"{address} cannot be bound: {why}")
    if refused is None:
        if port < 1024 and os.geteuid() == 0:
            return warn(
                name,
                f"{address} is free for root; the service user needs "
                "AmbientCapabilities=CAP_NET_BIND_SERVICE for a port below 1024",
            )
        return ok(name, f"{address} is free; `gateway serve` can bind it")
    # In use: by the gateway itself, or by something else?
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    if greeting is None:
        return _metrics_answer(name, target, port, address, timeout)
    try:
        with socket.create_connection((target, port), timeout=timeout) as sock:
            with sock.makefile("rb") as reader:
                said = reader.readline(512).decode("ascii", "replace").strip()
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")  # a polite goodbye to whoever answered
    except OSError:
        said = ""
    if said == greeting:
        return ok(name, f"{address}: the gateway already listens here ({said!r})")
    if said.startswith("220"):
        return fail(
            name,
            f"{address} is taken by another mail server ({said!r}): stop it, "
            f"or move it or [listen] {name}",
        )
    return fail(
        name,
        f"{address} is taken by another process (no SMTP greeting within "
        f"{timeout:g} s): see `ss -ltnp 'sport = :{port}'`",
    )


def _bind(host: str, port: int) -> OSError | None:
    """Bind ``host:port`` for a moment as asyncio would (``SO_REUSEADDR``); the error, if any."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except OSError as exc:
        return exc
    return None


def _metrics_answer(name: str, host: str, port: int, address: str, timeout: float) -> Result:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        ours = response.status == 200 and b"gateway_workers_alive" in response.read(1 << 20)
    except (OSError, http.client.HTTPException):
        ours = False
    finally:
        conn.close()
    if ours:
        return ok(name, f"{address}: the gateway's metrics already answer here")
    return fail(name, f"{address} is taken by another process: see `ss -ltnp 'sport = :{port}'`")


def tls_certificate(settings: Settings, at: datetime) -> Result:
    listen = settings.listen
    assert listen.tls_certificate is not None
    cert_file = settings.path(listen.tls_certificate)
    key_file = settings.path(listen.tls_key) if listen.tls_key else None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")  # never prompt
        cert = files.load_certificates(cert_file)[0]
    except (OSError, ssl.SSLError, GatewayError) as exc:
        return fail("smtp tls", f"{cert_file} with its key is not usable: {one_line(exc)}")
    end = cert.not_valid_after_utc
    if end < at:
        return fail("smtp tls", f"{cert_file} ended on {end:%Y-%m-%d}: STARTTLS peers refuse it")
    if end - at <= HUB_WARN:
        return warn("smtp tls", f"{cert_file} ends on {end:%Y-%m-%d}: renew it")
    return ok("smtp tls", f"{cert_file} loads; ends on {end:%Y-%m-%d}")


def relay(settings: Settings, *, timeout: float) -> Result:
    """Connect, EHLO, STARTTLS and AUTH as ``[relay]`` says, QUIT; no message is sent."""
    try:
        r = Relay.from_settings(settings)
    except GatewayError as err:
        return fail("relay", err.message)
    address, done = f"{r.host}:{r.port}", ["EHLO"]
    wait = min(timeout, r.timeout)
    smtp = (
        smtplib.SMTP_SSL(local_hostname=r.helo, timeout=wait, context=r.ssl_context)
        if r.security == "tls"
        else smtplib.SMTP(local_hostname=r.helo, timeout=wait)
    )
    try:
        code, text = smtp.connect(r.host, r.port)
        if code != 220:
            return fail("relay", f"{address} refuses sessions: {code} {text_of(text)}")
        smtp.ehlo_or_helo_if_needed()
        if r.security in ("starttls", "require-starttls") and smtp.has_extn("starttls"):
            smtp.starttls(context=r.ssl_context)
            smtp.ehlo()
            done.append("STARTTLS")
        elif r.security == "require-starttls":
            return fail("relay", f"{address} offers no STARTTLS and security is require-starttls")
        if r.username:
            smtp.login(r.username, r.password or "")
            done.append(f"AUTH as {r.username}")
        smtp.quit()
    except (smtplib.SMTPException, OSError) as exc:
        return fail(
            "relay",
            f"{address}: {one_line(exc)}; receipts and deliveries wait in "
            "the outbox until the relay takes them",
        )
    finally:
        smtp.close()
    said = f"{address} answers ({text_of(text)}); {', '.join(done)} ok"
    if r.security == "none" and not _loopback(r.host):
        return warn("relay", f"{said}, but security is none on a non-loopback relay: in clear")
    if r.security == "starttls" and "STARTTLS" not in done:
        return warn("relay", f"{said}, but no STARTTLS is offered: mail goes in clear")
    return ok("relay", said)


def imap(settings: Settings, *, timeout: float) -> list[Result]:
    i = settings.imap
    if not i.host:
        return []
    if i.password_file is not None:
        if not os.access(settings.path(i.password_file), os.R_OK):
            return [fail("imap", f"password_file {settings.path(i.password_file)} is not readable")]
    elif not os.environ.get(i.password_env):
        return [fail("imap", f"no password: set ${i.password_env} or [imap] password_file")]
    from imapclient import IMAPClient
    from imapclient.exceptions import IMAPClientError

    cafile = str(settings.path(i.ca_file)) if i.ca_file else None
    address = f"{i.host}:{i.port}"
    try:
        context = ssl.create_default_context(cafile=cafile)
        client = IMAPClient(
            i.host, i.port, ssl=i.security == "tls", ssl_context=context, timeout=timeout
        )
        try:
            if i.security == "starttls":
                client.starttls(context)
            caps = sorted(c.decode("ascii", "replace") for c in client.capabilities())
        finally:
            with contextlib.suppress(Exception):
                client.logout()
    except (IMAPClientError, OSError, ssl.SSLError) as exc:
        return [fail("imap", f"{address} ({i.security}): {one_line(exc)}")]
    return [ok("imap", f"{address} answers ({i.security}): {' '.join(caps[:8])}")]


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
