"""A TCP fault proxy for outage tests, in the spirit of psycopg's test proxy and Toxiproxy.

Worked example::

    with FaultProxy("127.0.0.1", 5432) as proxy:
        conn = psycopg.connect(proxy.dsn_for(dsn))
        proxy.cut()          # the connection dies now, mid-query included
        proxy.refuse()       # new connections are reset at once
        proxy.hang()         # nothing is forwarded; clients wait for their own timeouts
        proxy.cut_after(n)   # connections accepted from now on die after n server bytes
        proxy.heal()         # plain forwarding again

One background thread runs a ``selectors`` loop over the listening socket and every
connection pair. The test thread never touches a socket: each fault method hands a
command to the loop and waits until the loop has applied it, so when ``hang()`` returns
no further byte is forwarded, and when ``cut()`` returns every connection is gone.

Only loopback addresses are accepted, both to listen on and to forward to.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import psycopg

_CHUNK = 64 * 1024
# Stop reading a side while this much is waiting for the other, so a slow reader
# holds back a fast writer instead of growing the buffer without bound.
_BUFFER_CAP = 256 * 1024
_UPSTREAM_CONNECT_TIMEOUT = 2.0
_COMMAND_TIMEOUT = 5.0
_JOIN_TIMEOUT = 5.0


class Mode(enum.Enum):
    FORWARD = "forward"
    REFUSE = "refuse"
    HANG = "hang"
    CUT_AFTER = "cut_after"


@dataclasses.dataclass
class ProxyStats:
    """Counters since the proxy started; ``proxy.stats`` returns a copy."""

    accepted: int = 0
    refused: int = 0
    cut: int = 0
    upstream_failures: int = 0
    bytes_to_server: int = 0
    bytes_to_client: int = 0


def _loopback_address(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """Resolve ``host``; refuse anything but a loopback address."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        if ipaddress.ip_address(address).is_loopback:
            return family, address
    raise ValueError(f"FaultProxy only uses loopback addresses; {host!r} is not one")


def _abort(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN, as a crashed peer or a dropped link would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Link:
    """One client connection and, once forwarding, its connection to the target."""

    def __init__(self, client: socket.socket, budget: int | None) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.to_server = bytearray()
        self.to_client = bytearray()
        # Bytes from the server still allowed through before the link is cut.
        self.budget = budget
        self.eof = False
        self.closed = False

    def sockets(self) -> list[socket.socket]:
        return [self.client] if self.server is None else [self.client, self.server]


class FaultProxy:
    """Forward TCP from a loopback port to ``target_host:target_port``, with faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self._target = _loopback_address(target_host, target_port)[1], target_port
        self._listen_family, self._listen_host = _loopback_address(listen_host, listen_port)
        self._listen_port = listen_port
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._dead = False
        # Only the loop thread reads or writes the fields below once started.
        self._mode = Mode.FORWARD
        self._budget = 0
        self._links: set[_Link] = set()
        self._selector = selectors.DefaultSelector()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        try:
            listener = socket.socket(self._listen_family, socket.SOCK_STREAM)
            self._listener = listener
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self._listen_host, self._listen_port))
            listener.listen(64)
            listener.setblocking(False)
            self._listen_port = listener.getsockname()[1]
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ, self._on_accept)
            self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
            self._thread = threading.Thread(
                target=self._run, name=f"FaultProxy:{self._listen_port}", daemon=True
            )
            self._thread.start()
        except BaseException:
            self._close_own_sockets()
            raise
        return self

    def close(self) -> None:
        """Stop the loop, close every socket, and join the thread (bounded)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._stopping = True
            self._wake()
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError(f"FaultProxy thread did not stop in {_JOIN_TIMEOUT}s")
        self._close_own_sockets()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("FaultProxy loop failed") from error

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- addresses ---------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._listen_host

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("FaultProxy not started: use it as a context manager")
        return self._listen_port

    def dsn_for(self, dsn: str) -> str:
        """``dsn`` (key=value or URL) pointed at the proxy instead of its server."""
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        # libpq connects to hostaddr when given and only uses host for its name.
        hostaddr = self.host if "hostaddr" in params else None
        return psycopg.conninfo.make_conninfo(
            dsn, host=self.host, port=str(self.port), hostaddr=hostaddr
        )

    def redis_url_for(self, url: str) -> str:
        """A ``redis://`` or ``rediss://`` URL pointed at the proxy, credentials kept."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"FaultProxy needs a TCP Redis URL, not {parts.scheme}://")
        userinfo = parts.netloc.rpartition("@")[0]
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = f"{userinfo}@{host}:{self.port}" if userinfo else f"{host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- faults ------------------------------------------------------------------

    def refuse(self) -> None:
        """Reset new connections at once; existing ones keep working."""
        self._call(lambda: self._set_mode(Mode.REFUSE))

    def hang(self) -> None:
        """Forward nothing, on new and existing connections, until ``heal()``."""
        self._call(lambda: self._set_mode(Mode.HANG))

    def cut(self) -> None:
        """Reset every existing connection now; new ones are served as before."""
        self._call(self._cut_all)

    def cut_after(self, n_bytes: int) -> None:
        """Cut each connection accepted from now on after ``n_bytes`` from the server.

        The count includes the protocol's handshake (for PostgreSQL, authentication
        and parameter status messages: well under 1 KiB).
        """
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")

        def apply() -> None:
            self._budget = n_bytes
            self._set_mode(Mode.CUT_AFTER)

        self._call(apply)

    def heal(self) -> None:
        """Forward normally again; connections accepted while hung are cut."""
        self._call(lambda: self._set_mode(Mode.FORWARD))

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    # -- the test thread's side ----------------------------------------------------

    def _call(self, command: Callable[[], None]) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("FaultProxy is not running")
        done = threading.Event()
        self._commands.put((command, done))
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT):
            raise RuntimeError(f"FaultProxy did not apply the command in {_COMMAND_TIMEOUT}s")
        if self._dead:
            raise RuntimeError("FaultProxy stopped before applying the command")

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass  # the loop is gone or its wake buffer is full; either way it knows

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def _close_own_sockets(self) -> None:
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._selector.close()

    # -- the loop thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._selector.select():
                    handler: Callable[[int], None] = key.data
                    handler(mask)
        except BaseException as error:
            self._error = error
        finally:
            for link in list(self._links):
                self._close_link(link, abort=True, counted=False)
            self._dead = True
            self._release_waiters()

    def _release_waiters(self) -> None:
        while True:
            try:
                _, done = self._commands.get_nowait()
            except queue.Empty:
                return
            done.set()

    def _on_wake(self, mask: int) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(_CHUNK):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            finally:
                done.set()

    def _on_accept(self, mask: int) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._mode is Mode.REFUSE:
            self._count(refused=1)
            _abort(client)
            return
        self._count(accepted=1)
        client.setblocking(False)
        link = _Link(client, self._budget if self._mode is Mode.CUT_AFTER else None)
        self._links.add(link)
        if self._mode is not Mode.HANG:
            self._connect_upstream(link)
        self._settle(link)

    def _connect_upstream(self, link: _Link) -> None:
        try:
            server = socket.create_connection(self._target, timeout=_UPSTREAM_CONNECT_TIMEOUT)
        except OSError:
            self._count(upstream_failures=1)
            self._close_link(link, abort=True, counted=False)
            return
        server.setblocking(False)
        link.server = server

    def _set_mode(self, mode: Mode) -> None:
        self._mode = mode
        for link in list(self._links):
            if mode is not Mode.HANG and link.server is None:
                # Accepted while hung: the client has waited on a dead link; let it
                # see the cut rather than a late, half-forwarded conversation.
                self._close_link(link, abort=True)
            else:
                self._update(link)

    def _cut_all(self) -> None:
        for link in list(self._links):
            self._close_link(link, abort=True)

    def _update(self, link: _Link) -> None:
        """Register each socket of ``link`` for exactly the events it can act on now."""
        if link.closed:
            return
        if link.server is None:
            self._watch(link.client, 0, link)
            return
        flowing = self._mode is not Mode.HANG
        reading = flowing and not link.eof
        client_events = server_events = 0
        if reading and len(link.to_server) < _BUFFER_CAP:
            client_events |= selectors.EVENT_READ
        if reading and len(link.to_client) < _BUFFER_CAP and link.budget != 0:
            server_events |= selectors.EVENT_READ
        if flowing and link.to_client:
            client_events |= selectors.EVENT_WRITE
        if flowing and link.to_server:
            server_events |= selectors.EVENT_WRITE
        self._watch(link.client, client_events, link)
        self._watch(link.server, server_events, link)

    def _watch(self, sock: socket.socket, events: int, link: _Link) -> None:
        try:
            current = self._selector.get_key(sock).events
        except KeyError:
            current = 0
        if events == current:
            return
        if not events:
            self._selector.unregister(sock)
            return

        def on_ready(mask: int) -> None:
            self._on_ready(link, sock, mask)

        if current:
            self._selector.modify(sock, events, on_ready)
        else:
            self._selector.register(sock, events, on_ready)

    def _on_ready(self, link: _Link, sock: socket.socket, mask: int) -> None:
        from_client = sock is link.client
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(link, sock, link.to_client if from_client else link.to_server)
            if mask & selectors.EVENT_READ and not link.closed:
                self._receive(link, sock, from_client)
        except OSError:
            self._close_link(link, abort=True, counted=False)
            return
        self._settle(link)

    def _flush(self, link: _Link, sock: socket.socket, pending: bytearray) -> None:
        sent = sock.send(pending)
        del pending[:sent]
        if sock is link.client:
            self._count(bytes_to_client=sent)
        else:
            self._count(bytes_to_server=sent)

    def _receive(self, link: _Link, sock: socket.socket, from_client: bool) -> None:
        data = sock.recv(_CHUNK)
        if not data:
            link.eof = True
        elif from_client:
            link.to_server += data
        else:
            if link.budget is not None:
                data = data[: link.budget]
                link.budget -= len(data)
            link.to_client += data

    def _settle(self, link: _Link) -> None:
        """Close ``link`` once it has nothing left to deliver, else re-arm it."""
        if link.closed:
            return
        if link.budget == 0 and not link.to_client:
            self._close_link(link, abort=True)
        elif link.eof and not link.to_client and not link.to_server:
            # Neither PostgreSQL nor Redis half-closes: one side's EOF ends the talk.
            self._close_link(link, abort=False, counted=False)
        else:
            self._update(link)

    def _close_link(self, link: _Link, *, abort: bool, counted: bool = True) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        if counted:
            # Counted before the close, so a client woken by it already sees the count.
            self._count(cut=1)
        for sock in link.sockets():
            try:
                self._selector.unregister(sock)
            except KeyError:
                pass
            if abort:
                _abort(sock)
            else:
                sock.close()
