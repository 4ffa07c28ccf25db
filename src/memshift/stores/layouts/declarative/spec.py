"""A declarative layout's description: read from TOML, checked whole before any use.

Every problem is a ConfigError naming the file, the section, the key and what to
write instead, so a description either loads or says exactly why not. The format is
documented with a worked example in docs/layouts/custom.md.
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memshift.errors import ConfigError
from memshift.model import SESSION_STATUSES, TOOL_STATUS_RANK

__all__ = ["REQUIRED", "SECTIONS", "KeyPattern", "LayoutSpec", "Section", "load_spec"]

# Per section: the Redis type its key holds, the model fields it can map (True:
# required), and which options it takes.
_FIELDS: dict[str, dict[str, bool]] = {
    "session": {"tenant_id": False, "user_id": False, "status": False, "version": False,
                "created_at": False, "updated_at": False, "messages_trimmed": False,
                "metadata": False},
    "messages": {"message_id": False, "role": True, "content": True, "ts": False,
                 "tool_call_id": False, "metadata": False},
    "tool_runs": {"name": True, "args": False, "status": False, "attempts": False,
                  "last_error": False, "updated_at": False, "metadata": False},
    "summary": {"version": True, "text": True, "covers_through": False,
                "updated_at": False, "metadata": False},
    "checkpoint": {"checkpoint_id": True, "parent_id": False, "step": True, "state": False,
                   "created_at": False, "metadata": False},
}
SECTIONS = tuple(_FIELDS)
REQUIRED = {name: frozenset(f for f, needed in fields.items() if needed)
            for name, fields in _FIELDS.items()}
_TYPES = {"session": "hash", "messages": "list", "tool_runs": "hash", "summary": "string",
          "checkpoint": "string"}
_OPTIONS = {"key", "type", "fields", "statuses", "order", "timestamps"}
_ORDERS = ("oldest_first", "newest_first")
_TIMESTAMPS = ("iso", "epoch_ms")
_STATUSES = {"session": frozenset(SESSION_STATUSES), "tool_runs": frozenset(TOOL_STATUS_RANK)}
_TOP_LEVEL = {"description", "prefix", *SECTIONS}


@dataclass(frozen=True)
class KeyPattern:
    """A key with ``{prefix}`` and one ``{id}`` in it (``{{`` and ``}}`` for braces)."""

    text: str
    parts: tuple[tuple[str, str | None], ...]  # (literal text, placeholder after it)

    def key(self, prefix: str, session_id: str) -> str:
        values = {"prefix": prefix, "id": session_id, None: ""}
        return "".join(literal + values[name] for literal, name in self.parts)

    def glob(self, prefix: str) -> str:
        """The SCAN MATCH pattern: glob characters of the fixed text escaped, ``*`` for id."""
        values = {"prefix": _glob_escape(prefix), "id": "*", None: ""}
        return "".join(_glob_escape(literal) + values[name] for literal, name in self.parts)

    def regex(self, prefix: str) -> re.Pattern[str]:
        values = {"prefix": re.escape(prefix), "id": "(?P<id>.+)", None: ""}
        return re.compile(
            "".join(re.escape(literal) + values[name] for literal, name in self.parts), re.S
        )


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@dataclass(frozen=True)
class Section:
    """One part of a session in Redis: where it is, and how its fields map to the model."""

    name: str  # session, messages, tool_runs, summary or checkpoint
    key: KeyPattern
    type: str
    fields: dict[str, str]  # model field -> their field or JSON member
    statuses: dict[str, str] = field(default_factory=dict)  # theirs -> ours
    order: str = "oldest_first"
    timestamps: str = "iso"

    def rule(self, model_field: str) -> str:
        """How the description names the rule for a model field (for error messages)."""
        return f"[{self.name}] fields.{model_field} = {self.fields[model_field]!r}"

    def theirs(self, ours: str) -> str:
        """The status name written for our status: the first of theirs that maps to it."""
        return next((t for t, o in self.statuses.items() if o == ours), ours)


@dataclass(frozen=True)
class LayoutSpec:
    path: Path
    sections: dict[str, Section]
    prefix: str | None = None  # used when memshift's prefix is left at its default
    description: str = ""

    @property
    def discovery(self) -> Section:
        """The section whose keys SCAN finds: the session hash, else the messages."""
        return self.sections.get("session") or self.sections["messages"]


def load_spec(path: Path) -> LayoutSpec:
    """Read and check a layout description; ConfigError saying what is wrong if it fails."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"layout file {path} does not exist; give the path of a .toml "
                          "file that describes the keys (see docs/layouts/custom.md)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"layout file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"layout file {path} is not valid TOML: {exc}; fix that line") from None
    return _spec(path, document)


def _spec(path: Path, document: Mapping[str, Any]) -> LayoutSpec:
    def fail(where: str, problem: str) -> ConfigError:
        return ConfigError(f"layout file {path}: {where}: {problem}")

    unknown = sorted(set(document) - _TOP_LEVEL)
    if unknown:
        raise fail(f"top level {', '.join(unknown)}",
                   f"unknown; the known tables and keys are {', '.join(sorted(_TOP_LEVEL))}")
    sections = {name: _section(name, document[name], fail) for name in SECTIONS
                if name in document}
    if "session" not in sections and "messages" not in sections:
        raise fail("top level", "a [session] or a [messages] table is needed: SCAN finds "
                   "sessions by the session hash, or by the messages list without one")
    keys = [s.key.text for s in sections.values()]
    for name, section in sections.items():
        if keys.count(section.key.text) > 1:
            raise fail(f"[{name}] key", f"{section.key.text!r} is the key of another table "
                       "too; each part of a session needs a key of its own")
    prefix = document.get("prefix")
    if prefix is not None and not (isinstance(prefix, str) and prefix):
        raise fail("prefix", f"{prefix!r} is not a non-empty string")
    description = document.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "must be a string")
    return LayoutSpec(path, sections, prefix, description)


def _section(name: str, table: Any, fail: Any) -> Section:
    where = f"[{name}]"
    if not isinstance(table, dict):
        raise fail(where, f"must be a table ([{name}] with key = ..., type = ...)")
    unknown = sorted(set(table) - _OPTIONS)
    if unknown:
        raise fail(f"{where} {', '.join(unknown)}",
                   f"unknown; a table takes {', '.join(sorted(_OPTIONS))}")
    if "key" not in table:
        raise fail(f"{where} key", 'missing; e.g. key = "{prefix}:chat:{id}"')
    key = _pattern(table["key"], lambda problem: fail(f"{where} key", problem))
    kind = table.get("type", _TYPES[name])
    if kind != _TYPES[name]:
        raise fail(f"{where} type", f"{kind!r} is not supported here; [{name}] is read from a "
                   f"Redis {_TYPES[name]}")
    fields = _fields(name, table.get("fields", {}), lambda k, p: fail(f"{where} {k}", p))
    statuses = _statuses(name, table.get("statuses", {}), lambda p: fail(f"{where} statuses", p))
    order = table.get("order", "oldest_first")
    if "order" in table and name != "messages":
        raise fail(f"{where} order", "only [messages] has an order")
    if order not in _ORDERS:
        raise fail(f"{where} order", f"{order!r}; use oldest_first (RPUSH) or newest_first "
                   "(LPUSH)")
    timestamps = table.get("timestamps", "iso")
    if timestamps not in _TIMESTAMPS:
        raise fail(f"{where} timestamps", f"{timestamps!r}; use iso or epoch_ms (how memshift "
                   "writes times; both are read)")
    return Section(name, key, kind, fields, statuses, order, timestamps)


def _pattern(text: Any, fail: Any) -> KeyPattern:
    if not isinstance(text, str) or not text:
        raise fail(f"{text!r} is not a key pattern; e.g. \"{{prefix}}:chat:{{id}}\"")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise fail(f"{text!r}: {exc}; write a literal brace as {{{{ or }}}}") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    bad = [n for n in names if n not in ("prefix", "id")]
    if bad:
        raise fail(f"{text!r} has {{{bad[0]}}}; only {{prefix}} and {{id}} can be used")
    if names.count("id") != 1:
        raise fail(f"{text!r} must hold {{id}} exactly once, where the session id goes")
    if any(spec or conversion for _, name, spec, conversion in parsed if name is not None):
        raise fail(f"{text!r}: a placeholder takes no format (write {{id}}, not {{id:...}})")
    return KeyPattern(text, tuple((literal, name) for literal, name, _, _ in parsed))


def _fields(section: str, table: Any, fail: Any) -> dict[str, str]:
    if not isinstance(table, dict):
        raise fail("fields", "must be a table of model field = their field name")
    known = _FIELDS[section]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise fail(f"fields.{unknown[0]}", f"is not a field of [{section}]; the fields are "
                   f"{', '.join(known)}")
    for ours, theirs in table.items():
        if not isinstance(theirs, str) or not theirs:
            raise fail(f"fields.{ours}", f"{theirs!r} is not a field name")
    names = list(table.values())
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise fail("fields", f"{twice[0]!r} is mapped twice; map each of their fields once")
    missing = [f for f, required in known.items() if required and f not in table]
    if missing:
        raise fail(f"fields.{missing[0]}", f"missing: [{section}] needs it; write "
                   f'{missing[0]} = "<your field name>"')
    return dict(table)


def _statuses(section: str, table: Any, fail: Any) -> dict[str, str]:
    if not table:
        return {}
    if section not in _STATUSES:
        raise fail(f"only [session] and [tool_runs] have statuses, not [{section}]")
    if not isinstance(table, dict):
        raise fail("must be a table of their status = our status")
    ours = _STATUSES[section]
    for theirs, mapped in table.items():
        if mapped not in ours:
            raise fail(f"{theirs} = {mapped!r}: {mapped!r} is not a memshift status; use one "
                       f"of {', '.join(sorted(ours))}")
    return dict(table)
