"""Settings: where the stores are and how memshift names things in them.

Each setting comes from, in order of precedence: a command-line flag, an environment
variable, ``memshift.toml`` (a ``[memshift]`` table, or the same keys at top level),
then its default. Everything is validated when the settings are loaded, so a bad URL
fails at start with the name of the setting, never halfway through a migration.

Passwords never leave this module in clear: ``repr``/``str`` of ``Settings``,
``describe()`` and every error message show ``redact()``-ed values only.

Example::

    settings = load_settings({"redis_url": args.redis_url})   # flags; None = not given
    print(describe(settings))
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from memshift.errors import ConfigError
from memshift.redact import redact

__all__ = ["CONFIG_FILENAME", "DEFAULT_SECONDARY_TIMEOUT", "Settings", "describe",
           "explain_settings", "load_settings", "redact", "where_to_set"]

CONFIG_FILENAME: Final = "memshift.toml"
# How long a router's write to the secondary store may take before it counts as failed
# (queued for repair); the MigratingStore's default too.
DEFAULT_SECONDARY_TIMEOUT: Final = 2.0
_TOML_TABLE: Final = "memshift"
REDIS_SCHEMES: Final = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
# A ``:secret@`` left after redaction: a colon not starting ``//`` and not ``:***@``.
_LOOKS_LIKE_PASSWORD: Final = re.compile(r":(?!\*\*\*@)[^:/@\s]*@")


@dataclass(frozen=True, repr=False)
class Settings:
    """Validated settings; build them with ``load_settings()``.

    Constructing one directly validates it too, so every ``Settings`` is usable.
    """

    redis_url: str | None = field(
        default=None,
        metadata={
            "help": "Redis URL (redis://, rediss:// or unix://). Default: none, "
            "so `memshift demo` starts an embedded Redis."
        },
    )
    postgres_dsn: str | None = field(
        default=None,
        metadata={
            "help": "PostgreSQL DSN (URL or key=value). Default: none, "
            "so `memshift demo` starts an embedded PostgreSQL."
        },
    )
    layout: str = field(
        default="reference",
        metadata={
            "help": "Name of the Redis key layout the sessions are stored in. Default: reference."
        },
    )
    prefix: str = field(
        default="agent",
        metadata={"help": "Prefix of every Redis key memshift reads or writes. Default: agent."},
    )
    ttl_seconds: int | None = field(
        default=None,
        metadata={
            "help": "Expiry set on session keys written to Redis, in seconds. "
            "Default: none, keys do not expire."
        },
    )
    data_dir: Path = field(
        default=Path(".memshift"),
        metadata={
            "help": "Directory where embedded servers keep their data. "
            "Default: .memshift; a relative path in memshift.toml is taken "
            "from the file's directory."
        },
    )

    secondary_timeout_seconds: float = field(
        default=DEFAULT_SECONDARY_TIMEOUT,
        metadata={
            "help": "How long a router's write to PostgreSQL as the secondary store may "
            "take before it counts as failed and is queued for repair, in seconds. "
            f"Default: {DEFAULT_SECONDARY_TIMEOUT:g}."
        },
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f.name, getattr(self, f.name), "the value given")

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in describe(self).items())
        return f"Settings({shown})"

    __str__ = __repr__


def where_to_set(name: str) -> str:
    """Where setting ``name`` can be set, for messages: flag, environment variable, toml key."""
    return f"--{name.replace('_', '-')}, ${_env_var(name)} or `{name}` in {CONFIG_FILENAME}"


def require_stores(settings: Settings, job: str) -> tuple[str, str]:
    """(redis_url, postgres_dsn) for a job that needs both; ConfigError naming what to set."""
    if not settings.redis_url or not settings.postgres_dsn:
        raise ConfigError(
            f"{job} needs both stores: set --redis-url / MEMSHIFT_REDIS_URL and "
            "--postgres-dsn / MEMSHIFT_POSTGRES_DSN"
        )
    return settings.redis_url, settings.postgres_dsn


def describe(settings: Settings) -> dict[str, object]:
    """The settings as plain values fit for display or JSON, passwords replaced by ``***``."""
    return {
        "redis_url": _shown(settings.redis_url),
        "postgres_dsn": _shown(settings.postgres_dsn),
        "layout": settings.layout,
        "prefix": settings.prefix,
        "ttl_seconds": settings.ttl_seconds,
        "data_dir": str(settings.data_dir),
        "secondary_timeout_seconds": settings.secondary_timeout_seconds,
    }


def load_settings(
    overrides: Mapping[str, object | None],
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Settings from ``overrides`` (flags; ``None`` = not given) > ``env`` > toml > defaults.

    ``env`` defaults to ``os.environ``; an empty variable counts as unset.
    ``config_file`` defaults to ``memshift.toml`` in the current directory, which may be
    absent; a ``config_file`` named explicitly must exist.
    Raises ``ConfigError`` naming the setting, what is wrong and what to set.
    """
    return explain_settings(overrides, env=env, config_file=config_file)[0]


def explain_settings(
    overrides: Mapping[str, object | None],
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> tuple[Settings, dict[str, str]]:
    """``load_settings()`` and where each setting came from (``memshift config`` shows it).

    The origin is ``default``, ``flag --name``, ``environment variable MEMSHIFT_NAME``
    or ``key `name` in PATH``: the same words the error messages use.
    """
    names = [f.name for f in fields(Settings)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
    environ = os.environ if env is None else env
    toml_path = config_file if config_file is not None else Path(CONFIG_FILENAME)
    toml_values = _read_toml(toml_path, required=config_file is not None)

    values: dict[str, Any] = {}
    origins = dict.fromkeys(names, "default")
    for name in names:
        override = overrides.get(name)
        env_value = environ.get(_env_var(name), "")
        if override is not None:
            origin = f"flag --{name.replace('_', '-')}"
            value = _coerce(name, override, origin)
        elif env_value != "":
            origin = f"environment variable {_env_var(name)}"
            value = _coerce(name, env_value, origin)
        elif name in toml_values:
            origin = f"key `{name}` in {toml_path}"
            value = _coerce(name, toml_values[name], origin, from_toml=True)
            if name == "data_dir" and not value.is_absolute():
                value = toml_path.parent / value
        else:
            continue
        _check(name, value, origin)
        values[name] = value
        origins[name] = origin
    return Settings(**values), origins


def _env_var(name: str) -> str:
    return f"MEMSHIFT_{name.upper()}"


def _shown(secret: str | None) -> str | None:
    if secret is None:
        return None
    shown = _safely_redacted(secret) if "://" in secret else _kv_redacted(secret)
    return "<hidden: may hold a password>" if shown is None else shown


def _kv_redacted(dsn: str) -> str | None:
    """A key=value DSN rebuilt with its password as ``***`` (as error messages show it);
    ``None`` when libpq cannot parse it, so where its password ends is unknown."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return None
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def _problem(name: str, origin: str, what: str, todo: str) -> ConfigError:
    return ConfigError(f"setting {name} ({where_to_set(name)}) from {origin}: {what}; {todo}")


def _read_toml(path: Path, *, required: bool) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"config file {path} does not exist; create it or leave out the config file"
            ) from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        # tomllib reports position only, never the offending text, so this cannot leak.
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix that line") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None

    table = document.get(_TOML_TABLE)
    if isinstance(table, dict):
        extra = sorted(k for k in document if k != _TOML_TABLE)
        if extra:
            raise ConfigError(
                f"config file {path}: key(s) {', '.join(extra)} outside the [{_TOML_TABLE}] "
                f"table; move them into [{_TOML_TABLE}]"
            )
        document = table
    known = {f.name for f in fields(Settings)}
    unknown = sorted(k for k in document if k not in known)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; "
            f"the known keys are {', '.join(sorted(known))}"
        )
    return dict(document)


def _coerce(name: str, raw: object, origin: str, *, from_toml: bool = False) -> Any:
    """``raw`` turned into the type of setting ``name``; strings from env/flags are parsed."""
    if name == "ttl_seconds":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and not from_toml:
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise _problem(
            name,
            origin,
            f"expected a whole number of seconds, got {_typed(raw)}",
            "set it to a positive integer such as 86400, or leave it unset",
        )
    if name == "secondary_timeout_seconds":
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str) and not from_toml:
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise _problem(
            name,
            origin,
            f"expected a number of seconds, got {_typed(raw)}",
            f"set it to a number above 0 such as {DEFAULT_SECONDARY_TIMEOUT:g}, or leave it unset",
        )
    if name == "data_dir":
        if isinstance(raw, Path) and not from_toml:
            return raw
        if isinstance(raw, str) and raw.strip():
            return Path(raw).expanduser()
        raise _problem(
            name,
            origin,
            f"expected a directory path, got {_typed(raw)}",
            "set it to a directory such as .memshift",
        )
    if isinstance(raw, str):
        return raw
    raise _problem(
        name,
        origin,
        f"expected a string, got {_typed(raw)}",
        f'give it as a quoted string, e.g. {name} = "..."',
    )


def _echo(text: str) -> str:
    """``text`` quoted for a message, redacted; hidden whole if a password may survive."""
    shown = _safely_redacted(text)
    return "the value (not shown: it may hold a password)" if shown is None else repr(shown)


def _safely_redacted(text: str) -> str | None:
    """``redact(text)``, or ``None`` when a password may have survived redaction.

    ``redact`` only recognises passwords in URLs with a scheme and in ``password=``
    pairs; a malformed value such as ``user:pw@host`` passes through it intact, and
    a space ends a password for it, so ``password=my secret`` would still show ``secret``.
    """
    shown = redact(text)
    spaced_secret = re.search(r"\s", shown) and ("@" in shown or "password" in shown.lower())
    if _LOOKS_LIKE_PASSWORD.search(shown) or spaced_secret:
        return None
    return shown


def _typed(raw: object) -> str:
    """How a wrongly typed value is described in messages: its type, its text redacted."""
    if isinstance(raw, str):
        return _echo(raw)
    if isinstance(raw, bool | int | float):
        return f"{type(raw).__name__} {raw!r}"
    return type(raw).__name__


def _check(name: str, value: object, origin: str) -> None:
    """Raise ``ConfigError`` when ``value`` is not valid for setting ``name``."""
    if name == "redis_url":
        if value is not None:
            _check_redis_url(_str(name, value, origin), origin)
    elif name == "postgres_dsn":
        if value is not None:
            _check_dsn(_str(name, value, origin), origin)
    elif name in ("layout", "prefix"):
        text = _str(name, value, origin)
        # A layout may also be the path of a description file (docs/layouts/custom.md).
        if name == "layout" and re.fullmatch(r"[A-Za-z0-9_./-]+\.toml", text):
            return
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
            raise _problem(
                name,
                origin,
                f"{_echo(text)} is not a plain name",
                "use letters, digits, '_', '-' or '.', with no spaces or ':'"
                + (" (or the path of a layout description ending in .toml)"
                   if name == "layout" else ""),
            )
    elif name == "ttl_seconds":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise _problem(
                name,
                origin,
                f"{_typed(value)} is not a positive number of seconds",
                "set it to a positive integer such as 86400, or leave it unset",
            )
    elif name == "secondary_timeout_seconds":
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 < value < math.inf):
            raise _problem(
                name,
                origin,
                f"{_typed(value)} is not a number of seconds above 0",
                f"set it to a number above 0 such as {DEFAULT_SECONDARY_TIMEOUT:g}, "
                "or leave it unset",
            )
    elif name == "data_dir" and not isinstance(value, Path):
        raise _problem(
            name,
            origin,
            f"expected a path, got {_typed(value)}",
            "set it to a directory such as .memshift",
        )


def _str(name: str, value: object, origin: str) -> str:
    if not isinstance(value, str):
        raise _problem(
            name, origin, f"expected a string, got {_typed(value)}", "give it as a string"
        )
    return value


def _check_redis_url(url: str, origin: str) -> None:
    todo = (
        "set it to redis://host[:port][/db] (a password goes before the host as "
        ":password@, percent-encoded), rediss://... for TLS, or unix:///path/to/redis.sock"
    )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - reading it validates it
    except ValueError:
        raise _problem(
            "redis_url", origin, f"{_echo(url)} has an invalid host or port", todo
        ) from None
    if re.search(r"\s", url):
        raise _problem(
            "redis_url",
            origin,
            f"{_echo(url)} contains spaces",
            "percent-encode them (%20) or remove them",
        )
    if parts.scheme not in REDIS_SCHEMES:
        scheme = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise _problem(
            "redis_url",
            origin,
            f"{_echo(url)} has {scheme}, not one of {', '.join(REDIS_SCHEMES)}",
            todo,
        )
    if parts.scheme == "unix" and not parts.path:
        raise _problem("redis_url", origin, f"{_echo(url)} names no socket path", todo)
    db = parts.path.lstrip("/") if parts.scheme != "unix" else ""
    if db and not db.isdigit():
        raise _problem("redis_url", origin, f"{_echo(url)} has database {db!r}, not a number", todo)


def _check_dsn(dsn: str, origin: str) -> None:
    userinfo = dsn.partition("://")[2].rpartition("@")[0]
    if "@" in userinfo and "?" not in userinfo:
        # libpq ends the userinfo at the first '@': the rest of the password would be
        # taken for the host, and quoted in its connection error.
        raise _problem(
            "postgres_dsn", origin, f"{_echo(dsn)} has an unencoded '@' in its user or "
            "password", "percent-encode it as %40 (e.g. p%40ss for p@ss)")
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise _problem(
            "postgres_dsn",
            origin,
            f"{_echo(dsn)} cannot be parsed ({_safe_libpq_message(str(exc))})",
            "set it to a URL such as postgresql://app@db.example:5432/memory (a password "
            "goes after the user as user:password@, with '@', ':' and '/' in it "
            "percent-encoded) or to key=value pairs such as 'host=db.example dbname=memory "
            "user=app'",
        ) from None


def _safe_libpq_message(message: str) -> str:
    """libpq's parse error with quoted fragments elided unless they are option names.

    libpq quotes the part of the DSN it choked on, which for a malformed DSN can be the
    password itself (``user:pw@host`` without a scheme), so only option names and
    punctuation stay.
    """
    keywords = {opt.keyword.decode() for opt in psycopg.pq.Conninfo.get_defaults()}

    def keep(match: re.Match[str]) -> str:
        plain = match[1] in keywords or not re.search(r"[A-Za-z0-9]", match[1])
        return match[0] if plain else '"…"'

    return redact(re.sub(r'"([^"]*)"', keep, message.strip()))
