"""Keyspace notifications: the flags a layout needs (checked, or set, on every primary),
which session a changed key belongs to, and the thread that turns one server's
notifications into pending sessions."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memshift.errors import ConfigError, StoreUnavailable
from memshift.observe.metrics import REGISTRY
from memshift.redact import redact
from memshift.stores.layouts import Layout

if TYPE_CHECKING:
    from memshift.migrate.follow.follower import Follower

log = logging.getLogger("memshift.follow")

# Events that change no state PostgreSQL keeps (a TTL set or removed).
_IGNORED_EVENTS = frozenset({b"expire", b"persist"})
_GLOB = re.compile(rb"([*?\[\]\\])")

EVENTS = Counter(
    "memshift_follow_events", "Keyspace notifications the follower received.",
    registry=REGISTRY,
)


class NotificationsOff(ConfigError):
    """Redis does not send the keyspace notifications the layout needs."""


# notify-keyspace-events classes, in Redis's own order; "A" stands for all of them.
_ALL_CLASSES = "g$lshzxetd"
# The class of the events on a key, by a command that reads a key of that type.
_CLASS_OF_COMMAND = {
    **dict.fromkeys(("HGETALL", "HGET", "HMGET", "HKEYS", "HVALS", "HLEN", "HSCAN"), "h"),
    **dict.fromkeys(("LRANGE", "LINDEX", "LLEN", "LPOS"), "l"),
    **dict.fromkeys(("GET", "MGET", "GETRANGE", "STRLEN"), "$"),
    **dict.fromkeys(("SMEMBERS", "SSCAN", "SCARD", "SISMEMBER"), "s"),
    **dict.fromkeys(("ZRANGE", "ZREVRANGE", "ZRANGEBYSCORE", "ZSCAN", "ZCARD"), "z"),
    **dict.fromkeys(("XRANGE", "XREVRANGE", "XLEN"), "t"),
    **dict.fromkeys(("PTTL", "TTL", "EXISTS", "TYPE", "PEXPIRETIME", "EXPIRETIME"), ""),
}


def command_name(command: tuple[Any, ...]) -> str:
    """The name of a command a layout reads with, in upper case."""
    head = command[0]
    return (head.decode() if isinstance(head, bytes) else str(head)).upper()


def required_flags(layout: Layout) -> str:
    """The notify-keyspace-events flags the layout needs, e.g. ``Kg$lhxt``.

    K (keyspace channels), g (DEL, RENAME...), x (expired) and the class of each key
    type the layout reads. A command this table does not know asks for every class.
    """
    classes = set("gx")
    for command in layout.read_commands("s"):
        found = _CLASS_OF_COMMAND.get(command_name(command))
        classes.update(_ALL_CLASSES if found is None else found)
    return "K" + "".join(c for c in _ALL_CLASSES if c in classes)


def _flags(value: str) -> set[str]:
    return set(value.replace("A", _ALL_CLASSES))


def missing_flags(current: str, required: str) -> str:
    """The flags of ``required`` that the setting ``current`` lacks ('' when none)."""
    have = _flags(current)
    return "".join(c for c in required if c not in have)


def with_flags(current: str, required: str) -> str:
    """``current`` with the ``required`` flags added (what is set now is kept)."""
    have = _flags(current) | _flags(required)
    classes = "A" if set(_ALL_CLASSES) <= have else "".join(c for c in _ALL_CLASSES if c in have)
    return "".join(c for c in "KE" if c in have) + classes + "".join(c for c in "mn" if c in have)


def primaries(client: Any) -> dict[str, Any]:
    """The servers that send a key's notifications: the one server, or every primary."""
    get_primaries = getattr(client, "get_primaries", None)
    if get_primaries is None:
        return {"redis": client}
    return {node.name: node.redis_connection for node in get_primaries()}


def _where(name: str, client: Any) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix socket {kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}" if name == "redis" \
        else name


def ensure_notifications(client: Any, layout: Layout, *, configure: bool) -> dict[str, str]:
    """Check (and with ``configure``, set) notify-keyspace-events on every primary.

    Returns each node's setting before any change. Raises NotificationsOff naming the
    setting to make when a node lacks flags and ``configure`` is false.
    """
    required = required_flags(layout)
    nodes = primaries(client)
    before: dict[str, str] = {}
    lacking: dict[str, str] = {}
    for name, node in nodes.items():
        try:
            reply = node.config_get("notify-keyspace-events")
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis {_where(name, node)} cannot be reached ({type(exc).__name__}: "
                f"{redact(str(exc))}); check that it runs and that the URL is right"
            ) from None
        except ResponseError as exc:
            raise NotificationsOff(
                f"cannot read notify-keyspace-events on Redis {_where(name, node)} ({exc}); "
                f"set it to include {required} in the server's configuration (redis.conf or "
                "the provider's parameter group), then start memshift follow again"
            ) from None
        current = _text(_config_value(reply))
        before[name] = current
        if missing_flags(current, required):
            lacking[name] = current
    if lacking and not configure:
        raise NotificationsOff(
            f"Redis does not send the keyspace notifications memshift follow needs for "
            f"layout {layout.name!r}: "
            + "; ".join(
                f"on {_where(name, nodes[name])} notify-keyspace-events is "
                f"{current!r}, missing {missing_flags(current, required)!r}: run `CONFIG SET "
                f"notify-keyspace-events {with_flags(current, required)}`"
                for name, current in lacking.items()
            )
            + " (on every primary, and in redis.conf so that a restart keeps it), or pass "
            "--configure-redis to let memshift follow set it"
        )
    for name, current in lacking.items():
        nodes[name].config_set(
            "notify-keyspace-events", with_flags(current, required)
        )
        log.warning("set notify-keyspace-events on %s to %s (was %r)", name,
                    with_flags(current, required), current)
    return before


def _config_value(reply: Any) -> Any:
    if isinstance(reply, dict):
        for key, value in reply.items():
            if _text(key) == "notify-keyspace-events":
                return value
        return ""
    return reply[1] if isinstance(reply, list | tuple) and len(reply) > 1 else ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


class KeyMap:
    """Which session a Redis key belongs to, and the channel patterns to subscribe to.

    Built from ``layout.session_keys``: each key of a session is some text, the id,
    then some more text. A key that matches several (the reference layout's
    ``{p}:session:a:messages`` is session ``a``'s transcript, or the hash of a session
    ``a:messages``) goes to the one with the longest tail, as SCAN discovery decides.
    """

    _MARK = "\x00memshift-session-id\x00"

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        shapes = []
        for key in layout.session_keys(self._MARK):
            head, found, tail = key.partition(self._MARK)
            if not found:
                raise ConfigError(
                    f"layout {layout.name!r} names keys that do not contain the session id "
                    f"({key!r}), so memshift follow cannot tell whose key changed"
                )
            shapes.append((head.encode("utf-8", "surrogateescape"),
                           tail.encode("utf-8", "surrogateescape")))
        # Longest tail first: the most specific reading of a key wins.
        self._shapes = sorted(set(shapes), key=lambda s: len(s[1]), reverse=True)

    def patterns(self, db: int) -> list[bytes]:
        """PSUBSCRIBE patterns of the keyspace channels of every key of every session."""
        heads = sorted({head for head, _ in self._shapes})
        return [b"__keyspace@%d__:" % db + _GLOB.sub(rb"\\\1", head) + b"*" for head in heads]

    def session_of(self, key: bytes) -> str | None:
        for head, tail in self._shapes:
            if key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail):
                return key[len(head) : len(key) - len(tail)].decode("utf-8", "surrogateescape")
        return None


class Listener(threading.Thread):
    """Receives one Redis server's keyspace notifications into the pending sessions.

    redis-py re-subscribes by itself after a lost connection, silently: a second
    subscription confirmation is how the follower learns that notifications were
    lost, and asks the sweeper to catch up from the last moment it was sure of.
    """

    def __init__(self, follower: Follower, name: str, client: Any) -> None:
        super().__init__(name=f"memshift-follow-{name}", daemon=True)
        self.f = follower
        self.client = client
        self.node = name
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        self.patterns = follower.keymap.patterns(db)
        self.prefix_len = len(b"__keyspace@%d__:" % db)
        self.subscribed = threading.Event()

    def run(self) -> None:
        alive = time.monotonic()
        first = True
        while not self.f.stopping.is_set():
            try:
                with self.client.pubsub() as pubsub:
                    pubsub.psubscribe(*self.patterns)
                    confirmations = 0
                    while not self.f.stopping.is_set():
                        message = pubsub.get_message(timeout=0.2)
                        if message is None:
                            alive = time.monotonic()
                            continue
                        if message["type"] == "psubscribe":
                            confirmations += 1
                            if confirmations > len(self.patterns) or not first:
                                self.f.lost(self.node, alive)
                            if confirmations >= len(self.patterns):
                                first = False
                                self.subscribed.set()
                            continue
                        alive = time.monotonic()
                        self._receive(message, alive)
            except (RedisError, OSError) as exc:
                log.warning("keyspace notifications from %s lost (%s); reconnecting",
                            self.node, redact(str(exc)))
                self.f.stopping.wait(1.0)
            except BaseException as exc:  # a bug: stop, rather than follow deaf
                self.f.crashed(exc)
                raise

    def _receive(self, message: dict[str, Any], at: float) -> None:
        if message["data"] in _IGNORED_EVENTS:
            return
        session_id = self.f.keymap.session_of(message["channel"][self.prefix_len :])
        if session_id is not None:
            self.f.pending.add(session_id, at)
            EVENTS.inc()
