"""The demo world: a throw-away PKI, a few Hanoi agencies, and sample submissions.

Everything here is disposable test material made at run time; nothing is trusted outside the
demo's own home directory. The OrganIds are illustrative, not the official edXML codes.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from archive.db import Database
from formats.categories import Value
from formats.cms_envelope import RecipientKey
from formats.payload import Organ, Payload, Signer, build_payload
from formats.smime import build_message
from gateway.loading import dump_directory
from gateway.pipeline import Context
from keys import agency_io, evidence, presets, store
from keys.directory import Agency, Directory
from keys.issuing import Issued, issue_agency, issue_hub, make_crl, make_root
from keys.trust import TrustStore

HUB_ADDRESS = "hub@exchange.hanoi.gov.vn"

#: A few bodies named in Article 8 of QĐ 18/2017 (as they are after the 2025 mergers).
DEMO_AGENCIES: tuple[Agency, ...] = (
    Agency(
        "H26.UBND",
        "Ủy ban nhân dân thành phố Hà Nội",
        "Hanoi People's Committee",
        frozenset(),
    ),
    Agency(
        "H26.CATP",
        "Công an thành phố Hà Nội",
        "Hanoi City Police",
        frozenset({"pa08@congan.hanoi.gov.vn"}),
    ),
    Agency(
        "H26.SNV",
        "Sở Nội vụ thành phố Hà Nội",
        "Hanoi Department of Home Affairs",
        frozenset({"vanthu@snv.hanoi.gov.vn"}),
        supervisor="H26.UBND",
    ),
    Agency(
        "H26.STP",
        "Sở Tư pháp thành phố Hà Nội",
        "Hanoi Department of Justice",
        frozenset({"vanthu@stp.hanoi.gov.vn"}),
        supervisor="H26.UBND",
    ),
)

WORK_PERMITS: tuple[dict[str, Value], ...] = (
    {
        "FullName": "Nguyen Thi Lan Anh",
        "Nationality": "KOR",
        "PassportNumber": "M12345678",
        "DateOfBirth": date(1988, 3, 14),
        "Sex": "F",
        "Decision": "issued",
        "PermitNumber": "HN-2026-004512",
        "IssuedOn": date(2026, 10, 2),
        "ValidFrom": date(2026, 10, 5),
        "ValidUntil": date(2028, 10, 4),
        "Position": "Kỹ sư trưởng",
        "Employer": "Công ty TNHH Điện tử Hà Nội Hi-Tech",
        "WorkplaceAddress": "KCN Thăng Long, Đông Anh, Hà Nội",
    },
    {
        "FullName": "John Michael Carter",
        "Nationality": "USA",
        "PassportNumber": "567812345",
        "DateOfBirth": date(1979, 11, 2),
        "Sex": "M",
        "Decision": "extended",
        "PermitNumber": "HN-2024-001177",
        "IssuedOn": date(2026, 10, 9),
        "ValidFrom": date(2026, 10, 12),
        "ValidUntil": date(2027, 10, 11),
        "Position": "Giáo viên tiếng Anh",
        "Employer": "Trường Quốc tế Hà Nội",
        "WorkplaceAddress": "Tây Hồ, Hà Nội",
    },
)


_STP = next(a for a in DEMO_AGENCIES if a.organ_id == "H26.STP")


@dataclass
class DemoWorld:
    """The PKI and directory of the demo, made at ``at``."""

    at: datetime
    root: Issued
    hub: Issued
    agencies: dict[str, Issued]
    revoked: dict[str, Issued] = field(default_factory=dict)
    directory: Directory = field(default_factory=lambda: Directory.of(DEMO_AGENCIES))

    @classmethod
    def create(cls, at: datetime, progress: Callable[[str], None] = lambda _: None) -> DemoWorld:
        start = at - timedelta(days=30)
        progress("root CA")
        root = make_root("Hanoi Official-Mail Demo Root CA (throw-away)", at=start)
        progress("hub certificate")
        hub = issue_hub(root, email=HUB_ADDRESS, at=start)
        agencies = {}
        for agency in (a for a in DEMO_AGENCIES if a.emails):
            progress(f"certificate for {agency.organ_id}")
            agencies[agency.organ_id] = issue_agency(
                root,
                email=sorted(agency.emails)[0],
                organ_id=agency.organ_id,
                common_name=agency.name_en,
                organization=agency.name_vi,
                at=start,
            )
        progress("a certificate that will be revoked")
        revoked = issue_agency(
            root,
            email=sorted(_STP.emails)[0],
            organ_id=_STP.organ_id,
            common_name="Hanoi Department of Justice (lost laptop)",
            at=start,
        )
        return cls(at, root, hub, agencies, {"H26.STP": revoked})

    def crl(self) -> bytes:
        entries = [
            (c.cert.serial_number, self.at - timedelta(days=2)) for c in self.revoked.values()
        ]
        crl = make_crl(
            self.root,
            revoked=entries,
            this_update=self.at - timedelta(days=1),
            next_update=self.at + timedelta(days=7),
            number=1,
        )
        return crl.public_bytes(Encoding.DER)

    def context(self) -> Context:
        trust = TrustStore(anchors=(self.root.cert,), crls=(self.crl(),))
        key = self.hub.key
        assert isinstance(key, rsa.RSAPrivateKey)
        return Context(
            keys=(RecipientKey(self.hub.cert, key),), trust=trust, directory=self.directory
        )

    def submission(
        self,
        sender: str,
        *,
        signer: Issued | None = None,
        from_addr: str | None = None,
        payload_from: str | None = None,
        number: int = 1,
        period: str = "2026-10",
        to: Sequence[x509.Certificate] = (),
    ) -> bytes:
        """A signed and encrypted monthly work-permit submission from ``sender`` to the police
        for the monthly ``period`` (YYYY-MM: the 16th of the month before to the 15th),
        encrypted to the hub's certificate (or to ``to``)."""
        payload = self.payload(sender, payload_from=payload_from, number=number, period=period)
        return self.submission_of(payload, sender, signer=signer, from_addr=from_addr, to=to)

    def payload(
        self,
        sender: str,
        *,
        payload_from: str | None = None,
        number: int = 1,
        period: str = "2026-10",
        message_id: uuid.UUID | None = None,
    ) -> Payload:
        """The work-permit payload of :meth:`submission` (a new MessageId unless given)."""
        agency = self.directory.get(sender)
        police = self.directory.get("H26.CATP")
        assert agency is not None and police is not None
        return build_payload(
            "work-permit",
            sender=Organ(payload_from or agency.organ_id, agency.name_vi, sorted(agency.emails)[0]),
            recipients=[Organ(police.organ_id, police.name_vi, sorted(police.emails)[0])],
            records=WORK_PERMITS,
            document_number=f"{number}/SNV-VLATLĐ",
            issued_on=self.at.date(),
            message_id=message_id or uuid.UUID(bytes=os.urandom(16), version=4),
            period=period,
            subject=f"Thông tin người nước ngoài được cấp giấy phép lao động kỳ {period}",
            signer=Signer("Trần Văn Minh", "Phó Giám đốc"),
        )

    def submission_of(
        self,
        payload: Payload,
        sender: str,
        *,
        signer: Issued | None = None,
        from_addr: str | None = None,
        to: Sequence[x509.Certificate] = (),
    ) -> bytes:
        """``payload`` signed as ``sender`` (by ``signer``, from ``from_addr``: its first
        mailbox's by default) and encrypted to the hub (or to ``to``)."""
        agency = self.directory.get(sender)
        assert agency is not None
        address = from_addr or sorted(agency.emails)[0]
        issued = signer or self.agencies[sender]
        period = payload.exchange.period_end
        return build_message(
            payload.to_xml(),
            signer_cert=issued.cert,
            signer_key=issued.key,
            recipients=list(to) or [self.hub.cert],
            from_addr=address,
            to_addrs=[HUB_ADDRESS],
            message_id=f"<{uuid.UUID(bytes=os.urandom(16), version=4)}@{address.split('@')[1]}>",
            date=self.at,
            subject=f"Báo cáo kỳ {period:%Y-%m}: giấy phép lao động" if period else "Báo cáo",
        )

    def write_home(self, home: Path, passphrase: bytes) -> None:
        """A complete gateway home that ``gateway --home HOME check`` can use."""
        (home / "keys").mkdir(parents=True, exist_ok=True)
        (home / "keys").chmod(0o700)
        for sub in ("trust/anchors", "trust/crls", "messages", "agencies"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        _write(home / "keys/passphrase", passphrase + b"\n", private=True)
        _write(home / "keys/hub.pem", self.hub.cert_pem())
        _write(home / "keys/hub.key", self.hub.key_pem(passphrase), private=True)
        _write(home / "trust/anchors/demo-root.pem", self.root.cert_pem())
        _write(home / "trust/crls/demo-root.crl", self.crl())
        for organ_id, issued in self.agencies.items():
            _write(home / f"agencies/{organ_id}.pem", issued.cert_pem())
            _write(home / f"agencies/{organ_id}.key", issued.key_pem(passphrase), private=True)
        (home / "agencies.toml").write_text(dump_directory(self.directory), encoding="utf-8")
        (home / "gateway.toml").write_text(
            "# Demo home: throw-away keys, do not use in production.\n"
            f'[hub]\naddress = "{HUB_ADDRESS}"\npassphrase_file = "keys/passphrase"\n',
            encoding="utf-8",
        )

    def install(
        self,
        home: Path,
        passphrase: bytes,
        *,
        smtp: str = "127.0.0.1:0",
        relay_port: int = 25,
        metrics: str = "127.0.0.1:0",
        admin: str = "",
        workers: int = 2,
        extra_config: str = "",
        preset: str | None = None,
        database_url: str | None = None,
    ) -> Path:
        """A home for ``gateway serve`` with everything in the database: the directory, the
        trust anchor and its CRL, the hub key (encrypted under ``passphrase``) and each
        agency's certificate. Returns the database file."""
        (home / "keys").mkdir(parents=True, exist_ok=True)
        (home / "keys").chmod(0o700)
        _write(home / "keys/passphrase", passphrase + b"\n", private=True)
        (home / "gateway.toml").write_text(
            "# Demo home: throw-away keys, do not use in production.\n"
            f'[hub]\naddress = "{HUB_ADDRESS}"\npassphrase_file = "keys/passphrase"\n'
            f'organ_id = "H26.CONG"\n\n'
            f'[listen]\nsmtp = "{smtp}"\n\n'
            f'[relay]\nhost = "127.0.0.1"\nport = {relay_port}\nsecurity = "none"\n\n'
            f'[serve]\nworkers = {workers}\nmetrics = "{metrics}"\nadmin_address = "{admin}"\n'
            + (f'\n[database]\nurl = "{database_url}"\n' if database_url else "")
            + extra_config,
            encoding="utf-8",
        )
        db = Database.open(database_url or f"sqlite:///{home / 'archive.db'}")
        try:
            with db.session() as s:
                for agency in self._agencies(preset):
                    store.add_agency(s, agency, at=self.at, actor="demo")
                store.add_certificate(s, self.root.cert, role="anchor", at=self.at, actor="demo")
                crl = x509.load_der_x509_crl(self.crl())
                evidence.add_crl(s, crl, source="demo", at=self.at, actor="demo")
                key = self.hub.key
                assert isinstance(key, rsa.RSAPrivateKey)
                store.add_private_key(
                    s,
                    self.hub.cert,
                    key,
                    role="hub",
                    passphrase=passphrase,
                    at=self.at,
                    actor="demo",
                )
                for organ_id, issued in self.agencies.items():
                    store.add_certificate(
                        s, issued.cert, role="agency", organ_id=organ_id, at=self.at, actor="demo"
                    )
        finally:
            db.dispose()
        return home / "archive.db"

    def _agencies(self, preset: str | None) -> list[Agency]:
        """The demo's agencies, or a preset's with the demo's e-mail addresses filled in."""
        if preset is None:
            return list(self.directory)
        entries = agency_io.read(presets.data(preset), source=f"preset {preset}", fmt="toml")
        out = []
        for entry in entries:
            mine = self.directory.get(entry.agency.organ_id)
            out.append(
                dataclasses.replace(entry.agency, emails=mine.emails) if mine else entry.agency
            )
        return out


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def tamper(message: bytes) -> bytes:
    """Flip one bit in the middle of the encrypted body (an EFAIL-style CBC gadget attempt)."""
    body = message.index(b"\r\n\r\n") + 4
    pos = body + (len(message) - body) // 2
    while message[pos : pos + 1] in (b"\r", b"\n", b"="):
        pos += 1
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    index = alphabet.index(message[pos : pos + 1])
    swapped = alphabet[index ^ 1 : (index ^ 1) + 1]
    return message[:pos] + swapped + message[pos + 1 :]
