"""The obligation matrix in the database, and the presets shipped in :mod:`gateway.presets`.

An edge, like :mod:`keys.store`: functions take an open session and the moment ``at``, turn rows
into :class:`~gateway.obligations.Obligation` values, and record every change as an admin event
(:func:`keys.store.record`) in the same transaction, so a change and its record commit or fail
together. Checks come before writes: a refused change leaves the database as it was.

Every OrganId of an obligation must be in the agency directory, and valid for the obligation's
whole window (an obligation of a merged body ends on its last day; the successor's row starts
the next day). :func:`add` refuses an obligation that breaks the window rule; a preset load
reports it as a warning instead, since the directory may have been edited after its preset.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime
from importlib import resources
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import tables as t
from formats.errors import InputError
from gateway.obligations import DueRule, Obligation, active, as_dict, from_dict
from keys import store
from keys.directory import Agency

_PREFIX = "obligations-"
_TOML_TABLE = re.compile(r"^\s*\[\[\s*obligation\s*\]\]\s*(#.*)?$")
_HINT = "load the agencies first with `gateway agencies import --preset hanoi` or add it with "


# --- presets -------------------------------------------------------------------------------------


def preset_names() -> tuple[str, ...]:
    """The obligation presets shipped with the gateway (``hanoi-2017``)."""
    files = resources.files("gateway.presets").iterdir()
    return tuple(
        sorted(
            f.name.removeprefix(_PREFIX).removesuffix(".toml")
            for f in files
            if f.name.startswith(_PREFIX) and f.name.endswith(".toml")
        )
    )


def preset(name: str, *, working_days: int | None = None) -> tuple[Obligation, ...]:
    """Preset ``name``'s obligations; ``working_days`` replaces the working-days due rules' n."""
    if name not in preset_names():
        raise InputError(
            f"no obligation preset {name!r}; the presets are: {', '.join(preset_names())}"
        )
    data = resources.files("gateway.presets").joinpath(f"{_PREFIX}{name}.toml").read_bytes()
    return read_preset(data, source=f"preset {name}", working_days=working_days)


def read_preset(
    data: bytes, *, source: str, working_days: int | None = None
) -> tuple[Obligation, ...]:
    """Read a preset file: ``[groups]`` of OrganIds and ``[[obligation]]`` tables in the shape
    of :func:`~gateway.obligations.as_dict`, where ``"@group"`` in ``recipients`` stands for the
    group's members and a provider ``"@group"`` makes one obligation per member (``{provider}``
    in the id becomes the member's code in lower case without ``H26.``: ``H26.Q.BADINH`` →
    ``q-badinh``)."""
    try:
        text = data.decode("utf-8")
        doc = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{source}: not valid UTF-8 TOML: {exc}") from None
    unknown = sorted(set(doc) - {"preset", "groups", "obligation"})
    if unknown:
        raise InputError(f"{source}: unknown top-level key {unknown[0]!r}")
    groups = doc.get("groups", {})
    tables = doc.get("obligation", [])
    if not isinstance(groups, dict):
        raise InputError(f"{source}: groups must be a table, written [groups]")
    if not isinstance(tables, list) or not all(isinstance(x, dict) for x in tables):
        raise InputError(
            f"{source}: 'obligation' must be an array of tables, written [[obligation]]"
        )
    lines = [n for n, line in enumerate(text.split("\n"), start=1) if _TOML_TABLE.match(line)]
    out: list[Obligation] = []
    seen: dict[str, str] = {}
    for index, table in enumerate(tables):
        where = f"{source}: line {lines[index]}" if len(lines) == len(tables) else source
        for values in _expand(dict(table), groups, where):
            obligation = from_dict(values, where=where, working_days=working_days)
            if obligation.id in seen:
                raise InputError(
                    f"{where}: id {obligation.id} is already used at {seen[obligation.id]}"
                )
            seen[obligation.id] = where
            out.append(obligation)
    return tuple(out)


def _expand(table: dict[str, Any], groups: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    def members(name: str) -> list[str]:
        group = groups.get(name.removeprefix("@"))
        if not isinstance(group, list) or not all(isinstance(g, str) for g in group):
            raise InputError(f"{where}: no group {name!r} in [groups]")
        return list(group)

    recipients = table.get("recipients")
    if isinstance(recipients, list):
        table["recipients"] = [
            m
            for r in recipients
            for m in (members(r) if isinstance(r, str) and r.startswith("@") else [r])
        ]
    provider = table.get("provider")
    if not (isinstance(provider, str) and provider.startswith("@")):
        return [table]
    if "{provider}" not in str(table.get("id")):
        raise InputError(f"{where}: a provider group needs {{provider}} in the id")
    return [
        {**table, "provider": p, "id": str(table["id"]).replace("{provider}", _slug(p))}
        for p in members(provider)
    ]


def _slug(organ_id: str) -> str:
    return organ_id.lower().removeprefix("h26.").replace(".", "-")


# --- reading -------------------------------------------------------------------------------------


def to_value(row: t.Obligation) -> Obligation:
    return Obligation(
        id=row.id,
        provider=row.provider,
        recipients=tuple(row.recipients),
        category=row.category,
        cadence=row.cadence,
        due=DueRule.from_dict(row.due),
        legal_basis=row.legal_basis,
        valid_from=row.valid_from,
        valid_to=row.valid_to,
        note=row.note,
    )


def obligations(
    s: Session, *, at: date | None = None, provider: str | None = None
) -> list[Obligation]:
    """Every obligation (by id), or those in force on ``at``, or of ``provider``."""
    query = select(t.Obligation).order_by(t.Obligation.id)
    if provider is not None:
        query = query.where(t.Obligation.provider == provider)
    rows = [to_value(r) for r in s.scalars(query)]
    return [o for o in rows if at is None or active(o, at)]


def of_providers(s: Session, providers: Collection[str]) -> list[Obligation]:
    """The obligations of any of ``providers`` (one query; the column is indexed)."""
    if not providers:
        return []
    query = select(t.Obligation).where(t.Obligation.provider.in_(sorted(providers)))
    return [to_value(r) for r in s.scalars(query.order_by(t.Obligation.id))]


def get(s: Session, obligation_id: str) -> Obligation:
    row = s.get(t.Obligation, obligation_id)
    if row is None:
        raise InputError(f"no obligation {obligation_id!r}; `gateway obligations list` shows them")
    return to_value(row)


# --- checks against the directory ----------------------------------------------------------------


def window_problems(obligation: Obligation, directory: Mapping[str, Agency]) -> list[str]:
    """Raise if an OrganId is not in ``directory``; return, one line each, the agencies not
    valid for the obligation's whole window."""
    problems = []
    parties = [("provider", obligation.provider)] + [
        ("recipient", r) for r in obligation.recipients
    ]
    for role, organ_id in parties:
        agency = directory.get(organ_id)
        if agency is None:
            raise InputError(
                f"obligation {obligation.id}: {role} {organ_id} is not in the agency directory; "
                f"{_HINT}`gateway agencies add {organ_id}`"
            )
        starts_late = agency.valid_from and (
            obligation.valid_from is None or obligation.valid_from < agency.valid_from
        )
        ends_early = agency.valid_to and (
            obligation.valid_to is None or obligation.valid_to > agency.valid_to
        )
        if starts_late or ends_early:
            fix = (
                f"end the obligation by {agency.valid_to} (a successor gets its own)"
                if ends_early
                else f"start the obligation on {agency.valid_from} or later"
            )
            problems.append(
                f"obligation {obligation.id}: {role} {organ_id} is valid {_span(agency)} but "
                f"the obligation runs {_span(obligation)}; {fix}, or correct the agency's dates"
            )
    return problems


def _span(x: Agency | Obligation) -> str:
    if x.valid_from and x.valid_to:
        return f"from {x.valid_from} to {x.valid_to}"
    if x.valid_from:
        return f"from {x.valid_from} with no end"
    return f"until {x.valid_to}" if x.valid_to else "with no dates"


def _directory(s: Session) -> dict[str, Agency]:
    return {a.organ_id: a for a in store.agencies(s)}


# --- changes -------------------------------------------------------------------------------------


def add(
    s: Session, obligation: Obligation, *, at: datetime, actor: str, source: str = "admin"
) -> None:
    """Add a new obligation; its id must be new and its agencies valid over its window."""
    if s.get(t.Obligation, obligation.id) is not None:
        raise InputError(f"obligation {obligation.id} already exists; choose another id")
    problems = window_problems(obligation, _directory(s))
    if problems:
        raise InputError(problems[0])
    _insert(s, obligation, at=at, actor=actor, source=source)


def _insert(s: Session, obligation: Obligation, *, at: datetime, actor: str, source: str) -> None:
    d = as_dict(obligation)
    s.add(
        t.Obligation(
            **{**_columns(obligation), "source": source, "created_at": at, "updated_at": at}
        )
    )
    store.record(
        s, at=at, actor=actor, action="obligation.add", subject=obligation.id, **d, source=source
    )


def _columns(obligation: Obligation) -> dict[str, Any]:
    """The table row: :func:`~gateway.obligations.as_dict`, with dates as dates."""
    return as_dict(obligation) | {
        "valid_from": obligation.valid_from,
        "valid_to": obligation.valid_to,
    }


def retire(
    s: Session, obligation_id: str, *, last_day: date, at: datetime, actor: str
) -> Obligation:
    """End an obligation on ``last_day`` (inclusive). Only shortens; nothing is deleted."""
    old = get(s, obligation_id)
    if old.valid_from and last_day < old.valid_from:
        raise InputError(
            f"{obligation_id} starts on {old.valid_from}; it cannot be retired on {last_day}"
        )
    if old.valid_to and last_day > old.valid_to:
        raise InputError(
            f"{obligation_id} already ends on {old.valid_to}; retiring cannot extend it "
            "(add a new obligation instead)"
        )
    row = s.get(t.Obligation, obligation_id)
    assert row is not None
    row.valid_to, row.updated_at = last_day, at
    store.record(
        s,
        at=at,
        actor=actor,
        action="obligation.retire",
        subject=obligation_id,
        last_day=str(last_day),
    )
    return to_value(row)


@dataclass(frozen=True)
class Plan:
    """What loading a preset changes. ``kept``: rows an admin changed since loading (with the
    differing fields), left alone unless ``overwrite``; ``warnings``: agencies not valid over
    an obligation's window."""

    add: tuple[Obligation, ...]
    update: tuple[Obligation, ...]
    unchanged: tuple[str, ...]
    kept: tuple[tuple[str, tuple[str, ...]], ...]
    warnings: tuple[str, ...] = ()

    @property
    def changes(self) -> int:
        return len(self.add) + len(self.update)


def plan_preset(
    existing: Sequence[Obligation], entries: Sequence[Obligation], *, overwrite: bool = False
) -> Plan:
    """Pure: what loading ``entries`` over ``existing`` does (rows not in the preset stay)."""
    current = {o.id: o for o in existing}
    add_, update, unchanged, kept = [], [], [], []
    for new in entries:
        old = current.get(new.id)
        if old is None:
            add_.append(new)
        elif old == new:
            unchanged.append(new.id)
        elif overwrite:
            update.append(new)
        else:
            differs = tuple(
                f.name for f in fields(Obligation) if getattr(old, f.name) != getattr(new, f.name)
            )
            kept.append((new.id, differs))
    return Plan(tuple(add_), tuple(update), tuple(unchanged), tuple(kept))


def load_preset(
    s: Session,
    entries: Sequence[Obligation],
    *,
    source: str,
    overwrite: bool = False,
    at: datetime,
    actor: str,
) -> Plan:
    """Load preset ``entries``, all or nothing: every row is checked before any is written.
    Loading the same preset again changes nothing and records nothing."""
    plan = plan_preset(obligations(s), entries, overwrite=overwrite)
    directory = _directory(s)
    missing = sorted(
        {o for ob in plan.add + plan.update for o in (ob.provider, *ob.recipients)} - set(directory)
    )
    if missing:
        others = (
            f" (nor are {len(missing) - 1} other OrganIds of {source})" if len(missing) > 1 else ""
        )
        raise InputError(
            f"{source}: {missing[0]} is not in the agency directory{others}; {_HINT}"
            f"`gateway agencies add {missing[0]}`"
        )
    warnings = [w for ob in plan.add + plan.update for w in window_problems(ob, directory)]
    for obligation in plan.add:
        _insert(s, obligation, at=at, actor=actor, source=source)
    for obligation in plan.update:
        row = s.get(t.Obligation, obligation.id)
        assert row is not None
        before = as_dict(to_value(row))
        for key, value in _columns(obligation).items():
            setattr(row, key, value)
        row.source, row.updated_at = source, at
        after = as_dict(obligation)
        changed = {k: [v, after[k]] for k, v in before.items() if after[k] != v}
        store.record(
            s,
            at=at,
            actor=actor,
            action="obligation.update",
            subject=obligation.id,
            changed=changed,
        )
    if plan.changes:
        store.record(
            s,
            at=at,
            actor=actor,
            action="obligation.load-preset",
            subject="obligations",
            source=source,
            added=[o.id for o in plan.add],
            updated=[o.id for o in plan.update],
        )
    return Plan(plan.add, plan.update, plan.unchanged, plan.kept, tuple(warnings))
