"""Loading CMS DER safely: every parse failure becomes :class:`MalformedCMS`."""

from __future__ import annotations

from asn1crypto import cms, x509

from formats.errors import MalformedCMS


def load_content_info(der: bytes, *, expect: tuple[str, ...]) -> cms.ContentInfo:
    """Parse DER as a CMS ContentInfo whose content type is one of ``expect``."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        ctype = info["content_type"].native
        if ctype in expect:
            info["content"]  # parses the outer content; deeper damage surfaces later
    except (ValueError, TypeError, KeyError) as exc:
        raise MalformedCMS(f"CMS structure does not parse ({short_reason(exc)})") from None
    if ctype not in expect:
        raise MalformedCMS(f"expected CMS {' or '.join(expect)}, found {ctype}")
    return info


def short_reason(exc: BaseException, n: int = 80) -> str:
    """The first line of an exception's text, shortened: enough to diagnose, nothing internal."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= n else text[: n - 1] + "…"


def same_name(a: x509.Name, b: x509.Name) -> bool:
    """RFC 5280 §7.1 name equality; identical DER (the usual case) skips the costly string prep."""
    return bool(a.dump() == b.dump() or a == b)
