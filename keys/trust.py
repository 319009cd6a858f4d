"""The trust store value and signer-certificate validation at a given moment.

:func:`validate_signer` answers one question: *at instant ``at``, does this certificate chain
to one of our trust anchors, unrevoked, for e-mail signing?* It returns a
:class:`ValidatedSigner` or raises a :class:`~formats.errors.TrustError` /
:class:`~formats.errors.CryptoError` subclass whose message names the certificate and the fix.

The plan (DESIGN §5 rules 1–2), followed step by step in :meth:`Validator.validate`:

1. Reuse a cached success whose validity interval contains ``at``.
2. Refuse weak keys and signature hashes on the signer certificate (cheap, before step 3).
3. Build and validate a path with pyhanko-certvalidator (RFC 5280 §6) at moment ``at``: only
   :attr:`TrustStore.anchors` are trusted; store intermediates and the certificates carried in
   the message are path-building candidates only. No network fetching, ever.
4. Check revocation from the evidence in the store (CRLs, OCSP responses):

   * ``hard-fail`` — every certificate below the anchor needs current evidence (pyhanko's
     ``require`` policy; its own ``hard-fail`` skips certificates without a distribution point,
     which would let a listed serial through).
   * ``soft-fail`` — certificates with current evidence are checked exactly as in hard-fail;
     certificates with none (no CRL from their issuer, none fresh at ``at``) are let through
     and :attr:`ValidatedSigner.revocation_checked` is ``False``.

5. Require keyUsage digitalSignature and extKeyUsage emailProtection on the signer
   (RFC 8550 §4.4).
6. Refuse weak keys or hashes anywhere on the path; collect the evidence that covered it.

Path order: :attr:`ValidatedSigner.path` is **leaf first, anchor last** (the order of a TLS
chain and of ``openssl verify -show_chain``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any, Literal, TypeVar

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from pyhanko_certvalidator import ValidationContext, find_valid_path
from pyhanko_certvalidator import errors as pv_errors
from pyhanko_certvalidator.ltv.poe import POEManager
from pyhanko_certvalidator.path import ValidationPath
from pyhanko_certvalidator.policy_decl import (
    REQUIRE_REVINFO,
    CertRevTrustPolicy,
    NonRevokedStatusAssertion,
    RevocationCheckingPolicy,
    RevocationCheckingRule,
)
from pyhanko_certvalidator.registry import CertificateRegistry, SimpleTrustManager
from pyhanko_certvalidator.revinfo.archival import (
    process_legacy_crl_input,
    process_legacy_ocsp_input,
)
from pyhanko_certvalidator.revinfo.manager import RevinfoManager
from pyhanko_certvalidator.validate import validate_usage

from formats.algorithms import ALLOWED_CURVES, MIN_RSA_BITS
from formats.errors import (
    CertificateExpired,
    CertificateNotYetValid,
    ConfigError,
    KeyTooSmall,
    RevocationUnavailable,
    SignerRevoked,
    UntrustedSigner,
    WeakAlgorithm,
    WrongKeyUsage,
)
from keys.directory import normalize_email
from keys.issuing import ORGAN_ID_ATTRIBUTE

RevocationMode = Literal["hard-fail", "soft-fail"]
CRLInput = x509.CertificateRevocationList | bytes

#: Certificate signature hashes allowed anywhere on the path. Key sizes and curves come from
#: the one allow-list in :mod:`formats.algorithms` (DESIGN §3: RSA 2048 accepted, smaller refused).
ALLOWED_HASHES = frozenset({"sha256", "sha384", "sha512"})
#: Certificates a message carries that path building looks at (a signer's chain is 1–3).
MAX_CARRIED = 16
#: Candidate paths tried before the signer is refused as untrusted.
MAX_PATHS = 8

_T = TypeVar("_T")


@dataclass(frozen=True)
class ValidatedSigner:
    """A signer certificate that passed :func:`validate_signer` at some instant.

    ``emails`` are the SAN rfc822Names, normalised (domain lower-cased, local part exact —
    RFC 5321 §2.4). ``evidence`` holds the DER of the CRLs/OCSP responses that covered the
    path, for the archive. ``[valid_from, valid_until)`` is the interval in which this same
    answer is provably unchanged (see :func:`_stable_interval`).
    """

    cert: x509.Certificate
    path: tuple[x509.Certificate, ...]
    emails: tuple[str, ...]
    organ_id: str | None
    evidence: tuple[bytes, ...]
    revocation_checked: bool
    valid_from: datetime
    valid_until: datetime


@dataclass(frozen=True)
class TrustStore:
    """What we trust: anchors, known intermediates, revocation evidence and the mode.

    A value: to refresh CRLs build a new store (:meth:`with_revocation`). CRLs may be given
    as objects or DER and are kept as DER, so stores compare and hash by content. Its companion
    :class:`Validator` (built once, holding parsed inputs and the result cache) lives in a
    private field that takes no part in equality.
    """

    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    crls: tuple[CRLInput, ...] = ()
    ocsps: tuple[bytes, ...] = ()
    revocation_mode: RevocationMode = "hard-fail"
    cache_size: int = 4096
    _validator: Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("anchors", "intermediates", "ocsps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        crls = tuple(_crl_der(c) for c in self.crls)
        object.__setattr__(self, "crls", crls)
        if not self.anchors:
            raise ConfigError("the trust store has no trust anchors; configure at least one CA")
        if self.revocation_mode not in ("hard-fail", "soft-fail"):
            raise ConfigError(
                f"revocation_mode {self.revocation_mode!r} is unknown; use hard-fail or soft-fail"
            )
        object.__setattr__(self, "_validator", Validator(self))

    def with_revocation(
        self, *, crls: Iterable[CRLInput] = (), ocsps: Iterable[bytes] = ()
    ) -> TrustStore:
        """The same anchors and intermediates with fresh revocation evidence (new cache)."""
        return TrustStore(
            self.anchors, self.intermediates, tuple(crls), tuple(ocsps), self.revocation_mode
        )

    def validate_signer(
        self, cert: x509.Certificate, *, carried: Sequence[x509.Certificate] = (), at: datetime
    ) -> ValidatedSigner:
        return self._validator.validate(cert, carried=carried, at=at)

    def revoked_on_record(self, cert: x509.Certificate, at: datetime) -> str | None:
        """Why the stored evidence, however old, says ``cert`` was revoked by ``at``; or
        ``None``. :meth:`validate_signer` reads only evidence that is current at ``at`` (in
        soft-fail mode, a certificate whose CRL is past its nextUpdate passes as having no
        evidence), but a revocation is for good (RFC 5280 §3.3): a CRL that lists the serial
        still proves it once newer ones are due. Counted: a CRL signed by the certificate's
        issuer (an anchor or intermediate of the store) listing its serial, and an OCSP
        response about it (verified when stored) saying revoked, each with a revocation date
        before ``at`` (as :meth:`validate_signer` counts it). A hold is not: it may have been
        lifted since, which only current evidence tells."""
        return self._validator.revoked_on_record(cert, at)


def validate_signer(
    store: TrustStore,
    cert: x509.Certificate,
    *,
    carried: Sequence[x509.Certificate] = (),
    at: datetime,
) -> ValidatedSigner:
    """Validate ``cert`` for e-mail signing at ``at``; see the module docstring for the plan."""
    return store.validate_signer(cert, carried=carried, at=at)


def describe(cert: x509.Certificate) -> str:
    """``certificate "CN=…,O=…" (serial 0x1A2B…)`` — how messages name a certificate."""
    return f'certificate "{name_of(lambda: cert.subject)}" (serial 0x{cert.serial_number:X})'


def name_of(name: Callable[[], x509.Name]) -> str:
    """A distinguished name as text, or a placeholder when it cannot be decoded: cryptography
    parses names lazily (on ``cert.subject``), and a message may carry a certificate whose name
    is not valid."""
    try:
        return name().rfc4514_string({ORGAN_ID_ATTRIBUTE: "serialNumber"})
    except ValueError:
        return "(a name that cannot be decoded)"


def check_algorithms(cert: x509.Certificate) -> None:
    """Refuse RSA < 2048, curves other than P-256/P-384, and MD5/SHA-1 (or unknown) hashes."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyTooSmall(
                f"{describe(cert)} has a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} "
                "bits are required — re-issue it with RSA-3072"
            )
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise KeyTooSmall(
                f"{describe(cert)} uses curve {key.curve.name}; only P-256 and P-384 are "
                "accepted — re-issue it on P-256 or with RSA-3072"
            )
    else:
        raise WeakAlgorithm(
            f"{describe(cert)} has a {type(key).__name__} key; only RSA and ECDSA are accepted"
        )
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:  # UnsupportedAlgorithm: an OID cryptography does not know
        algorithm = None
    name = algorithm.name if algorithm else cert.signature_algorithm_oid.dotted_string
    if name not in ALLOWED_HASHES:
        raise WeakAlgorithm(
            f"{describe(cert)} is signed with {name.upper()}; SHA-256 or stronger is required "
            "— ask the CA to re-issue it"
        )


class Validator:
    """The companion of one :class:`TrustStore`: parsed inputs built once, plus an LRU cache.

    pyhanko's ``ValidationContext`` fixes the moment at construction, so a light context is
    made per call from pieces prepared here (trust manager, parsed CRL/OCSP containers).
    """

    def __init__(self, store: TrustStore) -> None:
        self._store = store
        self._lock = threading.Lock()  # guards the result cache
        # asn1crypto parses lazily and caches what it parsed inside the objects (name
        # normalisation alone costs ~0.4 ms per fresh certificate), and pyhanko is pure
        # CPU-bound Python: run one validation at a time over shared, re-used parsed objects.
        self._work = threading.Lock()
        self._parsed: OrderedDict[bytes, asn1_x509.Certificate] = OrderedDict()
        self._crl_verified: dict[tuple[int, bytes], bool] = {}
        self._cache: OrderedDict[tuple[bytes, ...], ValidatedSigner] = OrderedDict()
        self._known: dict[bytes, x509.Certificate] = {}  # asn1crypto sha256 → certificate
        self._trust = SimpleTrustManager.build(
            trust_roots=[_asn1(c, self._known) for c in store.anchors]
        )
        self._intermediates = [_asn1(c, self._known) for c in store.intermediates]
        self._crl_ders = [_crl_der(c) for c in store.crls]
        self._crls = [x509.load_der_x509_crl(d) for d in self._crl_ders]
        self._crl_containers = process_legacy_crl_input(self._crl_ders)
        self._ocsps = [ocsp.load_der_ocsp_response(d) for d in store.ocsps]
        self._ocsp_containers = process_legacy_ocsp_input(list(store.ocsps))
        # Every instant at which some piece of evidence starts or stops being usable.
        self._starts: list[datetime] = [c.last_update_utc for c in self._crls]
        self._ends: list[datetime] = [t for c in self._crls if (t := c.next_update_utc)]
        for resp in self._ocsps:
            if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL:
                for single in resp.responses:
                    self._starts.append(single.this_update_utc)
                    self._ends += [t for t in (single.next_update_utc,) if t]
                for c in resp.certificates:
                    self._starts.append(c.not_valid_before_utc)
                    self._ends.append(c.not_valid_after_utc)

    # -- the plan ------------------------------------------------------------------------------

    def validate(
        self, cert: x509.Certificate, *, carried: Sequence[x509.Certificate], at: datetime
    ) -> ValidatedSigner:
        if at.utcoffset() is None:
            raise ValueError(f"{at!r} is naive; pass a timezone-aware datetime")
        # 1. cached success still provably valid at `at`
        key = (_fp(cert), *(_fp(c) for c in carried))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit.valid_from <= at < hit.valid_until:
                self._cache.move_to_end(key)
                return hit
        # 2. cheap refusals first
        check_algorithms(cert)
        with self._work:
            # 3.–5. path, revocation, usage
            path, unchecked = self._validate_path(cert, carried, at)
            # 6. the whole path must be strong; collect evidence
            for c in path[1:]:
                _check_path_cert(c)
            evidence = self._evidence(path, at)
        lo, hi = _stable_interval(path, self._crls, self._starts, self._ends, at)
        result = ValidatedSigner(
            cert=cert,
            path=path,
            emails=emails_of(cert),
            organ_id=_organ_id(cert),
            evidence=evidence,
            revocation_checked=not unchecked,
            valid_from=lo,
            valid_until=hi,
        )
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self._store.cache_size:
                self._cache.popitem(last=False)
        return result

    def _validate_path(
        self, cert: x509.Certificate, carried: Sequence[x509.Certificate], at: datetime
    ) -> tuple[tuple[x509.Certificate, ...], bool]:
        known = dict(self._known)
        try:
            leaf = self._parse(cert, known)
        except ValueError as exc:  # cryptography read it, asn1crypto cannot (a bad name…)
            raise self._untrusted(cert, f"unreadable certificate: {exc}") from None
        candidates = self._intermediates + self._carried(cert, carried, known)
        registry = CertificateRegistry.build(candidates)
        for root in self._trust.iter_certs():
            registry.register(root)
        policy: RevocationCheckingPolicy = REQUIRE_REVINFO
        assertions: list[NonRevokedStatusAssertion] = []
        soft = self._store.revocation_mode == "soft-fail"
        if soft:
            # Certificates with no usable evidence are let through, one by one. The leaf
            # cannot use an assertion (pyhanko would then skip the whole path), so it gets a
            # NO_CHECK end-entity rule instead.
            if not self._has_evidence(cert, at):
                policy = RevocationCheckingPolicy(
                    RevocationCheckingRule.NO_CHECK, RevocationCheckingRule.CRL_OR_OCSP_REQUIRED
                )
            for c in [*self._store.intermediates, *carried]:
                # Only CA certificates: the leaf is carried too, and an assertion on it would
                # make pyhanko skip revocation for the whole path (a CA revoked on a fresh CRL
                # would pass).
                if _is_ca(c) and _fp(c) != _fp(cert) and not self._has_evidence(c, at):
                    assertions.append(NonRevokedStatusAssertion(_fp(c), at))
        context = ValidationContext(
            trust_manager=self._trust,
            certificate_registry=registry,
            revinfo_manager=RevinfoManager(
                certificate_registry=registry,
                poe_manager=POEManager(),
                crls=self._crl_containers,
                ocsps=self._ocsp_containers,
                assertions=assertions,
            ),
            # Evidence issued after `at` proves the status at `at` as well (it lists the
            # revocation date): a message decided later than it arrived (a backlog, a restart,
            # a release) is judged with the evidence of now, not left waiting forever because
            # the CRL of its day has been replaced.
            revinfo_policy=CertRevTrustPolicy(policy, retroactive_revinfo=True),
            moment=at,
            allow_fetching=False,
            time_tolerance=timedelta(0),
        )
        try:
            paths = _FirstPaths(context.path_builder.async_build_paths_lazy(leaf), MAX_PATHS)
            found: ValidationPath = _drive(find_valid_path(leaf, paths, context))  # type: ignore[arg-type]
        except (AssertionError, ValueError, TypeError) as exc:  # pyhanko on a malformed path
            raise self._untrusted(cert, f"{type(exc).__name__} while building its path") from None
        except pv_errors.PathBuildingError as exc:
            raise self._untrusted(cert, str(exc)) from None
        except pv_errors.InvalidCertificateError as exc:  # self-signed, not an anchor
            raise self._untrusted(cert, str(exc)) from None
        except pv_errors.PathValidationError as exc:
            raise self._map_error(cert, exc, at, known) from None
        try:
            validate_usage(leaf, {"digital_signature"}, {"email_protection"}, False)
        except pv_errors.InvalidCertificateError:
            raise WrongKeyUsage(
                f"{describe(cert)} is not allowed to sign e-mail (it needs keyUsage "
                "digitalSignature and extKeyUsage emailProtection); re-issue it as an S/MIME "
                "certificate"
            ) from None
        path = tuple(reversed([known[c.sha256] for c in found.iter_certs(include_root=True)]))
        unchecked = soft and not all(self._has_evidence(c, at) for c in path[:-1])
        return path, unchecked

    # -- error mapping -------------------------------------------------------------------------

    def _untrusted(self, cert: x509.Certificate, detail: str) -> UntrustedSigner:
        return UntrustedSigner(
            f'{describe(cert)}, issued by "{name_of(lambda: cert.issuer)}", does not chain '
            "to a configured trust anchor; add the issuing CA to the trust store or have the "
            "certificate re-issued by a trusted CA",
            detail=detail,
        )

    def _map_error(
        self,
        cert: x509.Certificate,
        exc: pv_errors.PathValidationError,
        at: datetime,
        known: dict[bytes, x509.Certificate],
    ) -> Exception:
        # pyhanko paths run anchor → leaf; reverse to leaf first, like ours.
        path = [known.get(c.sha256) for c in exc.original_path.iter_certs(True)]
        on_path = [c for c in reversed(path) if c is not None] or [cert]
        if isinstance(exc, pv_errors.RevokedError):
            when = exc.revocation_dt
            who = next((c for c in on_path if self._revoked_at(c) == when), cert)
            return SignerRevoked(
                f"{describe(who)} was revoked on {when:%Y-%m-%d %H:%M:%SZ} "
                f"(reason: {_reason(exc)}); the agency must obtain a new "
                "certificate and re-send",
                detail=str(exc),
            )
        if isinstance(exc, pv_errors.ExpiredError):
            who = next((c for c in on_path if c.not_valid_after_utc == exc.expired_dt), cert)
            return CertificateExpired(
                f"{describe(who)} expired on {exc.expired_dt:%Y-%m-%d %H:%M:%SZ}, before "
                f"{at:%Y-%m-%d %H:%M:%SZ}; renew the certificate and re-send",
                detail=str(exc),
            )
        if isinstance(exc, pv_errors.NotYetValidError):
            who = next((c for c in on_path if c.not_valid_before_utc == exc.valid_from), cert)
            return CertificateNotYetValid(
                f"{describe(who)} is not valid until {exc.valid_from:%Y-%m-%d %H:%M:%SZ} "
                f"(checked at {at:%Y-%m-%d %H:%M:%SZ}); re-send once it is valid or check the "
                "CA's clock",
                detail=str(exc),
            )
        if isinstance(exc, pv_errors.InsufficientRevinfoError):
            below_anchor = on_path[:-1] if len(on_path) > 1 else on_path
            who = next((c for c in below_anchor if not self._has_evidence(c, at)), cert)
            return RevocationUnavailable(
                f"no current CRL or OCSP response covers {describe(who)} (issuer "
                f'"{who.issuer.rfc4514_string()}") at {at:%Y-%m-%d %H:%M:%SZ}; refresh the '
                "CRLs of the trust store",
                detail=str(exc),
            )
        if isinstance(exc, pv_errors.DisallowedAlgorithmError):
            return WeakAlgorithm(f"{describe(cert)}: {exc}", detail=str(exc))
        return self._untrusted(cert, str(exc))

    # -- evidence ------------------------------------------------------------------------------

    def _has_evidence(self, cert: x509.Certificate, at: datetime) -> bool:
        """Whether a CRL from ``cert``'s issuer, or an OCSP response about it, is fresh at ``at``."""
        for crl in self._crls:
            if crl.issuer == cert.issuer and _fresh(crl.last_update_utc, crl.next_update_utc, at):
                return True
        return any(True for _ in self._matching_ocsp(cert, at))

    def _matching_ocsp(self, cert: x509.Certificate, at: datetime) -> Iterable[bytes]:
        for der, resp in zip(self._store.ocsps, self._ocsps, strict=True):
            if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                continue
            for single in resp.responses:
                if single.serial_number == cert.serial_number and _fresh(
                    single.this_update_utc, single.next_update_utc, at
                ):
                    yield der

    def _evidence(self, path: tuple[x509.Certificate, ...], at: datetime) -> tuple[bytes, ...]:
        """DER of every fresh CRL/OCSP response, verified by the issuer, covering the path."""
        out: list[bytes] = []
        for child, issuer in pairwise(path):
            for index, (crl, der) in enumerate(zip(self._crls, self._crl_ders, strict=True)):
                if (
                    crl.issuer == child.issuer
                    and _fresh(crl.last_update_utc, crl.next_update_utc, at)
                    and self._crl_signed_by(index, crl, issuer)
                    and der not in out
                ):
                    out.append(der)
            out += [d for d in self._matching_ocsp(child, at) if d not in out]
        return tuple(out)

    def revoked_on_record(self, cert: x509.Certificate, at: datetime) -> str | None:
        """:meth:`TrustStore.revoked_on_record`."""
        known = (*self._store.anchors, *self._store.intermediates)
        issuers = [c for c in known if c.subject == cert.issuer]
        with self._work:  # _crl_signed_by's cache is shared with validations
            for index, crl in enumerate(self._crls):
                if crl.issuer != cert.issuer:
                    continue
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is None or entry.revocation_date_utc >= at:
                    continue
                try:
                    flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
                except x509.ExtensionNotFound:
                    flag = x509.ReasonFlags.unspecified
                if flag in _LIFTED:
                    continue
                if any(self._crl_signed_by(index, crl, issuer) for issuer in issuers):
                    why = flag.name.replace("_", " ")
                    return _revoked_text(cert, entry.revocation_date_utc, why, "a CRL")
        issuer_name = cert.issuer.public_bytes()
        for resp in self._ocsps:
            if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                continue
            for single in resp.responses:
                if (
                    single.serial_number == cert.serial_number
                    and single.certificate_status == ocsp.OCSPCertStatus.REVOKED
                    and (when := single.revocation_time_utc) is not None
                    and when < at
                    and single.issuer_name_hash == _digest(single.hash_algorithm, issuer_name)
                    and single.revocation_reason not in _LIFTED
                ):
                    said = single.revocation_reason or x509.ReasonFlags.unspecified
                    return _revoked_text(
                        cert, when, said.name.replace("_", " "), "an OCSP response"
                    )
        return None

    def _crl_signed_by(
        self, index: int, crl: x509.CertificateRevocationList, issuer: x509.Certificate
    ) -> bool:
        cache_key = (index, _fp(issuer))
        if cache_key not in self._crl_verified:
            key = issuer.public_key()
            self._crl_verified[cache_key] = isinstance(
                key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
            ) and crl.is_signature_valid(key)
        return self._crl_verified[cache_key]

    def _carried(
        self,
        cert: x509.Certificate,
        carried: Sequence[x509.Certificate],
        known: dict[bytes, x509.Certificate],
    ) -> list[asn1_x509.Certificate]:
        """The certificates a message carries, as path-building candidates: the first
        :data:`MAX_CARRIED` other than the signer's, skipping any asn1crypto cannot read (the
        set is not signed: anyone may add to it)."""
        out: list[asn1_x509.Certificate] = []
        for c in carried:
            if len(out) >= MAX_CARRIED:
                break
            if _fp(c) == _fp(cert):
                continue
            try:
                parsed = self._parse(c, known)
                # The registry keys certificates by name, which asn1crypto decodes lazily:
                # a name that is not what its string type says fails there, not when parsed.
                _ = (parsed.subject.hashable, parsed.issuer.hashable)
            except ValueError:  # (UnicodeDecodeError too)
                continue
            out.append(parsed)
        return out

    def _parse(
        self, cert: x509.Certificate, known: dict[bytes, x509.Certificate]
    ) -> asn1_x509.Certificate:
        """The asn1crypto form of ``cert``, re-used across calls (LRU, like the results)."""
        fp = _fp(cert)
        parsed = self._parsed.get(fp)
        if parsed is None:
            parsed = _asn1(cert, known)
            self._parsed[fp] = parsed
            while len(self._parsed) > self._store.cache_size:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(fp)
            known[parsed.sha256] = cert
        return parsed

    def _revoked_at(self, cert: x509.Certificate) -> datetime | None:
        for crl in self._crls:
            if crl.issuer == cert.issuer:
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None:
                    return entry.revocation_date_utc
        return None


# -- helpers -----------------------------------------------------------------------------------


def _stable_interval(
    path: tuple[x509.Certificate, ...],
    crls: Sequence[x509.CertificateRevocationList],
    revinfo_starts: Sequence[datetime],
    revinfo_ends: Sequence[datetime],
    at: datetime,
) -> tuple[datetime, datetime]:
    """The interval around ``at`` in which validating the same inputs gives the same success.

    pyhanko's verdict depends on the moment only through comparisons with a finite set of
    instants (with ``time_tolerance=0``): notBefore/notAfter of every certificate on the path;
    thisUpdate/nextUpdate of the CRLs and OCSP responses that may be consulted (all of them
    in the store, since soft-fail decides per certificate whether any evidence is fresh, and
    an OCSP responder certificate's validity); and the revocation date of a path certificate
    listed on a CRL (revoked *after* ``at`` still passes). Between two consecutive such
    instants every comparison has the same outcome, so the answer cannot change. Hence:
    ``[latest event <= at, earliest event > at)``. The bounds are exact for the pieces the
    brief names — latest notBefore on the path, earliest of notAfter on the path and the
    nextUpdate of the CRLs used — and tighter where other evidence has its own boundaries.

    Boundary care: "start" instants (notBefore, thisUpdate) are compared as ``start <= at``
    and "end" instants (notAfter, nextUpdate) as ``at <= end`` (revocation: ``revoked < at``
    means revoked), so at ``at == end`` the answer may differ from just after it. An end
    instant at or just before ``at`` therefore opens the interval one microsecond later
    (the resolution of ``datetime``), and ``at`` itself equal to an end instant yields a
    one-microsecond interval. The path chosen for a later ``at`` in the interval could differ
    only if an earlier candidate path started to pass; the cached path is still a valid one.
    """
    tick = timedelta(microseconds=1)
    starts = [c.not_valid_before_utc for c in path] + list(revinfo_starts)
    ends = [c.not_valid_after_utc for c in path] + list(revinfo_ends)
    for c in path:
        for crl in crls:
            entry = crl.get_revoked_certificate_by_serial_number(c.serial_number)
            if entry is not None:
                ends.append(entry.revocation_date_utc)
    if at in ends:
        return at, at + tick
    lo = max((t for t in starts if t <= at), default=datetime.min.replace(tzinfo=at.tzinfo))
    lo = max([lo, *(t + tick for t in ends if t < at)])
    hi = min((t for t in [*starts, *ends] if t > at), default=at.max.replace(tzinfo=at.tzinfo))
    return lo, hi


def _crl_der(crl: CRLInput) -> bytes:
    if isinstance(crl, x509.CertificateRevocationList):
        return crl.public_bytes(Encoding.DER)
    if isinstance(crl, bytes):
        return crl
    raise ConfigError(f"a CRL must be a CertificateRevocationList or DER bytes, not {type(crl)}")


#: Entries that may be lifted (RFC 5280 §5.3.1: a hold ends; removeFromCRL, in a delta CRL,
#: lifts one): only current evidence tells whether they still hold (:meth:`validate_signer`).
_LIFTED = (x509.ReasonFlags.certificate_hold, x509.ReasonFlags.remove_from_crl)


def _revoked_text(cert: x509.Certificate, when: datetime, reason: str, source: str) -> str:
    return (
        f"{describe(cert)} was revoked on {when:%Y-%m-%d %H:%M:%SZ} (reason: {reason}; "
        f"{source} of the key store says so)"
    )


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def _reason(exc: pv_errors.RevokedError) -> str:
    """RFC 5280 §5.3.1 reason code in words: ``key_compromise`` → ``key compromise``."""
    return str(exc.reason.native or "unspecified").replace("_", " ")


def _fresh(this_update: datetime | None, next_update: datetime | None, at: datetime) -> bool:
    """Whether evidence tells the status at ``at``: current then, or issued after it (it lists
    revocation dates, so a later CRL proves the status at an earlier moment as well)."""
    if this_update is None:
        return False
    return at < this_update or next_update is None or at <= next_update


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


class _FirstPaths:
    """At most ``limit`` of pyhanko's candidate paths: certificates carried in layers that
    share names make exponentially many (m per layer, k layers: m^k), each one validated."""

    def __init__(self, paths: Any, limit: int) -> None:
        self._paths, self._left = paths, limit

    def __aiter__(self) -> _FirstPaths:
        return self

    async def __anext__(self) -> ValidationPath:
        if self._left <= 0:
            raise StopAsyncIteration
        self._left -= 1
        path: ValidationPath = await self._paths.__anext__()
        return path

    async def cancel(self) -> None:
        await self._paths.cancel()


def _check_path_cert(cert: x509.Certificate) -> None:
    """:func:`check_algorithms` for a CA on the path; a self-signature's hash does not count."""
    try:
        check_algorithms(cert)
    except WeakAlgorithm:
        if cert.issuer != cert.subject:
            raise


def emails_of(cert: x509.Certificate) -> tuple[str, ...]:
    """The subjectAltName rfc822Names of ``cert``, normalised (:func:`normalize_email`)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out: list[str] = []
    for addr in san.get_values_for_type(x509.RFC822Name):
        try:
            out.append(normalize_email(addr))
        except ValueError:
            continue  # a malformed SAN entry can never match a From address
    return tuple(out)


def _organ_id(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(ORGAN_ID_ATTRIBUTE)
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


def _fp(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def _asn1(cert: x509.Certificate, known: dict[bytes, x509.Certificate]) -> asn1_x509.Certificate:
    parsed = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))
    known[parsed.sha256] = cert
    return parsed


def _drive(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never waits to completion without an event loop.

    With fetching disabled pyhanko's path validation awaits nothing but other coroutines, so
    it finishes on the first ``send``. That avoids creating, running and closing an event loop
    per call (and any unclosed-loop ResourceWarning). Should a future version really suspend,
    we refuse rather than guess.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("certificate validation tried to wait for I/O; fetching must stay off")
