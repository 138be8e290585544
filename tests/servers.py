"""Starting real plugin servers for the tests, and measuring what they leave behind."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import msgpack

from kong_pdk_fix.compat import parse_version
from kong_pdk_fix.kongsim import Kong, PluginServerProcess, ScriptedPDK, install_probe, probe_heap

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")
KONG_PDK = parse_version(metadata.version("kong-pdk"))[:2]
# kong-pdk 0.33 and 0.34 keep every event in PluginServer.events until "ret" arrives by Step,
# so even an event that never calls the PDK stays for ever (KONG_PROTOCOL.md leak table).
LEAKS_EVERY_EVENT = KONG_PDK <= (0, 34)
MODES = ("thread", "gevent", "process")
# What upstream allocates per event and leaks: the queues of the original report's heap table
# (threading), gevent's Channel and the greenlet blocked on it (-g), pipes (-m).
QUEUE_TYPES = ("deque", "Queue", "Condition", "Channel", "greenlet", "Connection")


@contextlib.contextmanager
def running_server(
    tmp_path: Any,
    *,
    patched: bool,
    plugins: Sequence[str] = (),
    copies: Optional[Dict[str, str]] = None,
    mode: str = "thread",
    env: Optional[Dict[str, str]] = None,
    read_timeout: float = 10.0,
    **kwargs: Any,
) -> Iterator["Running"]:
    """A real kong-python-pluginserver loading `plugins` (file stems in tests/plugins, all of
    them when empty), `copies` ({new name: file stem}) and the probe, with an emulated Kong
    worker talking to it."""
    plugins_dir = tmp_path / ("plugins-%s" % ("patched" if patched else "upstream"))
    plugins_dir.mkdir()
    names = plugins or [f[:-3] for f in os.listdir(PLUGINS) if f.endswith(".py")]
    for name in names:
        shutil.copy(os.path.join(PLUGINS, name + ".py"), str(plugins_dir))
    for new_name, name in (copies or {}).items():
        shutil.copy(os.path.join(PLUGINS, name + ".py"), str(plugins_dir / (new_name + ".py")))
    install_probe(str(plugins_dir))
    with PluginServerProcess(
        str(plugins_dir), mode=mode, patched=patched, env=env, **kwargs
    ) as server:
        kong = server.kong(read_timeout=read_timeout)
        try:
            yield Running(server, kong)
        finally:
            kong.close()


@dataclass
class Sample:
    objects: int  # QUEUE_TYPES alive in the server (in -m: in the pool process the probe ran in)
    threads: int
    fds: int
    rss: int
    events: Optional[int]  # events in the shim's table (None on an upstream server)
    counts: Dict[str, Any]


@dataclass
class Running:
    server: PluginServerProcess
    kong: Kong

    def sample(self) -> Sample:
        counts = probe_heap(self.kong)
        return Sample(
            objects=sum(counts.get(t, 0) for t in QUEUE_TYPES),
            threads=self.server.threads(),
            fds=self.server.fds(),
            rss=self.server.rss(),
            events=self.live_events(),
            counts=counts,
        )

    def status(self) -> Dict[str, Any]:
        return self.kong.call("plugin.GetStatus", None)

    def shim_stats(self) -> Optional[Dict[str, Any]]:
        return self.status().get("KongPdkFix")

    def live_events(self) -> Optional[int]:
        stats = self.shim_stats()
        if stats is None:
            return None
        return sum(stats["events"].values())

    def run(
        self,
        plugin: str,
        pdk: Optional[ScriptedPDK] = None,
        phase: str = "access",
        config: Optional[dict] = None,
    ) -> Any:
        return self.kong.run_event(plugin, phase, pdk or ScriptedPDK(), config)

    def repeat(
        self,
        n: int,
        plugin: str,
        pdk_factory: Callable[[], ScriptedPDK] = ScriptedPDK,
        phase: str = "access",
    ) -> Dict[str, int]:
        kinds: Dict[str, int] = {}
        for _ in range(n):
            outcome = self.run(plugin, pdk_factory(), phase)
            kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
        return kinds


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; returns its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def describe(before: Sample, after: Sample) -> str:
    return json.dumps(
        {
            "objects": [before.objects, after.objects],
            "threads": [before.threads, after.threads],
            "fds": [before.fds, after.fds],
            "rss_kib": [before.rss // 1024, after.rss // 1024],
            "events": [before.events, after.events],
        }
    )


class RawConnection:
    """A unix-socket connection to the plugin server that sends whatever bytes it is given,
    for hostile input. Reads decode `str` as Kong does (any bytes), and remember
    notifications (`[2, label, value]`) apart from replies."""

    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path)
        self.unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=False, unicode_errors="surrogateescape"
        )
        self.messages: List[Any] = []  # everything read, notifications included, in order
        self._ids = itertools.count(1000)

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload)

    def send_message(self, message: Any) -> None:
        self.send(msgpack.packb(message, unicode_errors="surrogateescape"))

    def read(self) -> Any:
        """The next message (a notification too); raises EOFError when the server closed the
        connection, socket.timeout when nothing came."""
        while True:
            try:
                message = next(self.unpacker)
            except StopIteration:
                pass
            else:
                self.messages.append(message)
                return message
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError("the plugin server closed the connection")
            self.unpacker.feed(data)

    def reply(self) -> List[Any]:
        """The next message that is not a notification."""
        while True:
            message = self.read()
            if not (isinstance(message, list) and len(message) == 3 and message[0] == 2):
                return message

    def call(self, method: str, arg: Any) -> List[Any]:
        """Send a well-formed request and return its reply `[1, msgid, error, result]`."""
        msgid = next(self._ids)
        self.send_message([0, msgid, method, [arg]])
        reply = self.reply()
        assert isinstance(reply, list) and reply[:2] == [1, msgid], reply
        return reply

    def closed_by_server(self) -> bool:
        """True when the server closes the connection without another message (within the
        timeout); False when a message arrives first."""
        try:
            self.read()
        except EOFError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def fresh_event(
    running: "Running",
    plugin: str,
    pdk: Optional[ScriptedPDK] = None,
    config: Optional[dict] = None,
    phase: str = "access",
) -> Any:
    """One event by a new Kong worker whose every call is on a new connection (the server
    must serve new connections whatever happened on the old ones)."""
    kong = running.server.kong(read_timeout=10.0, event_connection_policy="fresh")
    try:
        return kong.run_event(plugin, phase, pdk or ScriptedPDK(), config)
    finally:
        kong.close()


def idle(running: "Running") -> bool:
    """The shim's event table is empty and no worker is busy or stuck."""
    stats = running.shim_stats()
    return (
        stats is not None
        and sum(stats["events"].values()) == 0
        and stats["workers"]["busy"] == 0
        and stats["workers"]["stuck"] == 0
    )
