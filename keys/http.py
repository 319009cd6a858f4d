"""Bounded HTTP for revocation evidence (CRL downloads, OCSP requests): one place for the
timeout, the size cap and the one-line errors."""

from __future__ import annotations

import urllib.error
import urllib.request

from formats.errors import InputError

TIMEOUT_SECONDS = 15.0
USER_AGENT = "official-mail-gateway"


def fetch(
    url: str,
    *,
    limit: int,
    what: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """GET (or POST ``data`` to) an http(s) ``url``; at most ``limit`` bytes of ``what``."""
    if not url.startswith(("http://", "https://")):
        raise InputError(f"{url!r} is not an http(s) URL")
    request = urllib.request.Request(  # noqa: S310 — scheme checked above
        url,
        data=data,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        method="POST" if data is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
            body: bytes = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise InputError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"cannot reach {url}: {reason}") from None
    if len(body) > limit:
        raise InputError(f"the {what} is larger than {limit} bytes")
    return body
