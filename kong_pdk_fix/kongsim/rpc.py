"""MessagePack-RPC as a Kong worker speaks it: one call in flight per connection, LIFO keepalive.

Mirrors ``Rpc:call`` of Kong's ``mp_rpc.lua`` and nginx's cosocket keepalive pool
(KONG_PROTOCOL.md "Framing").
"""

from __future__ import annotations

import collections
import itertools
import socket
import threading
import time
from typing import Any, Callable

import msgpack


class RPCError(Exception):
    """An error reply ``[1, msgid, error, nil]`` from the plugin server."""


class ProtocolError(Exception):
    """Kong's assert on a reply failed (wrong type or msgid): a Lua error, a 500 in Kong."""


class ReadTimeout(Exception):
    """A read timed out ("no data" in Kong); ``partial`` is true if some bytes of it arrived."""

    def __init__(self, partial: bool) -> None:
        super().__init__("timeout" + (" (partial reply)" if partial else ""))
        self.partial = partial


class ConnectionClosed(OSError):
    """The plugin server closed the connection before replying."""


class Connection:
    """One unix-socket connection to the plugin server with its reply decoder."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except BaseException:
            self.sock.close()
            raise
        # Kong reads any bytes as Lua strings, so replies that are not UTF-8 must not fail here.
        self.unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=False, unicode_errors="surrogateescape"
        )
        self.idle_since = time.monotonic()

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload)

    def read(self, timeout: float) -> Any:
        """The next message; raises ``ReadTimeout`` or ``ConnectionClosed``."""
        partial = False
        self.sock.settimeout(timeout)
        while True:
            try:
                return next(self.unpacker)
            except StopIteration:
                pass
            except ValueError as ex:
                raise ProtocolError(f"undecodable reply: {ex}") from ex
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise ReadTimeout(partial) from None
            if not data:
                raise ConnectionClosed("connection closed by the plugin server")
            partial = True
            self.unpacker.feed(data)

    def quiet(self) -> bool:
        """True if nothing arrived while idle (nginx closes an idle connection that gets data
        or EOF)."""
        timeout = self.sock.gettimeout()
        try:
            self.sock.setblocking(False)
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(timeout)
        return False

    def close(self) -> None:
        self.sock.close()


class Rpc:
    """A Kong worker's RPC client: msgids, keepalive pool and notifications. Thread-safe.

    The pool is a LIFO of idle connections, at most ``idle_pool_size`` of them, each dropped
    after ``idle_timeout`` s; connections in use are unbounded (KONG_PROTOCOL.md "Framing").
    """

    def __init__(
        self,
        socket_path: str,
        *,
        read_timeout: float = 60.0,
        idle_pool_size: int = 256,
        idle_timeout: float = 60.0,
        reuse_on_timeout: bool = False,
        on_notification: Callable[[Any, Any], None] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.read_timeout = read_timeout
        self.idle_pool_size = idle_pool_size
        self.idle_timeout = idle_timeout
        self.reuse_on_timeout = reuse_on_timeout
        self.on_notification = on_notification
        self.opened = 0  # connections opened so far
        self._idle: collections.deque[Connection] = collections.deque()
        self._msgids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    def connect(self) -> Connection:
        """A new connection outside the pool (for ``call(conn=...)``)."""
        conn = Connection(self.socket_path, self.read_timeout)
        with self._lock:
            self.opened += 1
        return conn

    def call(
        self,
        method: str,
        arg: Any,
        *,
        conn: Connection | None = None,
        fresh: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Send ``[0, msgid, method, [arg]]`` and return the result of the one reply.

        Uses ``conn`` if given (left open, never pooled), else a pooled connection, else, with
        ``fresh``, a new connection closed after the reply. Raises ``RPCError`` for an error
        reply, ``ProtocolError``, ``ReadTimeout``, ``ConnectionClosed`` or ``OSError``.
        """
        owned = conn is None
        if conn is None:
            conn = self.connect() if fresh else self._take()
        with self._lock:
            msgid = next(self._msgids)
        try:
            conn.send(msgpack.packb([0, msgid, method, [arg]], unicode_errors="surrogateescape"))
            reply = self._read_reply(conn, msgid, self.read_timeout if timeout is None else timeout)
        except ReadTimeout as ex:
            # KONG_PROTOCOL.md "Framing": after "no data" nginx keeps the connection, reply owed.
            if owned and self.reuse_on_timeout and not ex.partial and not fresh:
                self._give(conn)
            elif owned:
                conn.close()
            raise
        except BaseException:
            if owned:
                conn.close()
            raise
        if owned:
            if fresh:
                conn.close()
            else:
                self._give(conn)
        if reply[2] is not None:
            raise RPCError(str(reply[2]))
        return reply[3]

    def _read_reply(self, conn: Connection, msgid: int, timeout: float) -> list:
        while True:
            msg = conn.read(timeout)
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == 2:
                if self.on_notification is not None:
                    self.on_notification(msg[1], msg[2])
                continue
            if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == 1):
                raise ProtocolError(f"RPC response expected, got {msg!r}")
            if msg[1] != msgid:
                raise ProtocolError(f"unexpected RPC response ID {msg[1]!r} (expected {msgid})")
            return msg

    def _take(self) -> Connection:
        now = time.monotonic()
        stale = []
        found = None
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < self.idle_timeout and conn.quiet():
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found if found is not None else self.connect()

    def _give(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        evicted = []
        with self._lock:
            if self._closed:
                evicted.append(conn)
            else:
                self._idle.append(conn)
            while len(self._idle) > self.idle_pool_size or (
                self._idle and conn.idle_since - self._idle[0].idle_since >= self.idle_timeout
            ):
                evicted.append(self._idle.popleft())
        for old in evicted:
            old.close()

    def idle(self) -> int:
        """How many connections wait in the pool."""
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        """Close the pooled connections; connections given back later are closed too."""
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), collections.deque()
        for conn in idle:
            conn.close()
